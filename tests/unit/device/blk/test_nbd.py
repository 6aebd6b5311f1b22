"""The NBD back-end against a real nbdkit on a unix socket, under the device and our driver.

What the export can do is what the guest is offered; data goes both ways and reaches the
server's file; a server error fails that request only; a server that dies with requests in
flight is reconnected to and the requests complete; one that stays away makes the waiting
requests fail after the bound, and is reconnected to later.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.blk import SECTOR, GuardedImage, blk_pair, features, sha
from helpers.nbd import Nbdkit, event_loop, require_nbd, run_until
from pyvirtio.device.blk import BlkDevice
from pyvirtio.device.blk.nbd import NbdBackend, is_nbd_target
from pyvirtio.driver.blk import BlkDriver, BlkIO
from pyvirtio.errors import LocalError
from pyvirtio.io.loop import EventLoop
from pyvirtio.spec import blk as B

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _nbd() -> None:
    require_nbd()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    with event_loop() as lp:
        yield lp


@pytest.fixture
def image(tmp_path: Path) -> GuardedImage:
    return GuardedImage(tmp_path, 4 * MiB, seed=3)


class Servers:
    """The nbdkit processes of one test, all closed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.sock = tmp_path / "nbd.sock"
        self.started: list[Nbdkit] = []

    def start(self, plugin: list[str], **kwargs: object) -> Nbdkit:
        n = len(self.started)
        server = Nbdkit(plugin, unix=self.sock, log_path=self.tmp_path / f"nbdkit{n}.log",
                        **kwargs)  # type: ignore[arg-type]
        self.started.append(server)
        return server

    def file(self, image: GuardedImage, **kwargs: object) -> Nbdkit:
        return self.start(["file", f"file={image.path}"], **kwargs)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    yield s
    for server in s.started:
        server.close()


def finish(loop: EventLoop, drv: BlkDriver, *ios: BlkIO, timeout: float = 20.0) -> None:
    """Kick, and run the loop until every request is answered."""
    drv.kick()

    def done() -> bool:
        drv.poll()
        return all(io.done for io in ios)

    run_until(loop, done, timeout)


def offered(device: BlkDevice, bit: int) -> bool:
    return bool(device.offered_features >> bit & 1)


# ---- what the export can do ---------------------------------------------------------------


def test_capacity_and_features_follow_a_full_featured_export(
        image: GuardedImage, servers: Servers, loop: EventLoop) -> None:
    server = servers.file(image)
    backend = NbdBackend(server.uri, loop, connections=2)
    try:
        assert backend.size == image.size  # the file's partial last sector is not served
        assert backend.supports_flush and backend.supports_discard
        assert backend.supports_write_zeroes and not backend.read_only
        assert backend.multi_conn and backend.connections == 2
        with blk_pair(backend, num_queues=2) as (_, device, drv):
            assert drv.capacity == image.sectors
            for bit in (B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_DISCARD,
                        B.VIRTIO_BLK_F_WRITE_ZEROES, B.VIRTIO_BLK_F_MQ):
                assert offered(device, bit), bit
            assert not offered(device, B.VIRTIO_BLK_F_RO)
    finally:
        backend.close()


def test_an_export_without_flush_trim_zero_or_multi_conn_is_offered_none_of_them(
        image: GuardedImage, servers: Servers, loop: EventLoop) -> None:
    # nbdkit's eval plugin: a server of reads and writes only (dd on the image); nbdkit
    # would emulate zeroing with writes, the nozero filter stops it advertising that
    img = image.path
    server = servers.start([
        "eval", f"get_size=echo {image.size}",
        f"pread=dd if={img} skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none",
        f"pwrite=dd of={img} seek=$4 conv=notrunc oflag=seek_bytes status=none"],
        filters=["nozero"])
    backend = NbdBackend(server.uri, loop, connections=2)
    try:
        assert not backend.supports_flush
        assert not backend.supports_discard and not backend.supports_write_zeroes
        assert not backend.multi_conn and backend.connections == 1
        with blk_pair(backend, num_queues=2) as (_pair, device, drv):
            for bit in (B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_CONFIG_WCE,
                        B.VIRTIO_BLK_F_DISCARD, B.VIRTIO_BLK_F_WRITE_ZEROES):
                assert not offered(device, bit), bit
            # both queues share the one connection
            data = os.urandom(8 * SECTOR)
            ios = [drv.submit_write(64, data, queue=0), drv.submit_read(0, 8, queue=1)]
            finish(loop, drv, *ios)
            assert all(io.ok for io in ios)
            assert ios[1].data == bytes(image.content[: 8 * SECTOR])
            image.content[64 * SECTOR : 72 * SECTOR] = data
    finally:
        backend.close()
    image.assert_matches_model()


