"""The raw-image back-end on its own and under the device: zero-copy vectored I/O into
guest memory, O_DIRECT with its bounce path, hole punching, and real I/O errors turning
into IOERR instead of exceptions."""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.blk import SECTOR, TAIL_GUARD, GuardedImage, RawRequest, blk_pair, header, sha
from pyvirtio.device.blk.file import IOV_MAX, FileBackend, buffer_address
from pyvirtio.errors import LocalError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec import blk as B


@pytest.fixture
def image(tmp_path: Path) -> GuardedImage:
    return GuardedImage(tmp_path, 2048 * SECTOR, seed=1)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.anonymous(8 << 20)
    yield mem
    mem.close()


def _shm_dir() -> Path | None:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


# ---- geometry ---------------------------------------------------------------------------


def test_capacity_is_the_file_size_rounded_down_to_whole_blocks(image: GuardedImage) -> None:
    backend = FileBackend(image.path)
    try:
        assert os.path.getsize(image.path) == image.sectors * SECTOR + TAIL_GUARD
        assert backend.size == image.sectors * SECTOR
        assert backend.block_size == SECTOR
    finally:
        backend.close()


def test_a_path_that_is_not_a_file_or_block_device_is_refused() -> None:
    with pytest.raises(LocalError, match="neither"):
        FileBackend("/dev/zero", read_only=True)


# ---- vectored I/O straight into guest memory --------------------------------------------


def test_readv_fills_guest_memory_views_in_place(image: GuardedImage,
                                                 memory: GuestMemory) -> None:
    backend = FileBackend(image.path)
    try:
        # three views of guest memory of odd sizes, one straddling a page boundary
        views = [memory.view(0x1000 - 100, 300), memory.view(0x5000, 212), memory.view(0, 512)]
        backend.readv(SECTOR, views, 1024)
        assert memory.read(0x1000 - 100, 300) == bytes(image.content[512:812])
        assert memory.read(0x5000, 212) == bytes(image.content[812:1024])
        assert memory.read(0, 512) == bytes(image.content[1024:1536])
    finally:
        backend.close()


def test_writev_with_more_segments_than_iov_max_writes_them_all(
        image: GuardedImage, memory: GuestMemory) -> None:
    nseg = IOV_MAX + 500
    data = os.urandom(nseg * 8)
    memory.write(0, data)
    views = [memory.view(i * 8, 8) for i in range(nseg)]
    backend = FileBackend(image.path)
    try:
        backend.writev(4 * SECTOR, views, len(data))
        back = [memory.view(0x400000 + i * 8, 8) for i in range(nseg)]
        backend.readv(4 * SECTOR, back, len(data))
    finally:
        backend.close()
    assert memory.read(0x400000, len(data)) == data
    image.content[4 * SECTOR : 4 * SECTOR + len(data)] = data
    image.assert_matches_model()


def test_a_read_past_the_end_of_a_shrunken_image_is_an_error_not_a_hang(
        image: GuardedImage, memory: GuestMemory) -> None:
    backend = FileBackend(image.path)
    try:
        os.truncate(image.path, 100 * SECTOR)  # someone shrinks the image under us
        with pytest.raises(OSError, match="ended early"):
            backend.readv(99 * SECTOR, [memory.view(0, 2 * SECTOR)], 2 * SECTOR)
    finally:
        backend.close()


# ---- I/O errors become IOERR --------------------------------------------------------------


def test_a_write_the_kernel_refuses_completes_with_ioerr(image: GuardedImage) -> None:
    """RLIMIT_FSIZE makes the kernel fail writes beyond the limit with EFBIG: a real I/O
    error, answered with IOERR while the device keeps serving."""
    with blk_pair(image.path) as (_, device, drv):
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, old_limit[1]))
            io = drv.submit_write(1024, os.urandom(4 * SECTOR))  # at 512 KiB
            drv.wait(io)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        assert io.status == B.VIRTIO_BLK_S_IOERR
        assert device.stats.ioerr == 1
        assert drv.read(1024, 4) == bytes(image.content[1024 * SECTOR : 1028 * SECTOR])
        drv.write(1024, b"\x5a" * SECTOR)  # and writes work again
        image.content[1024 * SECTOR : 1025 * SECTOR] = b"\x5a" * SECTOR
    image.assert_matches_model()


def test_a_read_from_a_shrunken_image_completes_with_ioerr(image: GuardedImage) -> None:
    with blk_pair(image.path) as (pair, device, drv):
        os.truncate(image.path, 1000 * SECTOR)
        assert device.capacity == image.sectors  # the device still believes the old size
        req = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_IN, 1500), in_lens=(SECTOR, 1))
        assert req.run() == (B.VIRTIO_BLK_S_IOERR, SECTOR + 1)
        assert req.in_data() == bytes(SECTOR)  # no stale bytes claimed as written
        assert drv.read(0, 2) == bytes(image.content[: 2 * SECTOR])


