"""virtio-net's receive fast lane (MRG_RXBUF, split and packed ring): a frame goes into
one-descriptor receive buffers taken straight from the ring, with the same header,
``num_buffers`` and exact used lengths as the general path; a buffer the lane does not
take (a chained one) goes to the general path."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.net import features_without, mac, probe
from pyvirtio.device.net import NetDevice, link
from pyvirtio.driver.net import NetDriver, RxBuffer
from pyvirtio.spec import features as F
from pyvirtio.testing.pair import DevicePair

SPLIT = features_without(F.RING_PACKED)
PACKED = None  # the driver's defaults: it takes the packed ring our device offers
RINGS = pytest.mark.parametrize("features", [SPLIT, PACKED], ids=["split", "packed"])


def frame_of(size: int, fill: int = 0) -> bytes:
    return mac(2) + mac(1) + b"\x88\xb5" + bytes((fill + i * 7) & 0xFF for i in range(size - 14))


def pair_of(rx_options: dict[str, object], features: int | None = SPLIT
            ) -> tuple[DevicePair, NetDriver, DevicePair, NetDriver]:
    a = DevicePair(NetDevice(mac(1)), memory_size=8 << 20)
    b = DevicePair(NetDevice(mac(2)), memory_size=8 << 20)
    link(a.device, b.device)
    out = (a, probe(a, features=features), b,
           probe(b, NetDriver.with_options(**rx_options), features))
    assert bool(b.device.driver_features & F.bit(F.RING_PACKED)) == (features is PACKED)
    return out


@RINGS
@given(size=st.integers(min_value=14, max_value=9000),
       buf_len=st.integers(min_value=64, max_value=4096))
@settings(max_examples=25, deadline=None)
def test_any_frame_lands_intact_through_the_fast_lane(features: int | None, size: int,
                                                      buf_len: int) -> None:
    a, da, b, db = pair_of({"mergeable_buf_len": buf_len}, features)
    try:
        frame = frame_of(size)
        da.send(frame)
        (got,) = db.recv_all()
        assert got.data == frame
        assert got.num_buffers == -(-(12 + size) // buf_len)
        assert sum(got.lengths) == 12 + size and all(n <= buf_len for n in got.lengths)
        assert b.device.stats.rx_fast == 1 and b.device.stats.rx_frames == 1
    finally:
        a.close()
        b.close()


@RINGS
def test_frames_of_changing_sizes_take_exactly_the_buffers_they_need(
        features: int | None) -> None:
    a, da, b, db = pair_of({"mergeable_buf_len": 512}, features)
    try:
        sizes = [60, 3000, 60, 1500, 9000, 100]
        frames = [frame_of(n, fill=i) for i, n in enumerate(sizes)]
        for frame in frames:
            da.send(frame)
        got = []
        for _ in range(5):
            got += db.recv_all()
        assert [f.data for f in got] == frames
        assert [f.num_buffers for f in got] == [-(-(12 + n) // 512) for n in sizes]
        assert b.device.stats.rx_fast == len(sizes)
    finally:
        a.close()
        b.close()


@RINGS
def test_a_chained_receive_buffer_is_filled_by_the_general_path(features: int | None) -> None:
    a, da, b, db = pair_of({"rx_buffers": 1, "mergeable_buf_len": 2048}, features)
    try:
        first = frame_of(80, fill=1)
        da.send(first)  # fills B's only posted buffer, through the lane
        addr = b.allocator.alloc(2048)
        rvq = db.rx_vqs[0]
        rvq.add_buf([], [(addr, 1024), (addr + 1024, 1024)], token=RxBuffer(addr, 2048))
        rvq.kick()
        second = frame_of(1500, fill=2)
        da.send(second)
        got = []
        for _ in range(5):
            got += [f.data for f in db.recv_all()]
        assert got == [first, second]
        assert b.device.stats.rx_fast == 1 and b.device.stats.rx_frames == 2
    finally:
        a.close()
        b.close()