def test_a_read_only_export_is_served_read_only(image: GuardedImage, servers: Servers,
                                                loop: EventLoop) -> None:
    server = servers.file(image, readonly=True)
    backend = NbdBackend(server.uri, loop)
    try:
        assert backend.read_only
        with blk_pair(backend) as (_, device, drv):
            assert offered(device, B.VIRTIO_BLK_F_RO)
            assert not offered(device, B.VIRTIO_BLK_F_DISCARD)
            write = drv.submit(B.VIRTIO_BLK_T_OUT, 0, out=bytes(SECTOR))  # unchecked
            read = drv.submit_read(0, 4)
            finish(loop, drv, write, read)
            assert write.status == B.VIRTIO_BLK_S_IOERR
            assert read.ok and read.data == bytes(image.content[: 4 * SECTOR])
    finally:
        backend.close()
    image.assert_matches_model()


def test_a_server_that_cannot_be_reached_is_named(tmp_path: Path, loop: EventLoop) -> None:
    uri = f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}"
    with pytest.raises(LocalError, match="cannot connect to nbd"):
        NbdBackend(uri, loop, connect_timeout=5)


def test_only_nbd_uris_are_nbd_targets() -> None:
    assert is_nbd_target("nbd://10.0.0.1/disk") and is_nbd_target("nbd+unix:///?socket=/s")
    assert not is_nbd_target("/var/disk.img") and not is_nbd_target("nbdfile.img")


