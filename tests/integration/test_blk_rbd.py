"""virtio-blk on a Ceph RBD image (:class:`pyvirtio.device.blk.rbd.RbdBackend`), against the
real single-node cluster the test run starts once (``ceph_cluster``, tests/helpers/ceph.py).

In memory, our driver drives a BlkDevice on the back-end, whose completions come back from
librbd's threads through the event loop; what the device stored is checked through a
second, independent librbd client. Then a User-Mode Linux guest attached to ``pyvirtio
serve blk rbd:POOL/IMAGE@CONF`` makes, fills and re-reads an ext2 file system and runs fio
with crc32c verification; the host's e2fsck checks the file system read out of the cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.blk import FIO, FS_BLOCKS, FS_SCRIPT, BlkServer, blk_pair
from helpers.ceph import image_name
from peers import require_guest
from pyvirtio.device.blk.rbd import RbdBackend
from pyvirtio.driver.blk import BlkDriver, BlkIO
from pyvirtio.errors import LocalError
from pyvirtio.guest import UmlGuest
from pyvirtio.io.loop import EventLoop
from pyvirtio.spec import blk as B
from pyvirtio.testing.ceph import CephCluster, bindings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MiB = 1 << 20
SECTOR = 512
OBJECT = 4 * MiB  # librbd's default object size


class RbdDisk:
    """An image of its own in the test cluster, served by an RbdBackend under a BlkDevice
    probed by our driver; :meth:`run` pumps the event loop until requests are answered;
    :meth:`peer_read` reads the image through a separate librbd client."""

    def __init__(self, cluster: CephCluster, name: str, size: int, **device_kwargs: Any
                 ) -> None:
        self.cluster = cluster
        self.name = name
        self.size = size
        cluster.create_image(name, size)
        self.loop = EventLoop()
        self.backend = RbdBackend.from_target(cluster.target(name), reactor=self.loop)
        self._stack = contextlib.ExitStack()
        self.pair, self.device, drv = self._stack.enter_context(
            blk_pair(self.backend, memory_size=32 << 20, **device_kwargs))
        self.driver: BlkDriver = drv

    def run(self, ios: Iterable[BlkIO], timeout: float = 60.0) -> list[BlkIO]:
        ios = list(ios)
        self.driver.kick()
        deadline = time.monotonic() + timeout
        while any(io.status is None for io in ios):
            if time.monotonic() > deadline:
                pending = [io.describe() for io in ios if io.status is None]
                raise TimeoutError(f"not answered within {timeout} s: {pending[:5]}")
            self.loop.run_once(0.05)
            self.driver.poll()
        return ios

    def read(self, sector: int, count: int) -> bytes:
        (io,) = self.run([self.driver.submit_read(sector, count)])
        assert io.ok, io
        assert io.data is not None
        return io.data

    def peer_read(self, offset: int, length: int) -> bytes:
        with self.cluster.client() as client, contextlib.ExitStack() as stack:
            _, rbd = bindings()
            ioctx = stack.enter_context(contextlib.closing(client.open_ioctx(
                self.cluster.pool)))
            image = stack.enter_context(contextlib.closing(
                rbd.Image(ioctx, self.name, read_only=True)))
            return bytes(image.read(offset, length))

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            self.backend.close()
            self.loop.close()
            with contextlib.suppress(Exception):
                self.cluster.remove_image(self.name)


@pytest.fixture
def disk(ceph_cluster: CephCluster, request: pytest.FixtureRequest) -> Iterator[RbdDisk]:
    d = RbdDisk(ceph_cluster, image_name(request), 64 * MiB)
    try:
        yield d
    finally:
        d.close()


def test_capacity_is_the_image_size_and_flush_discard_write_zeroes_are_offered(
        disk: RbdDisk) -> None:
    drv = disk.driver
    assert drv.capacity == 64 * MiB // SECTOR
    assert drv.can_discard and drv.can_write_zeroes
    assert disk.device.has_feature(B.VIRTIO_BLK_F_FLUSH)


def test_many_requests_in_flight_store_what_the_guest_wrote(disk: RbdDisk) -> None:
    rnd = random.Random(15)
    # 64 writes of 4..64 KiB at distinct random places, all in flight together.
    slots = rnd.sample(range(64 * MiB // (64 << 10)), 64)
    writes = [(slot * 128, rnd.randbytes(rnd.randrange(1, 17) * 4096)) for slot in slots]
    ios = [disk.driver.submit_write(sector, data) for sector, data in writes]
    disk.driver.kick()
    assert disk.backend.in_flight == 64, "the requests went to librbd one at a time"
    disk.run(ios)
    assert all(io.ok for io in ios), [io for io in ios if not io.ok]
    (flush,) = disk.run([disk.driver.submit_flush()])
    assert flush.ok
    reads = disk.run([disk.driver.submit_read(sector, len(data) // SECTOR)
                      for sector, data in writes])
    for io, (sector, data) in zip(reads, writes, strict=True):
        assert io.ok and io.data == data, f"sector {sector}"
        assert disk.peer_read(sector * SECTOR, len(data)) == data
    assert disk.device.stats.ioerr == 0
    assert disk.backend.errors == []


def test_completions_reach_the_device_on_the_loop_thread_only(disk: RbdDisk) -> None:
    """librbd completes on its own threads; the device (rings, guest memory) must only
    ever hear of it on the thread that runs the event loop."""
    threads: set[int] = set()
    complete = disk.device._complete_async

    def on_loop_thread(req: Any, status: int) -> None:
        threads.add(threading.get_ident())
        complete(req, status)

    disk.device._complete_async = on_loop_thread  # type: ignore[method-assign]
    data = os.urandom(16 << 10)
    ios = disk.run([disk.driver.submit_write(i * 32, data) for i in range(16)]
                   + [disk.driver.submit_flush()])
    ios += disk.run([disk.driver.submit_read(i * 32, 32) for i in range(16)])
    assert all(io.ok for io in ios) and all(io.data == data for io in ios[17:])
    assert threads == {threading.get_ident()}


def test_a_guest_changing_its_buffer_during_a_write_cannot_change_what_is_stored(
        disk: RbdDisk) -> None:
    """The data is copied out of guest memory when the request is submitted: librbd
    never reads guest memory, so a driver that scribbles over an in-flight buffer (a
    hostile or buggy guest) changes nothing that is stored."""
    data = os.urandom(64 << 10)
    io = disk.driver.submit_write(2048, data)
    disk.driver.kick()
    assert disk.backend.in_flight == 1 and io.data_addr is not None
    disk.pair.memory.write(io.data_addr, bytes(len(data)))  # before librbd completes
    disk.run([io])
    assert io.ok
    assert disk.peer_read(2048 * SECTOR, len(data)) == data
    assert disk.read(2048, len(data) // SECTOR) == data


def test_discard_and_write_zeroes_make_ranges_read_as_zeroes(disk: RbdDisk) -> None:
    data = os.urandom(3 * OBJECT)
    disk.run([disk.driver.submit_write(OBJECT // SECTOR + i * 2048, data[i * MiB:(i + 1) * MiB])
              for i in range(12)])
    assert disk.peer_read(OBJECT, 3 * OBJECT) == data
    obj = OBJECT // SECTOR
    ios = disk.run([
        disk.driver.submit_discard([(obj, obj)]),  # a whole object: librbd removes it
        disk.driver.submit_write_zeroes([(2 * obj, 2048)], unmap=True),  # 1 MiB
        disk.driver.submit_write_zeroes([(2 * obj + 4096, 8), (3 * obj + 16, 24)]),
    ])
    assert [io.ok for io in ios] == [True, True, True]
    model = bytearray(data)
    model[0:OBJECT] = bytes(OBJECT)
    model[OBJECT:OBJECT + MiB] = bytes(MiB)
    model[OBJECT + 2 * MiB:OBJECT + 2 * MiB + 4096] = bytes(4096)
    model[2 * OBJECT + 16 * SECTOR:2 * OBJECT + 40 * SECTOR] = bytes(24 * SECTOR)
    assert disk.peer_read(OBJECT, 3 * OBJECT) == bytes(model)
    assert b"".join(disk.read(obj + i * 2048, 2048) for i in range(12)) == bytes(model)
    assert disk.device.stats.discards == 1 and disk.device.stats.write_zeroes == 2


def test_writethrough_flushes_every_write_before_answering(
        ceph_cluster: CephCluster, request: pytest.FixtureRequest) -> None:
    d = RbdDisk(ceph_cluster, image_name(request), 16 * MiB, writeback=False)
    try:
        assert d.device.writethrough
        before = d.backend.flushes
        data = [os.urandom(8192) for _ in range(8)]
        ios = d.run([d.driver.submit_write(i * 64, chunk) for i, chunk in enumerate(data)])
        assert all(io.ok for io in ios)
        assert d.backend.flushes - before == 8
        for i, chunk in enumerate(data):
            assert d.peer_read(i * 64 * SECTOR, 8192) == chunk
    finally:
        d.close()


def test_an_image_shrunk_underneath_fails_only_the_requests_beyond_its_end(
        disk: RbdDisk) -> None:
    tail = os.urandom(64 << 10)
    head = os.urandom(64 << 10)
    last = 64 * MiB // SECTOR - 128
    disk.run([disk.driver.submit_write(last, tail), disk.driver.submit_write(0, head)])
    # Another client shrinks the image to 32 MiB (librbd hands it the exclusive lock).
    with disk.cluster.client() as client:
        _, rbd = bindings()
        with contextlib.closing(client.open_ioctx(disk.cluster.pool)) as ioctx, \
                contextlib.closing(rbd.Image(ioctx, disk.name)) as other:
            other.resize(32 * MiB)
    deadline = time.monotonic() + 30
    while disk.backend.refresh_size() != 32 * MiB:  # the header update reached our client
        assert time.monotonic() < deadline, "the resize never reached the back-end"
        disk.loop.run_once(0.1)
    # The device still believes in 64 MiB (no capacity update): librbd refuses the rest.
    beyond, inside = disk.run([disk.driver.submit_read(last, 128),
                               disk.driver.submit_read(0, 128)])
    assert beyond.status == B.VIRTIO_BLK_S_IOERR
    assert inside.ok and inside.data == head
    assert any(f"read of rbd:{disk.cluster.pool}/{disk.name} at {last * SECTOR}+65536 failed"
               in e for e in disk.backend.errors), disk.backend.errors
    # The device keeps serving.
    again = os.urandom(4096)
    (w,) = disk.run([disk.driver.submit_write(8, again)])
    assert w.ok and disk.read(8, 8) == again
    disk.device.update_capacity()
    assert disk.device.capacity == 32 * MiB // SECTOR


def test_a_removed_image_answers_ioerr_naming_it(disk: RbdDisk) -> None:
    """The image is taken away from under the server: its client is blocklisted (as an
    administrator fences a client) and the image removed. Every request then fails with
    IOERR, the log names the image and the error, and the back-end keeps answering."""
    data = os.urandom(8192)
    disk.run([disk.driver.submit_write(0, data)])
    with disk.cluster.client() as client:
        _, rbd = bindings()
        with contextlib.closing(client.open_ioctx(disk.cluster.pool)) as ioctx:
            with contextlib.closing(rbd.Image(ioctx, disk.name, read_only=True)) as img:
                watchers = [w["addr"] for w in img.watchers_list()]
            assert watchers, "our back-end does not watch its image"
            for addr in watchers:
                ret, _, err = client.mon_command(json.dumps(
                    {"prefix": "osd blocklist", "blocklistop": "add", "addr": addr}), b"")
                assert ret == 0, err
            deadline = time.monotonic() + 60
            while True:
                try:
                    rbd.RBD().remove(ioctx, disk.name)
                    break
                except rbd.ImageBusy:  # the watch times out after the blocklisting
                    assert time.monotonic() < deadline, "the image stayed busy"
                    time.sleep(0.5)
    ios = disk.run([disk.driver.submit_read(0, 16), disk.driver.submit_write(64, data)],
                   timeout=120)
    assert [io.status for io in ios] == [B.VIRTIO_BLK_S_IOERR] * 2
    named = f"rbd:{disk.cluster.pool}/{disk.name}"
    assert any(e.startswith(f"read of {named} at 0+8192 failed") for e in disk.backend.errors)
    assert any(e.startswith(f"write of {named} at 32768+8192 failed")
               for e in disk.backend.errors), disk.backend.errors
    assert disk.device.stats.ioerr == 2
    assert not disk.device.problems  # a storage failure, not a misbehaving driver


# ---- a real guest ---------------------------------------------------------------------------


def test_uml_guest_runs_fio_verify_and_a_file_system_on_rbd(
        ceph_cluster: CephCluster, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    require_guest("uml")
    e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    name = image_name(request)
    ceph_cluster.create_image(name, 128 * MiB)
    stats = tmp_path / "stats.json"
    server = None
    try:
        server = BlkServer(ceph_cluster.target(name), tmp_path / "rbd.sock",
                           ["--stats-file", str(stats)], log_path=tmp_path / "server.log")
        script = (
            "result vda_sectors $(cat /sys/block/vda/size)\n"
            + FS_SCRIPT.format(dev="/dev/vda", fs_blocks=FS_BLOCKS)
            + FIO.format(dev="/dev/vda", offset="32M", name="vda")
        )
        with UmlGuest(script, kernel_args=server.banner_args("uml"), timeout=200) as guest:
            result = guest.wait(timeout=200)
        result.check()
        r = result.results
        assert int(r["vda_sectors"]) == 128 * MiB // SECTOR
        assert r["fs_after"] == r["fs_before"] and r["fs_hello"] == "hello"
        assert r["fio_vda_status"] == "0", result.tail(60)
        assert r["fio_vda"] == "0;65536;65536", "fio: error;read KiB;write KiB"
        assert server.stop() == 0, server.log()
        counters = json.loads(stats.read_text())
        assert counters["ioerr"] == 0 and counters["unsupp"] == 0, counters
        assert counters["writes"] >= 16384, counters  # fio alone wrote 16384 blocks
    finally:
        if server is not None:
            server.close()
    # The file system, read out of the cluster by another client, is clean.
    fs = tmp_path / "fs.img"
    try:
        with ceph_cluster.client() as client:
            _, rbd = bindings()
            with contextlib.closing(client.open_ioctx(ceph_cluster.pool)) as ioctx, \
                    contextlib.closing(rbd.Image(ioctx, name, read_only=True)) as img:
                with open(fs, "wb") as f:
                    for off in range(0, 32 * MiB, 4 * MiB):
                        f.write(img.read(off, 4 * MiB))
    finally:
        with contextlib.suppress(Exception):
            ceph_cluster.remove_image(name)
    if Path(e2fsck).exists():
        check = subprocess.run([e2fsck, "-fn", str(fs)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, f"e2fsck:\n{check.stdout}\n{check.stderr}"


def test_a_target_that_cannot_be_opened_is_refused_naming_it(ceph_cluster: CephCluster,
                                                             tmp_path: Path) -> None:
    loop = EventLoop()
    try:
        for target, why in [
            (ceph_cluster.target("no-such-image"), "RBD image not found"),
            (ceph_cluster.target("x", pool="no-such-pool"), "error opening pool"),
            (f"rbd:rbd/x@{tmp_path / 'missing.conf'}", "cannot reach the Ceph cluster"),
        ]:
            with pytest.raises(LocalError, match=why) as exc:
                RbdBackend.from_target(target, reactor=loop)
            assert target.split("@")[0] in str(exc.value)
    finally:
        loop.close()
