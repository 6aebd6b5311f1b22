"""virtio-blk device and driver together (DevicePair): every request type round-trips, the
image file on disk is what the driver wrote, and the cache mode and limits behave as
§5.2 says."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.blk import (
    SECTOR,
    GuardedImage,
    RawRequest,
    blk_pair,
    features,
    header,
    needs_reset,
    sha,
)
from pyvirtio.device.base import ConfigAccessError
from pyvirtio.device.blk import BlkBackend, BlkDevice, BlkRequest
from pyvirtio.device.blk.file import FileBackend
from pyvirtio.driver.blk import BlkDriver, BlkStatusError
from pyvirtio.errors import LocalError
from pyvirtio.ring import fresh_base
from pyvirtio.spec import blk as B
from pyvirtio.testing.process_pair import ProcessDevicePair

RING_VARIANTS = [
    pytest.param(dict(event_idx=True, indirect=True), id="event_idx+indirect"),
    pytest.param(dict(event_idx=False, indirect=False), id="plain"),
    pytest.param(dict(event_idx=True, indirect=False), id="event_idx"),
    pytest.param(dict(event_idx=False, indirect=True), id="indirect"),
]


@pytest.fixture
def image(tmp_path: Path) -> GuardedImage:
    return GuardedImage(tmp_path, 2048 * SECTOR, seed=1)


# ---- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("num_queues", [1, 3])
@pytest.mark.parametrize("ring", RING_VARIANTS)
def test_writes_and_reads_round_trip_and_reach_the_image_file(
        image: GuardedImage, ring: dict[str, bool], num_queues: int) -> None:
    rnd = random.Random(7)
    with blk_pair(image.path, num_queues=num_queues, features=features(**ring)) as (
            _, device, drv):
        assert drv.num_queues == num_queues
        for _ in range(40):
            count = rnd.choice([1, 2, 8, 16, 64])
            sector = rnd.randrange(0, image.sectors - count + 1)
            data = rnd.randbytes(count * SECTOR)
            drv.write(sector, data)
            image.content[sector * SECTOR : (sector + count) * SECTOR] = data
            got = drv.read(sector, count)
            assert sha(got) == sha(data)
        # the whole disk read back through the device equals the model, and the file too
        assert sha(drv.read(0, image.sectors)) == sha(bytes(image.content))
        assert device.stats.ioerr == 0
    image.assert_matches_model()


@pytest.mark.parametrize("ring", RING_VARIANTS)
def test_pipelined_batch_is_completed_with_fewer_kicks_than_requests(
        image: GuardedImage, ring: dict[str, bool]) -> None:
    rnd = random.Random(3)
    with blk_pair(image.path, num_queues=2, features=features(**ring)) as (pair, _, drv):
        writes = []
        for i in range(100):
            data = rnd.randbytes(SECTOR * 4)
            writes.append(drv.submit_write(i * 8, data))
            image.content[i * 8 * SECTOR : (i * 8 + 4) * SECTOR] = data
        kicks_before = pair.transport.kicks
        drv.wait(writes)
        assert all(io.ok and io.written == 1 for io in writes)
        assert pair.transport.kicks - kicks_before <= 2  # one per queue for the whole batch
        reads = [drv.submit_read(i * 8, 4) for i in range(100)]
        drv.wait(reads)
        for i, io in enumerate(reads):
            assert io.ok and io.written == 4 * SECTOR + 1
            assert io.data == bytes(image.content[i * 8 * SECTOR : (i * 8 + 4) * SECTOR])
    image.assert_matches_model()


def test_more_requests_than_ring_slots_are_queued_behind_completions(
        image: GuardedImage) -> None:
    with blk_pair(image.path, queue_size=8) as (_, _, drv):
        ios = [drv.submit_read(i, 1) for i in range(50)]  # a ring of 8 entries
        drv.wait(ios)
        assert [io.data for io in ios] == [
            bytes(image.content[i * SECTOR : (i + 1) * SECTOR]) for i in range(50)
        ]


def test_every_queue_serves_requests_independently(image: GuardedImage) -> None:
    with blk_pair(image.path, num_queues=4) as (_, device, drv):
        assert drv.num_queues == 4
        ios = [drv.submit_read(q * 10, 1, queue=q) for q in range(4) for _ in range(5)]
        drv.wait(ios)
        for q in range(4):
            ring = device.ring(q)
            # each queue popped and completed its own (on either ring format)
            assert ring is not None and not ring.in_flight()
            assert ring.used_idx == ring.last_avail_idx != fresh_base(device.driver_features)
        assert all(io.data == bytes(image.content[io.sector * SECTOR:(io.sector + 1) * SECTOR])
                   for io in ios)


def test_a_driver_without_mq_uses_one_queue(image: GuardedImage) -> None:
    with blk_pair(image.path, num_queues=4, features=features(mq=False)) as (_, device, drv):
        assert drv.num_queues == 1
        drv.write(0, b"\x11" * SECTOR)
        assert drv.read(0, 1) == b"\x11" * SECTOR
        assert device.ring(1) is None


def test_used_length_counts_data_and_status_byte(image: GuardedImage) -> None:
    with blk_pair(image.path) as (_, _, drv):
        read = drv.result(drv.submit_read(4, 3))
        assert read.written == 3 * SECTOR + 1
        write = drv.result(drv.submit_write(4, bytes(SECTOR)))
        assert write.written == 1
        flush = drv.result(drv.submit_flush())
        assert flush.written == 1
        get_id = drv.result(drv.submit_get_id())
        assert get_id.written == B.VIRTIO_BLK_ID_BYTES + 1


@pytest.mark.parametrize("serial, expected", [
    ("disk-7", b"disk-7"),
    ("0123456789abcdefghij", b"0123456789abcdefghij"),  # exactly 20 bytes: no NUL
    ("0123456789abcdefghijKLMN", b"0123456789abcdefghij"),  # truncated to 20
])
def test_get_id_returns_the_serial(image: GuardedImage, serial: str, expected: bytes) -> None:
    with blk_pair(image.path, serial=serial) as (_, _, drv):
        assert drv.get_id() == expected
        io = drv.result(drv.submit_get_id())
        assert io.data == expected.ljust(20, b"\0")


# ---- config space -----------------------------------------------------------------------


def test_config_publishes_capacity_and_limits(image: GuardedImage) -> None:
    with blk_pair(image.path, num_queues=2, max_discard_sectors=4096, max_discard_seg=3,
                  max_write_zeroes_sectors=2048, max_write_zeroes_seg=5,
                  queue_size=128) as (_, device, drv):
        # the partial sector at the end of the file is not part of the disk
        assert drv.capacity == image.sectors == device.capacity
        assert drv.block_size == 512
        assert drv.num_queues == 2
        assert drv.seg_max == 126
        assert drv.size_max == 1 << 20
        assert (drv.max_discard_sectors, drv.max_discard_seg) == (4096, 3)
        assert (drv.max_write_zeroes_sectors, drv.max_write_zeroes_seg) == (2048, 5)
        assert drv.write_zeroes_may_unmap
        assert drv.can_discard and drv.can_write_zeroes and not drv.read_only


def test_a_larger_logical_block_size_is_published_and_enforced(image: GuardedImage) -> None:
    with blk_pair(image.path, blk_size=4096) as (pair, _, drv):
        assert drv.block_size == 4096
        assert drv.read(8, 8) == bytes(image.content[8 * SECTOR : 16 * SECTOR])
        with pytest.raises(LocalError, match="aligned"):
            drv.read(1, 8)
        # the device refuses it too, when a driver ignores the block size
        req = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_IN, 1), in_lens=(4096, 1))
        assert req.run() == (B.VIRTIO_BLK_S_IOERR, 4097)


def test_capacity_change_is_announced_with_a_config_interrupt(image: GuardedImage) -> None:
    with blk_pair(image.path) as (pair, device, drv):
        with open(image.path, "r+b") as f:
            f.truncate(image.file_size + 8 * SECTOR)
        before = pair.transport.config_interrupts
        device.update_capacity()
        assert pair.transport.config_interrupts == before + 1
        drv.read_config()
        assert drv.capacity == image.sectors + 8  # 300 old tail bytes + 4096 new = 8 sectors


def test_config_space_is_read_only_except_the_writeback_byte(image: GuardedImage) -> None:
    with blk_pair(image.path) as (pair, _, _):
        with pytest.raises(ConfigAccessError):
            pair.transport.write_config(B.CFG_CAPACITY, bytes(8))
        with pytest.raises(ConfigAccessError):
            pair.transport.write_config(B.CFG_WRITEBACK, b"\0\0")


# ---- cache modes ------------------------------------------------------------------------


def _write_some(drv: BlkDriver, n: int) -> None:
    for i in range(n):
        drv.write(i, bytes([i]) * SECTOR)


def test_writeback_and_writethrough_toggle_through_the_config_byte(
        image: GuardedImage) -> None:
    with blk_pair(image.path) as (_, device, drv):
        backend = device.backend
        assert isinstance(backend, FileBackend)
        assert drv.writeback and not device.writethrough
        _write_some(drv, 5)
        assert backend.syncs == 0  # writeback: nothing is synced until a flush
        drv.flush()
        assert backend.syncs == 1

        drv.writeback = False
        assert not drv.writeback and device.writethrough
        _write_some(drv, 5)
        assert backend.syncs == 6  # writethrough: every write is followed by fdatasync
        drv.write_zeroes(100, 8)
        drv.discard(200, 8)
        assert backend.syncs == 8  # so is every other modification

        drv.writeback = True
        _write_some(drv, 5)
        assert backend.syncs == 8


def test_the_cache_mode_after_reset_is_the_configured_one(image: GuardedImage) -> None:
    with blk_pair(image.path, writeback=False) as (_, device, drv):
        assert not drv.writeback and device.writethrough
        drv.writeback = True
    with blk_pair(image.path, writeback=False) as (_, device, drv):
        assert not drv.writeback and device.writethrough


@pytest.mark.parametrize("without, writethrough", [
    ((B.VIRTIO_BLK_F_CONFIG_WCE,), False),  # FLUSH only: writeback, the driver flushes
    ((B.VIRTIO_BLK_F_CONFIG_WCE, B.VIRTIO_BLK_F_FLUSH), True),  # neither: writethrough
    ((B.VIRTIO_BLK_F_FLUSH,), True),  # CONFIG_WCE without FLUSH starts writethrough
])
def test_cache_mode_follows_the_negotiated_features(
        image: GuardedImage, without: tuple[int, ...], writethrough: bool) -> None:
    with blk_pair(image.path, features=features(without=without)) as (_, device, drv):
        assert device.writethrough is writethrough
        assert drv.writeback is (not writethrough)
        _write_some(drv, 3)
        backend = device.backend
        assert isinstance(backend, FileBackend)
        assert backend.syncs == (3 if writethrough else 0)


def test_writeback_cannot_be_set_without_config_wce(image: GuardedImage) -> None:
    with blk_pair(image.path, features=features(without=[B.VIRTIO_BLK_F_CONFIG_WCE])) as (
            pair, _, drv):
        with pytest.raises(LocalError):
            drv.writeback = False
        with pytest.raises(ConfigAccessError):
            pair.transport.write_config(B.CFG_WRITEBACK, b"\0")


def test_a_device_without_flush_never_syncs(image: GuardedImage) -> None:
    with blk_pair(image.path, flush=False, config_wce=False) as (_, device, drv):
        _write_some(drv, 3)
        backend = device.backend
        assert isinstance(backend, FileBackend)
        assert backend.syncs == 0 and not device.writethrough


# ---- discard and write zeroes -----------------------------------------------------------


def test_discard_gives_space_back_to_the_file_system(image: GuardedImage) -> None:
    with blk_pair(image.path) as (_, device, drv):
        before = image.blocks()
        drv.discard(0, 1024)  # the first 512 KiB
        after = image.blocks()
        assert after <= before - 1024 * SECTOR // 512 + 8  # st_blocks are 512-byte units
        assert device.stats.discards == 1
    image.content[: 1024 * SECTOR] = bytes(1024 * SECTOR)  # a punched hole reads as zeroes
    image.assert_matches_model()


def test_multi_segment_discard_punches_every_range(image: GuardedImage) -> None:
    with blk_pair(image.path) as (_, _, drv):
        before = image.blocks()
        drv.result(drv.submit_discard([(0, 256), (512, 256), (1024, 256)]))
        assert image.blocks() <= before - 3 * 256 + 8
        for start in (0, 512, 1024):
            image.content[start * SECTOR : (start + 256) * SECTOR] = bytes(256 * SECTOR)
    image.assert_matches_model()


def test_write_zeroes_with_unmap_deallocates_and_reads_zeroes(image: GuardedImage) -> None:
    with blk_pair(image.path) as (_, _, drv):
        before = image.blocks()
        drv.write_zeroes(512, 512, unmap=True)
        assert image.blocks() <= before - 512 + 8
        assert drv.read(512, 512) == bytes(512 * SECTOR)
    image.content[512 * SECTOR : 1024 * SECTOR] = bytes(512 * SECTOR)
    image.assert_matches_model()


def test_write_zeroes_without_unmap_keeps_the_blocks_allocated(image: GuardedImage) -> None:
    with blk_pair(image.path) as (_, _, drv):
        before = image.blocks()
        drv.write_zeroes(100, 300, unmap=False)
        assert drv.read(100, 300) == bytes(300 * SECTOR)
        assert image.blocks() >= before  # zeroed in place (ZERO_RANGE), not punched
    image.content[100 * SECTOR : 400 * SECTOR] = bytes(300 * SECTOR)
    image.assert_matches_model()


def test_large_discards_are_split_to_the_device_limits(image: GuardedImage) -> None:
    with blk_pair(image.path, max_discard_sectors=64, max_discard_seg=2) as (_, device, drv):
        drv.discard(0, 1000)
        assert device.stats.discards == 8  # 16 segments of <= 64 sectors, 2 per request
    image.content[: 1000 * SECTOR] = bytes(1000 * SECTOR)
    image.assert_matches_model()


# ---- read-only --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["device", "backend"])
def test_a_read_only_device_reads_but_refuses_every_modification(
        image: GuardedImage, how: str) -> None:
    backend: str | Path | FileBackend = image.path
    kwargs: dict[str, bool] = {}
    if how == "device":
        kwargs["read_only"] = True
    else:
        backend = FileBackend(image.path, read_only=True)
    try:
        with blk_pair(backend, **kwargs) as (pair, device, drv):
            assert drv.read_only
            assert not drv.can_discard and not drv.can_write_zeroes
            assert drv.read(0, 4) == bytes(image.content[: 4 * SECTOR])
            with pytest.raises(LocalError, match="read-only"):
                drv.write(0, bytes(SECTOR))
            for rtype, out in [
                (B.VIRTIO_BLK_T_OUT, os.urandom(SECTOR)),
                (B.VIRTIO_BLK_T_DISCARD, B.discard_write_zeroes_struct().pack(0, 8, 0)),
                (B.VIRTIO_BLK_T_WRITE_ZEROES, B.discard_write_zeroes_struct().pack(0, 8, 1)),
            ]:
                req = RawRequest(pair, drv, header(rtype, 0), out=out)
                assert req.run() == (B.VIRTIO_BLK_S_IOERR, 1)
            drv.flush()  # nothing to make stable, but not an error
            assert device.stats.ioerr == 3
            assert not needs_reset(device)
    finally:
        if isinstance(backend, FileBackend):
            backend.close()
    image.assert_matches_model()


# ---- asynchronous back-ends -------------------------------------------------------------


class DeferredBackend(BlkBackend):
    """An asynchronous back-end stand-in: requests wait until the test releases them, in
    any order (what an io_uring or thread-pool back-end does to the device)."""

    asynchronous = True

    def __init__(self, inner: FileBackend) -> None:
        self.inner = inner
        self.block_size = inner.block_size
        self.physical_block_size = inner.physical_block_size
        self.can_discard = inner.can_discard
        self.waiting: list[tuple[BlkRequest, Callable[[BlkRequest, int], None]]] = []
        self.drained = 0

    @property
    def size(self) -> int:
        return self.inner.size

    def submit(self, req: BlkRequest, done: Callable[[BlkRequest, int], None]) -> None:
        self.waiting.append((req, done))

    def release(self, reverse: bool = False) -> int:
        batch, self.waiting = self.waiting, []
        for req, done in reversed(batch) if reverse else batch:
            done(req, self.inner.execute(req))
        return len(batch)

    def drain(self) -> None:
        self.drained += self.release()


def test_an_asynchronous_backend_completes_out_of_order(image: GuardedImage) -> None:
    inner = FileBackend(image.path)
    backend = DeferredBackend(inner)
    try:
        with blk_pair(backend) as (pair, _, drv):
            data = os.urandom(8 * SECTOR)
            write = drv.submit_write(16, data)
            drv.kick()
            assert not write.done and len(backend.waiting) == 1
            backend.release()
            drv.poll()
            assert write.ok
            reads = [drv.submit_read(16 + i, 1) for i in range(8)]
            drv.kick()
            irqs = pair.transport.interrupts
            assert backend.release(reverse=True) == 8
            drv.poll()
            assert pair.transport.interrupts > irqs
            assert b"".join(io.data or b"" for io in reads) == data
            image.content[16 * SECTOR : 24 * SECTOR] = data
    finally:
        inner.close()
    image.assert_matches_model()


def test_completions_arriving_after_a_reset_are_dropped(image: GuardedImage) -> None:
    inner = FileBackend(image.path)
    backend = DeferredBackend(inner)
    try:
        with blk_pair(backend) as (pair, device, drv):
            io = drv.submit_read(0, 1)
            drv.kick()
            ring = device.ring(0)
            assert ring is not None and ring.in_flight()
            fresh = fresh_base(device.driver_features)
            pair.transport.reset()  # the device drains the back-end on reset
            assert backend.drained == 1
            # the late completion never reached the old ring
            assert ring.used_idx == fresh
            assert not io.done
    finally:
        inner.close()


# ---- the device in another process ------------------------------------------------------


def test_a_blk_device_in_a_child_process_serves_the_driver(image: GuardedImage) -> None:
    with ProcessDevicePair("pyvirtio.device.blk:BlkDevice",
                           {"backend": str(image.path), "num_queues": 2}) as pair:
        drv = pair.probe()
        assert isinstance(drv, BlkDriver)
        assert drv.capacity == image.sectors and drv.num_queues == 2
        data = os.urandom(32 * SECTOR)
        ios = [drv.submit_write(64 + i * 4, data[i * 4 * SECTOR : (i + 1) * 4 * SECTOR])
               for i in range(8)]
        drv.wait(ios)
        drv.flush()
        assert drv.read(64, 32) == data
        with pytest.raises(BlkStatusError):
            drv.result(drv.submit(B.VIRTIO_BLK_T_IN, image.sectors, in_len=SECTOR))
        image.content[64 * SECTOR : 96 * SECTOR] = data
    image.assert_matches_model()


def test_a_device_given_a_path_closes_its_backend(image: GuardedImage) -> None:
    device = BlkDevice(image.path)
    backend = device.backend
    assert isinstance(backend, FileBackend)
    device.close()
    assert backend.fd == -1
