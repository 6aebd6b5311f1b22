"""A hostile front-end against ``pyvirtio serve blk`` over a real vhost-user socket.

pyvirtio's own front-end (VhostUserClient) and BlkDriver (or raw buffers on its queues)
talk to the real command line running as a child process. Requests beyond the disk, and
modifications of a read-only disk, get IOERR; a chain without a status byte and a
descriptor pointing outside guest memory break the queue with a reason in the server's
log, and the device reports DEVICE_NEEDS_RESET. Nothing outside the disk is ever written
(a tail after the capacity and a guard file next to the image are checked), each next
front-end gets a working disk, and so does a real Linux guest (UML) at the end.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.blk import (
    BlkServer,
    GuardedImage,
)
from peers import require_guest
from pyvirtio.driver.base import probe
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.spec import blk as B
from pyvirtio.spec import ids
from pyvirtio.spec import status as S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MiB = 1 << 20
SECTORS = 8 * MiB // 512
OK, IOERR = B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR
OUTSIDE = 1 << 40  # guest-physical address far beyond the client's 16 MiB of memory


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("blk-vhost-user")


@pytest.fixture(scope="module")
def image(workdir: Path) -> GuardedImage:
    return GuardedImage(workdir, 8 * MiB, fill=b"\xa5" * 4096)


@pytest.fixture(scope="module")
def server(workdir: Path, image: GuardedImage) -> Iterator[BlkServer]:
    srv = BlkServer(image.path, workdir / "blk.sock", ["--queues", "2"],
                    log_path=workdir / "server.log")
    try:
        yield srv
    finally:
        srv.close()


def connect(srv: BlkServer) -> tuple[VhostUserClient, BlkDriver]:
    client = VhostUserClient(str(srv.sock), ids.BLOCK, timeout=10)
    try:
        driver = probe(client, BlkDriver)
    except BaseException:
        client.close()
        raise
    assert isinstance(driver, BlkDriver)
    return client, driver


def needs_reset(client: VhostUserClient, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get_status() & S.DEVICE_NEEDS_RESET:
            return True
        time.sleep(0.02)
    return False


def still_serving(srv: BlkServer, image: GuardedImage) -> None:
    """A fresh front-end reads what the image holds and writes what it wants."""
    client, driver = connect(srv)
    with client:
        data = os.urandom(8192)
        driver.write(64, data, timeout=10)
        driver.flush()
        assert driver.read(64, 16, timeout=10) == data
        assert driver.read(0, 8, timeout=10) == image.read(0, 4096)
    assert image.read(64 * 512, 8192) == data


def test_our_driver_uses_both_queues(server: BlkServer, image: GuardedImage) -> None:
    client, driver = connect(server)
    with client:
        assert client.num_queues == 2 and driver.num_queues == 2
        assert driver.capacity == SECTORS
        chunks = {q: os.urandom(16384) for q in (0, 1)}
        ios = [driver.submit_write(1000 + 64 * q, chunks[q], queue=q) for q in (0, 1)]
        driver.wait(ios)
        assert all(io.status == OK for io in ios)
        reads = [driver.submit_read(1000 + 64 * q, 32, queue=1 - q) for q in (0, 1)]
        driver.wait(reads)
        assert [io.data for io in reads] == [chunks[0], chunks[1]]
    for q in (0, 1):
        assert image.read((1000 + 64 * q) * 512, 16384) == chunks[q]
    assert "vring 1 started" in server.log()


@pytest.mark.parametrize("sector, nbytes", [
    (SECTORS, 512),  # the first sector past the end
    (SECTORS - 1, 1024),  # starts inside, ends outside: nothing may be written
    (1 << 55, 512),  # sector * 512 == 2^64: offset 0 in 64-bit arithmetic
    ((1 << 64) - 1, 4096),  # wraps too
])
def test_requests_beyond_the_disk_get_ioerr_and_touch_nothing(
        server: BlkServer, image: GuardedImage, sector: int, nbytes: int) -> None:
    before = hashlib.sha256(image.read()).hexdigest()
    client, driver = connect(server)
    with client:
        write = driver.submit(B.VIRTIO_BLK_T_OUT, sector, out=os.urandom(nbytes))
        read = driver.submit(B.VIRTIO_BLK_T_IN, sector, in_len=nbytes)
        driver.wait([write, read])
        assert (write.status, read.status) == (IOERR, IOERR)
        assert read.data == bytes(nbytes)  # zeroed, not whatever was in guest memory
        assert not client.get_status() & S.DEVICE_NEEDS_RESET
    assert hashlib.sha256(image.read()).hexdigest() == before
    image.assert_outside_untouched()


def test_a_chain_without_a_status_byte_breaks_the_queue_with_a_reason(
        server: BlkServer, image: GuardedImage) -> None:
    client, driver = connect(server)
    start = len(server.log())
    with client:
        header = client.allocator.alloc(16, 16)
        data = client.allocator.alloc(4096, 4096)
        client.memory.write(header, B.outhdr_struct().pack(B.VIRTIO_BLK_T_OUT, 0, 0))
        client.memory.write(data, os.urandom(4096))
        vq = driver.vqs[0]
        vq.add_buf([(header, 16), (data, 4096)], [], "no status")
        vq.kick()
        assert needs_reset(client)
    reason = server.wait_log(r"vring 0 broken: .*no writable status byte", start=start)
    assert "chain" in reason.group(0)
    image.assert_outside_untouched()
    assert image.read(0, 4096) == b"\xa5" * 4096  # the write never happened
    still_serving(server, image)


@pytest.mark.parametrize("rtype", [B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT])
def test_a_descriptor_outside_guest_memory_breaks_the_queue_with_a_reason(
        server: BlkServer, image: GuardedImage, rtype: int) -> None:
    before = hashlib.sha256(image.read()).hexdigest()
    client, driver = connect(server)
    start = len(server.log())
    with client:
        if rtype == B.VIRTIO_BLK_T_IN:
            driver.submit(rtype, 8, in_sgs=[(OUTSIDE, 4096)])
        else:
            driver.submit(rtype, 8, out_sgs=[(OUTSIDE, 4096)])
        driver.kick()
        assert needs_reset(client)
    server.wait_log(rf"points outside guest memory: 0x{OUTSIDE:x} \+4096", start=start)
    assert hashlib.sha256(image.read()).hexdigest() == before
    image.assert_outside_untouched()
    still_serving(server, image)


def test_modifying_a_read_only_disk_gets_ioerr(workdir: Path) -> None:
    ro_dir = workdir / "ro"
    ro_dir.mkdir()
    image = GuardedImage(ro_dir, 4 * MiB, fill=b"\x5a" * 4096)
    srv = BlkServer(image.path, ro_dir / "ro.sock", ["--readonly"], log_path=ro_dir / "log")
    try:
        client, driver = connect(srv)
        with client:
            assert driver.read_only
            segment = B.discard_write_zeroes_struct().pack(0, 64, 0)
            unmap = B.discard_write_zeroes_struct().pack(0, 64,
                                                         B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            ios = [driver.submit(B.VIRTIO_BLK_T_OUT, 0, out=os.urandom(4096)),
                   driver.submit(B.VIRTIO_BLK_T_DISCARD, 0, out=segment),
                   driver.submit(B.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=unmap)]
            read = driver.submit(B.VIRTIO_BLK_T_IN, 0, in_len=4096)
            driver.wait([*ios, read])
            assert [io.status for io in ios] == [IOERR, IOERR, IOERR]
            assert read.status == OK and read.data == b"\x5a" * 4096
        assert srv.stop() == 0
    finally:
        srv.close()
    assert image.read() == b"\x5a" * (4 * MiB)
    image.assert_outside_untouched()


def test_a_real_guest_is_served_after_all_that(server: BlkServer,
                                               image: GuardedImage) -> None:
    require_guest("uml")
    from pyvirtio.guest import UmlGuest

    script = (
        "dd if=/dev/urandom of=/tmp/data bs=4k count=64 2>/dev/null\n"
        "dd if=/tmp/data of=/dev/vda bs=4k seek=256 oflag=direct 2>/dev/null\n"
        "result wrote $(sha256sum /tmp/data | cut -d' ' -f1)\n"
        "result read $(dd if=/dev/vda bs=4k skip=256 count=64 iflag=direct 2>/dev/null | "
        "sha256sum | cut -d' ' -f1)\n"
    )
    result = UmlGuest(script, kernel_args=server.banner_args("uml"), timeout=60).run()
    result.check()
    assert result.results["read"] == result.results["wrote"]
    assert hashlib.sha256(image.read(256 * 4096, 64 * 4096)).hexdigest() == \
        result.results["wrote"]
    assert server.stop() == 0
    image.assert_outside_untouched()


def test_direct_io_and_sigint_shutdown(workdir: Path) -> None:
    """``--direct`` (O_DIRECT) serves the same bytes; Ctrl-C (SIGINT) stops the server
    cleanly: exit status 0, the socket file removed, every completed write in the image."""
    d = workdir / "direct"
    d.mkdir()
    image = GuardedImage(d, 4 * MiB)
    srv = BlkServer(image.path, d / "direct.sock", ["--direct"], log_path=d / "log")
    try:
        assert "O_DIRECT" in srv.output()
        client, driver = connect(srv)
        with client:
            data = os.urandom(64 << 10)
            driver.write(2048, data, timeout=10)
            assert driver.read(2048, len(data) // 512, timeout=10) == data
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(20) == 0
    finally:
        srv.close()
    assert not srv.sock.exists()
    assert "signal SIGINT, shutting down" in srv.log()
    assert image.read(2048 * 512, 64 << 10) == data
    image.assert_outside_untouched()