# ---- O_DIRECT -----------------------------------------------------------------------------


def test_direct_io_probes_its_alignment_and_publishes_it(image: GuardedImage) -> None:
    backend = FileBackend(image.path, direct=True)
    try:
        assert backend.block_size in (512, 1024, 2048, 4096)
        with blk_pair(backend) as (_, _, drv):
            assert drv.block_size == backend.block_size
    finally:
        backend.close()


def test_aligned_direct_io_is_zero_copy(image: GuardedImage) -> None:
    backend = FileBackend(image.path, direct=True)
    try:
        with blk_pair(backend) as (_, _, drv):
            data = os.urandom(64 * SECTOR)
            drv.write(128, data)  # the driver's data buffers are page-aligned
            assert drv.read(128, 64) == data
            assert backend.bounced == 0
            image.content[128 * SECTOR : 192 * SECTOR] = data
    finally:
        backend.close()
    image.assert_matches_model()


def test_misaligned_guest_buffers_go_through_the_bounce_buffer(
        image: GuardedImage) -> None:
    backend = FileBackend(image.path, direct=True)
    bs = backend.block_size
    try:
        with blk_pair(backend) as (pair, _, drv):
            data = os.urandom(2 * bs)
            # a write from two segments of odd sizes at odd guest addresses
            base = pair.allocator.alloc(4 * bs, 4096)
            pair.memory.write(base + 100, data[:300])
            pair.memory.write(base + 2 * bs + 7, data[300:])
            view = pair.memory.view(base + 100, 300)
            assert buffer_address(view) % bs != 0
            view.release()
            io = drv.submit(B.VIRTIO_BLK_T_OUT, 64,
                            out_sgs=[(base + 100, 300), (base + 2 * bs + 7, 2 * bs - 300)])
            drv.result(io)
            assert backend.bounced == 1
            rd = drv.submit(B.VIRTIO_BLK_T_IN, 64,
                            in_sgs=[(base + 3, 1000), (base + 3 * bs + 1, 2 * bs - 1000)])
            drv.result(rd)
            assert backend.bounced == 2
            got = pair.memory.read(base + 3, 1000) + pair.memory.read(base + 3 * bs + 1,
                                                                      2 * bs - 1000)
            assert sha(got) == sha(data)
            image.content[64 * SECTOR : 64 * SECTOR + 2 * bs] = data
    finally:
        backend.close()
    image.assert_matches_model()


# ---- discard and write zeroes -------------------------------------------------------------


def test_discard_and_write_zeroes_never_grow_the_file(image: GuardedImage) -> None:
    backend = FileBackend(image.path)
    try:
        end = backend.size
        backend.discard(end - 64 * SECTOR, 64 * SECTOR)
        backend.write_zeroes(end - 32 * SECTOR, 32 * SECTOR, unmap=False)
        backend.write_zeroes(end - 16 * SECTOR, 16 * SECTOR, unmap=True)
    finally:
        backend.close()
    image.content[-64 * SECTOR :] = bytes(64 * SECTOR)
    image.assert_matches_model()


@pytest.mark.skipif(_shm_dir() is None, reason="no writable /dev/shm")
def test_write_zeroes_falls_back_to_writing_zeroes_where_zero_range_is_missing(
        tmp_path: Path) -> None:
    """tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: zeroes are written instead, so
    the blocks stay allocated."""
    shm = _shm_dir()
    assert shm is not None
    path = shm / f"pyvirtio-blk-test-{os.getpid()}.img"
    path.write_bytes(os.urandom(1 << 20))
    backend = FileBackend(path)
    try:
        before = os.stat(path).st_blocks
        backend.write_zeroes(0, 256 << 10, unmap=False)
        assert os.stat(path).st_blocks == before
        with open(path, "rb") as f:
            assert f.read(256 << 10) == bytes(256 << 10)
        backend.write_zeroes(512 << 10, 256 << 10, unmap=True)
        assert os.stat(path).st_blocks < before  # hole punched
        assert os.path.getsize(path) == 1 << 20
    finally:
        backend.close()
        path.unlink()


def test_a_read_only_backend_cannot_discard(image: GuardedImage) -> None:
    backend = FileBackend(image.path, read_only=True)
    try:
        assert backend.read_only and not backend.can_discard
        with pytest.raises(OSError):
            backend.writev(0, [memoryview(bytearray(SECTOR))], SECTOR)
    finally:
        backend.close()
    image.assert_matches_model()
