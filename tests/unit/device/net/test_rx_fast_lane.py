"""virtio-net's receive fast lane (split ring, MRG_RXBUF): a frame goes into one-descriptor
receive buffers taken straight from the ring, with the same header, ``num_buffers`` and
exact used lengths as the general path; a buffer the lane does not take (a chained one)
goes to the general path, and the packed ring (no such pop yet) always does."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.net import features_without, mac, probe
from pyvirtio.device.net import NetDevice, link
from pyvirtio.driver.net import NetDriver, RxBuffer
from pyvirtio.spec import features as F
from pyvirtio.testing.pair import DevicePair

SPLIT = features_without(F.RING_PACKED)


def frame_of(size: int, fill: int = 0) -> bytes:
    return mac(2) + mac(1) + b"\x88\xb5" + bytes((fill + i * 7) & 0xFF for i in range(size - 14))


def pair_of(rx_options: dict[str, object], features: int | None = SPLIT
            ) -> tuple[DevicePair, NetDriver, DevicePair, NetDriver]:
    a = DevicePair(NetDevice(mac(1)), memory_size=8 << 20)
    b = DevicePair(NetDevice(mac(2)), memory_size=8 << 20)
    link(a.device, b.device)
    return (a, probe(a, features=features), b,
            probe(b, NetDriver.with_options(**rx_options), features))


@given(size=st.integers(min_value=14, max_value=9000),
       buf_len=st.integers(min_value=64, max_value=4096))
@settings(max_examples=40, deadline=None)
def test_any_frame_lands_intact_through_the_fast_lane(size: int, buf_len: int) -> None:
    a, da, b, db = pair_of({"mergeable_buf_len": buf_len})
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


def test_frames_of_changing_sizes_take_exactly_the_buffers_they_need() -> None:
    # The lane guesses how many buffers to pop from the last size it saw; a wrong guess
    # must neither waste buffers nor leave any popped but unused.
    a, da, b, db = pair_of({"mergeable_buf_len": 512})
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


def test_a_chained_receive_buffer_is_filled_by_the_general_path() -> None:
    a, da, b, db = pair_of({"rx_buffers": 1, "mergeable_buf_len": 2048})
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


def test_the_packed_ring_goes_through_the_general_path() -> None:
    a, da, b, db = pair_of({"mergeable_buf_len": 1024}, features=None)
    try:
        assert b.device.driver_features & F.bit(F.RING_PACKED)
        frame = frame_of(1500)
        da.send(frame)
        (got,) = db.recv_all()
        assert got.data == frame
        assert b.device.stats.rx_fast == 0 and b.device.stats.rx_frames == 1
    finally:
        a.close()
        b.close()