# ---- data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_queues", [1, 2])
def test_many_requests_in_flight_round_trip_and_reach_the_servers_file(
        image: GuardedImage, servers: Servers, loop: EventLoop, num_queues: int) -> None:
    server = servers.file(image)
    backend = NbdBackend(server.uri, loop, connections=num_queues)
    rnd = random.Random(5)
    try:
        with blk_pair(backend, num_queues=num_queues,
                      features=features(event_idx=True)) as (_pair, device, drv):
            writes = []
            for i in range(48):  # disjoint ranges, all submitted before any completes
                count = rnd.choice([1, 8, 64, 160])
                sector = i * 160
                data = rnd.randbytes(count * SECTOR)
                writes.append((sector, data, drv.submit_write(sector, data)))
            finish(loop, drv, *(io for _, _, io in writes))
            assert all(io.ok for _, _, io in writes)
            for sector, data, _ in writes:
                image.content[sector * SECTOR : sector * SECTOR + len(data)] = data
            reads = [(s, drv.submit_read(s, len(d) // SECTOR)) for s, d, _ in writes]
            finish(loop, drv, *(io for _, io in reads))
            for (sector, data, _), (_, io) in zip(writes, reads, strict=True):
                assert io.ok and io.data == data, sector
            flush = drv.submit_flush()
            finish(loop, drv, flush)
            assert flush.ok and device.stats.flushes == 1
    finally:
        backend.close()
    image.assert_matches_model()


def test_a_request_of_several_odd_segments_is_read_and_written_in_place(
        image: GuardedImage, servers: Servers, loop: EventLoop) -> None:
    server = servers.file(image)
    backend = NbdBackend(server.uri, loop)
    try:
        with blk_pair(backend) as (pair, _, drv):
            mem, alloc = pair.memory, pair.allocator
            lens = [512, 1536, 3072, 512]
            addrs = [alloc.alloc(n + 7, 4096) + 7 for n in lens]  # unaligned guest buffers
            data = os.urandom(sum(lens))
            pos = 0
            for a, n in zip(addrs, lens, strict=True):
                mem.write(a, data[pos : pos + n])
                pos += n
            write = drv.submit(B.VIRTIO_BLK_T_OUT, 100, out_sgs=list(zip(addrs, lens,
                                                                         strict=True)))
            finish(loop, drv, write)
            assert write.ok
            image.content[100 * SECTOR : 100 * SECTOR + len(data)] = data
            for a, n in zip(addrs, lens, strict=True):
                mem.write(a, b"\xee" * n)
            read = drv.submit(B.VIRTIO_BLK_T_IN, 100, in_sgs=list(zip(addrs, lens,
                                                                      strict=True)))
            finish(loop, drv, read)
            assert read.ok
            assert b"".join(mem.read(a, n) for a, n in zip(addrs, lens, strict=True)) == data
    finally:
        backend.close()
    image.assert_matches_model()


def test_discard_and_write_zeroes_become_trim_and_zero(image: GuardedImage,
                                                      servers: Servers,
                                                      loop: EventLoop) -> None:
    server = servers.file(image)
    backend = NbdBackend(server.uri, loop)
    try:
        with blk_pair(backend) as (_, device, drv):
            zero = drv.submit_write_zeroes([(0, 128)], unmap=False)
            zero_unmap = drv.submit_write_zeroes([(256, 64)], unmap=True)
            discard = drv.submit_discard([(1024, 512)])
            finish(loop, drv, zero, zero_unmap, discard)
            assert zero.ok and zero_unmap.ok and discard.ok
            assert device.stats.write_zeroes == 2 and device.stats.discards == 1
    finally:
        backend.close()
    data = image.read()
    assert data[: 128 * SECTOR] == bytes(128 * SECTOR)
    assert data[256 * SECTOR : 320 * SECTOR] == bytes(64 * SECTOR)
    assert data[128 * SECTOR : 256 * SECTOR] == bytes(image.content[128 * SECTOR :
                                                                     256 * SECTOR])
    image.assert_outside_untouched()


# ---- failures ---------------------------------------------------------------------------


def test_a_server_error_fails_that_request_only(image: GuardedImage, servers: Servers,
                                                loop: EventLoop, tmp_path: Path) -> None:
    trigger = tmp_path / "errors-on"
    server = servers.start(["file", f"file={image.path}", "error-pread=EIO",
                            "error-pread-rate=100%", f"error-pread-file={trigger}"],
                           filters=["error"])
    backend = NbdBackend(server.uri, loop)
    try:
        with blk_pair(backend) as (_, device, drv):
            trigger.touch()
            failed = drv.submit_read(8, 8)
            written = drv.submit_write(64, b"\x5a" * SECTOR)
            finish(loop, drv, failed, written)
            assert failed.status == B.VIRTIO_BLK_S_IOERR
            assert failed.data == bytes(8 * SECTOR)  # never stale guest bytes
            assert written.ok
            trigger.unlink()
            read = drv.submit_read(8, 8)
            finish(loop, drv, read)
            assert read.ok and read.data == bytes(image.content[8 * SECTOR : 16 * SECTOR])
            assert device.stats.ioerr == 1 and backend.server_errors == 1
            assert backend.reconnects == 0
            image.content[64 * SECTOR : 65 * SECTOR] = b"\x5a" * SECTOR
    finally:
        backend.close()
    assert server.count("injecting EIO error into pread") == 1, server.log()
    image.assert_matches_model()


def test_requests_in_flight_when_the_server_dies_complete_after_it_is_back(
        image: GuardedImage, servers: Servers, loop: EventLoop) -> None:
    # Every write takes 0.5 s in the first server: they are all in flight when it dies.
    first = servers.start(["file", f"file={image.path}", "delay-write=500ms"],
                          filters=["delay"])
    backend = NbdBackend(first.uri, loop, connections=1)
    rnd = random.Random(9)
    try:
        with blk_pair(backend, writeback=False) as (_, _device, drv):  # writethrough: FUA
            writes = [(i * 64, rnd.randbytes(16 * SECTOR)) for i in range(8)]
            ios = [drv.submit_write(s, d) for s, d in writes]
            drv.kick()
            run_until(loop, lambda: sum(len(c.in_flight) for c in backend._conns) == 8,
                      what="8 writes in flight")
            first.kill()
            loop.run(timeout=0.3)  # the loss is noticed; the requests wait
            assert not any(io.done for io in ios)
            servers.file(image)
            finish(loop, drv, *ios)
            assert all(io.ok for io in ios)
            assert backend.reconnects == 1 and backend.reissued >= 8
            for sector, data in writes:
                image.content[sector * SECTOR : sector * SECTOR + len(data)] = data
            reads = [drv.submit_read(s, len(d) // SECTOR) for s, d in writes]
            finish(loop, drv, *reads)
            assert [io.data for io in reads] == [d for _, d in writes]
    finally:
        backend.close()
    image.assert_matches_model()


def test_requests_fail_after_the_bound_and_the_connection_comes_back_later(
        image: GuardedImage, servers: Servers, loop: EventLoop) -> None:
    first = servers.file(image)
    backend = NbdBackend(first.uri, loop, reconnect_timeout=0.5)
    try:
        with blk_pair(backend) as (_, _device, drv):
            first.kill()
            read = drv.submit_read(0, 8)
            finish(loop, drv, read, timeout=10)
            assert read.status == B.VIRTIO_BLK_S_IOERR
            assert backend.expired >= 1 and backend.reconnects == 0
            servers.file(image)
            run_until(loop, lambda: backend.reconnects == 1, what="the reconnection")
            read = drv.submit_read(0, 8)
            finish(loop, drv, read)
            assert read.ok and read.data == bytes(image.content[: 8 * SECTOR])
    finally:
        backend.close()


def test_a_device_reset_waits_for_the_writes_in_flight(image: GuardedImage,
                                                      servers: Servers,
                                                      loop: EventLoop) -> None:
    server = servers.start(["file", f"file={image.path}", "delay-write=300ms"],
                           filters=["delay"])
    backend = NbdBackend(server.uri, loop)
    data = os.urandom(32 * SECTOR)
    try:
        with blk_pair(backend) as (pair, _device, drv):
            write = drv.submit_write(200, data)
            drv.kick()
            run_until(loop, lambda: bool(backend._conns[0].in_flight), what="the write")
            pair.transport.reset()  # drains: the write lands before the reset returns
            assert not write.done  # its completion went nowhere: the ring is gone
            assert sha(image.read(200 * SECTOR, len(data))) == sha(data)
            assert not backend._conns[0].in_flight
    finally:
        backend.close()
