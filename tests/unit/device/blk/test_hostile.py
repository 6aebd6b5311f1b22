"""A hostile or buggy driver against the blk device: every malformed request is answered
(IOERR / UNSUPP) or breaks the queue with a reason, and nothing outside the requested range
of the image, nor outside the image, is ever touched."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.blk import (
    SECTOR,
    GuardedImage,
    RawRequest,
    blk_pair,
    features,
    header,
    needs_reset,
    segments,
)
from pyvirtio.device.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.spec import blk as B
from pyvirtio.testing.pair import DevicePair

IOERR = B.VIRTIO_BLK_S_IOERR
UNSUPP = B.VIRTIO_BLK_S_UNSUPP
OK = B.VIRTIO_BLK_S_OK
UNMAP = B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP


@pytest.fixture
def image(tmp_path: Path) -> GuardedImage:
    return GuardedImage(tmp_path, 2048 * SECTOR, seed=1)


@pytest.fixture
def env(image: GuardedImage) -> Iterator[tuple[DevicePair, BlkDevice, BlkDriver]]:
    with blk_pair(image.path, max_discard_seg=4, max_discard_sectors=1024,
                  max_write_zeroes_seg=4, max_write_zeroes_sectors=1024) as trio:
        yield trio


# ---- out of range -----------------------------------------------------------------------


@pytest.mark.parametrize("sector, nbytes", [
    (2048, SECTOR),  # the first sector past the end
    (2047, 2 * SECTOR),  # starts inside, ends outside: nothing may be written
    (2048 * 1000, SECTOR),
    (1 << 55, SECTOR),  # sector * 512 == 2^64: wraps to offset 0 in 64-bit arithmetic
    ((1 << 64) - 1, SECTOR),  # sector * 512 + len wraps too
    ((1 << 64) - 1 - 3, 4 * SECTOR),
])
def test_requests_beyond_the_capacity_get_ioerr_and_touch_nothing(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage,
        sector: int, nbytes: int) -> None:
    pair, device, drv = env
    write = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_OUT, sector), out=os.urandom(nbytes))
    assert write.run() == (IOERR, 1)
    read = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_IN, sector), in_lens=(nbytes, 1))
    assert read.run() == (IOERR, nbytes + 1)
    assert read.in_data() == bytes(nbytes)  # zeroed, not stale guest bytes
    assert not needs_reset(device)
    assert drv.read(0, 8) == bytes(image.content[: 8 * SECTOR])  # still serving
    image.assert_matches_model()


@pytest.mark.parametrize("nbytes", [1, 100, SECTOR - 1, SECTOR + 1, 4 * SECTOR + 17])
def test_data_lengths_that_are_not_whole_sectors_get_ioerr(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage,
        nbytes: int) -> None:
    pair, _, drv = env
    write = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_OUT, 10), out=os.urandom(nbytes))
    assert write.run() == (IOERR, 1)
    read = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_IN, 10), in_lens=(nbytes, 1))
    assert read.run() == (IOERR, nbytes + 1)
    image.assert_matches_model()


def test_a_read_writes_only_into_its_own_buffer(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage) -> None:
    pair, _, drv = env
    req = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_IN, 3), in_lens=(2 * SECTOR, 1))
    (addr, n), _status = req.ins
    before, after = pair.memory.read(addr - 64, 64), pair.memory.read(addr + n, 64)
    assert req.run() == (OK, 2 * SECTOR + 1)
    assert req.in_data() == bytes(image.content[3 * SECTOR : 5 * SECTOR])
    assert pair.memory.read(addr - 64, 64) == before
    assert pair.memory.read(addr + n, 64) == after


# ---- read-only --------------------------------------------------------------------------


def test_writes_to_a_read_only_device_get_ioerr(image: GuardedImage) -> None:
    with blk_pair(image.path, read_only=True) as (pair, device, drv):
        for rtype, out in [
            (B.VIRTIO_BLK_T_OUT, os.urandom(4 * SECTOR)),
            (B.VIRTIO_BLK_T_DISCARD, segments((0, 64, 0))),
            (B.VIRTIO_BLK_T_WRITE_ZEROES, segments((0, 64, UNMAP))),
            (B.VIRTIO_BLK_T_WRITE_ZEROES, segments((0, 64, 0))),
        ]:
            assert RawRequest(pair, drv, header(rtype), out=out).run() == (IOERR, 1)
        assert not needs_reset(device)
    image.assert_matches_model()


# ---- framing errors break the queue -----------------------------------------------------


def test_a_chain_without_a_status_byte_breaks_the_queue_with_a_reason(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage) -> None:
    pair, device, drv = env
    req = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_OUT, 0), out=os.urandom(SECTOR),
                     in_lens=())
    req.vq.kick()
    ring = device.ring(0)
    assert ring is not None and ring.broken is not None
    assert "no writable status byte" in ring.broken
    assert needs_reset(device)
    assert any("no writable status byte" in p for p in device.problems)
    assert req.vq.get_buf() is None  # the chain is never completed
    # later requests on the broken queue are ignored until the driver resets the device
    io = drv.submit_read(0, 1)
    drv.kick()
    assert drv.poll() == 0 and not io.done
    image.assert_matches_model()


@pytest.mark.parametrize("hdr_len", [0, 1, 8, 15])
def test_a_header_shorter_than_16_bytes_breaks_the_queue(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage,
        hdr_len: int) -> None:
    pair, device, drv = env
    req = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_OUT, 0)[:hdr_len], in_lens=(1,))
    req.vq.kick()
    ring = device.ring(0)
    assert ring is not None and ring.broken is not None
    assert f"{hdr_len}-byte request header" in ring.broken
    assert needs_reset(device)
    image.assert_matches_model()


def test_a_descriptor_outside_guest_memory_breaks_the_queue(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage) -> None:
    pair, device, drv = env
    hdr = pair.allocator.alloc(16)
    pair.memory.write(hdr, header(B.VIRTIO_BLK_T_IN, 0))
    status = pair.allocator.alloc(1)
    outside = pair.memory.size + 4096
    vq = drv.vqs[0]
    vq.add_buf([(hdr, 16)], [(outside, SECTOR), (status, 1)], "hostile")
    vq.kick()
    ring = device.ring(0)
    assert ring is not None and ring.broken is not None
    assert "outside guest memory" in ring.broken and f"0x{outside:x}" in ring.broken
    assert needs_reset(device)
    image.assert_matches_model()


def test_the_device_works_again_after_a_reset(image: GuardedImage) -> None:
    with blk_pair(image.path) as (pair, device, drv):
        RawRequest(pair, drv, header(B.VIRTIO_BLK_T_IN, 0), in_lens=()).vq.kick()
        assert needs_reset(device)
        drv.remove()
        fresh = pair.probe()
        assert isinstance(fresh, BlkDriver)
        assert not needs_reset(device)
        assert fresh.read(0, 2) == bytes(image.content[: 2 * SECTOR])


# ---- unusual but legal layouts ----------------------------------------------------------


def test_headers_data_and_status_may_be_split_or_merged_across_descriptors(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage) -> None:
    pair, _, drv = env
    data = os.urandom(2 * SECTOR)
    # header split 4+12, then data in its own descriptor
    assert RawRequest(pair, drv, header(B.VIRTIO_BLK_T_OUT, 40), header_split=[4, 12],
                      out=data).run() == (OK, 1)
    image.content[40 * SECTOR : 42 * SECTOR] = data
    # header and data in one readable descriptor
    merged = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_OUT, 50) + data)
    assert merged.run() == (OK, 1)
    image.content[50 * SECTOR : 52 * SECTOR] = data
    # data and status in one writable descriptor; data split oddly over three
    read = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_IN, 40), in_lens=(100, 700, 225))
    assert read.run() == (OK, 2 * SECTOR + 1)
    assert read.in_data() == data
    image.assert_matches_model()


def test_extra_writable_bytes_before_the_status_of_a_write_are_zeroed(
        env: tuple[DevicePair, BlkDevice, BlkDriver]) -> None:
    pair, _, drv = env
    req = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_FLUSH), in_lens=(7, 1))
    assert req.run() == (OK, 8)  # used length covers all 8 bytes the device wrote
    assert req.in_data() == bytes(7)


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 15, 99, 0x80000000, 0xFFFFFFFF])
def test_unknown_or_unoffered_request_types_get_unsupp(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage,
        rtype: int) -> None:
    pair, device, drv = env
    req = RawRequest(pair, drv, header(rtype, 0), out=os.urandom(SECTOR), in_lens=(SECTOR, 1))
    assert req.run() == (UNSUPP, SECTOR + 1)
    assert req.in_data() == bytes(SECTOR)
    assert not needs_reset(device)
    image.assert_matches_model()


# ---- discard and write zeroes segments --------------------------------------------------


@pytest.mark.parametrize("rtype", [B.VIRTIO_BLK_T_DISCARD, B.VIRTIO_BLK_T_WRITE_ZEROES])
@pytest.mark.parametrize("payload, status", [
    pytest.param(segments((2040, 16, 0)), IOERR, id="segment-beyond-capacity"),
    pytest.param(segments((0, 8, 0), (2048, 1, 0)), IOERR, id="second-segment-beyond"),
    pytest.param(segments(((1 << 64) - 8, 16, 0)), IOERR, id="sector-wraps-64-bits"),
    pytest.param(segments((1 << 55, 8, 0)), IOERR, id="offset-wraps-to-zero"),
    pytest.param(segments((0, 2048, 0)), IOERR, id="more-than-max-sectors"),
    pytest.param(segments(*[(i * 8, 8, 0) for i in range(5)]), IOERR, id="too-many-segments"),
    pytest.param(segments((0, 8, 0))[:15], IOERR, id="not-a-multiple-of-16"),
    pytest.param(b"", IOERR, id="no-segment"),
    pytest.param(segments((0, 8, 4)), UNSUPP, id="unknown-flag"),
])
def test_bad_discard_and_write_zeroes_segments_change_nothing(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage,
        rtype: int, payload: bytes, status: int) -> None:
    pair, device, drv = env
    blocks = image.blocks()
    assert RawRequest(pair, drv, header(rtype), out=payload).run() == (status, 1)
    assert image.blocks() == blocks
    assert not needs_reset(device)
    image.assert_matches_model()


def test_discard_with_the_unmap_flag_is_unsupported(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage) -> None:
    pair, _, drv = env
    req = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_DISCARD), out=segments((0, 8, UNMAP)))
    assert req.run() == (UNSUPP, 1)
    image.assert_matches_model()


def test_discard_when_not_negotiated_is_unsupported(image: GuardedImage) -> None:
    with blk_pair(image.path,
                  features=features(without=[B.VIRTIO_BLK_F_DISCARD])) as (pair, _, drv):
        req = RawRequest(pair, drv, header(B.VIRTIO_BLK_T_DISCARD), out=segments((0, 8, 0)))
        assert req.run() == (UNSUPP, 1)
    image.assert_matches_model()


# ---- anything at all --------------------------------------------------------------------

_TYPES = st.one_of(
    st.sampled_from([0, 1, 4, 8, 11, 13, 2, 10, 14]), st.integers(0, (1 << 32) - 1))
_SECTORS = st.one_of(
    st.integers(0, 2100), st.sampled_from([1 << 55, (1 << 64) - 1, (1 << 63)]),
    st.integers(0, (1 << 64) - 1))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rtype=_TYPES, sector=_SECTORS, out_len=st.integers(0, 3 * SECTOR),
       in_lens=st.lists(st.integers(1, 2 * SECTOR), min_size=1, max_size=3),
       segs=st.lists(st.tuples(_SECTORS, st.integers(0, (1 << 32) - 1),
                               st.integers(0, 3)), max_size=5))
def test_arbitrary_requests_never_touch_anything_outside_the_image(
        env: tuple[DevicePair, BlkDevice, BlkDriver], image: GuardedImage, rtype: int,
        sector: int, out_len: int, in_lens: list[int],
        segs: list[tuple[int, int, int]]) -> None:
    pair, device, drv = env
    if rtype in (B.VIRTIO_BLK_T_DISCARD, B.VIRTIO_BLK_T_WRITE_ZEROES):
        out = segments(*[(s % (1 << 64), n, f) for s, n, f in segs])
    else:
        out = os.urandom(out_len)
    req = RawRequest(pair, drv, header(rtype, sector), out=out, in_lens=in_lens)
    status, written = req.run()
    assert status in (OK, IOERR, UNSUPP)
    assert written == sum(in_lens)
    assert not needs_reset(device)
    for addr in req.addrs:
        pair.allocator.free(addr)
    image.assert_outside_untouched()
