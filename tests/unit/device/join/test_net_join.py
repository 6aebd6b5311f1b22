"""Two guests' virtio-net queues joined point to point (pyvirtio join net), each guest a
pyvirtio net driver in its own memory (DevicePair). Frames are built byte by byte
(helpers.net) and checked with the helpers' own checksum code."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.net import (
    features_without,
    l4_checksum_ok,
    mac,
    probe,
    tcp_tso_frame,
    udp_frame,
)
from pyvirtio.device.join import Join, JoinNetSide, parse_features
from pyvirtio.device.net import NetDevice, NetHdr
from pyvirtio.driver.net import NetDriver
from pyvirtio.errors import LocalError
from pyvirtio.spec import net as N
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair

A, B = mac(1), mac(2)
NO_GUEST_OFFLOADS = (N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_TSO6,
                     N.VIRTIO_NET_F_GUEST_CSUM)


class Wire:
    def __init__(self, **kwargs: object) -> None:
        self.join = Join("net", macs=[A, B], **kwargs)  # type: ignore[arg-type]
        self.pairs = [DevicePair(side) for side in self.join.sides]
        self.drivers: list[NetDriver] = []

    def side(self, i: int) -> JoinNetSide:
        side = self.join.sides[i]
        assert isinstance(side, JoinNetSide)
        return side

    def close(self) -> None:
        for pair in self.pairs:
            pair.close()


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    yield w
    w.close()


def frame(dst: bytes, src: bytes, tag: int, size: int = 60) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([tag]) * (size - 14)


def test_frames_cross_both_ways_whatever_the_destination_address(wire: Wire) -> None:
    a, b = probe(wire.pairs[0]), probe(wire.pairs[1])
    assert a.config_mac() == A and b.config_mac() == B
    sent = [frame(B, A, 1), frame(b"\xff" * 6, A, 2, 1514), frame(mac(9), A, 3, 100)]
    for f in sent:
        a.send(f)
    assert [f.data for f in b.recv_all()] == sent  # no switch: nothing is filtered
    back = frame(A, B, 4, 999)
    b.send(back)
    assert [f.data for f in a.recv_all()] == [back]


def test_header_sizes_are_translated_between_drivers_with_and_without_mrg_rxbuf() -> None:
    w = Wire()
    try:
        a = probe(w.pairs[0], features=features_without(N.VIRTIO_NET_F_MRG_RXBUF))
        b = probe(w.pairs[1], NetDriver.with_options(mergeable_buf_len=512))
        assert a.hdr_len == 12 and not a.mergeable and b.mergeable  # VERSION_1: 12 bytes
        big = frame(B, A, 7, 1514)
        a.send(big)
        (got,) = b.recv_all()
        assert got.data == big and got.num_buffers == 3  # spread over b's 512-byte buffers
        assert sum(got.lengths) == 12 + 1514
        b.send(frame(A, B, 8, 1514))
        assert [f.data for f in a.recv_all()] == [frame(A, B, 8, 1514)]
    finally:
        w.close()


def test_tso_from_a_guest_that_took_it_is_segmented_for_one_that_refused_it() -> None:
    w = Wire(withhold={1: parse_features("guest_csum,guest_tso4,guest_tso6",
                                         NetDevice.feature_names)})
    try:
        a, b = probe(w.pairs[0]), probe(w.pairs[1])
        assert w.side(0).has_feature(N.VIRTIO_NET_F_GUEST_TSO4)
        assert not w.side(1).has_feature(N.VIRTIO_NET_F_GUEST_TSO4)
        payload = bytes(range(256)) * 40
        f, hdr = tcp_tso_frame(A, B, payload, mss=1448)
        a.send(f, hdr)
        segs = b.recv_all()
        assert len(segs) == 8
        assert all(s.hdr == NetHdr() and l4_checksum_ok(s.data) for s in segs)
        assert b"".join(s.data[54:] for s in segs) == payload
        assert w.side(1).stats.rx_converted == 1
        # The other way the frame passes whole: side 0 took GUEST_TSO4.
        f2, hdr2 = tcp_tso_frame(B, A, payload, mss=1448)
        b_can_send_tso = w.side(1).has_feature(N.VIRTIO_NET_F_HOST_TSO4)
        assert b_can_send_tso
        b.send(f2, hdr2)
        (whole,) = a.recv_all()
        assert whole.data == f2 and whole.hdr == hdr2
    finally:
        w.close()


def test_partial_checksum_is_completed_for_a_receiver_without_guest_csum() -> None:
    w = Wire()
    try:
        a = probe(w.pairs[0])
        b = probe(w.pairs[1], features=features_without(*NO_GUEST_OFFLOADS))
        f, hdr = udp_frame(A, B, "10.0.0.1", "10.0.0.2", 5, 6, b"hi" * 30, partial=True)
        a.send(f, hdr)
        (got,) = b.recv_all()
        assert got.hdr.flags == 0 and l4_checksum_ok(got.data)
    finally:
        w.close()


def test_frames_for_a_side_without_a_driver_are_dropped_and_counted(wire: Wire) -> None:
    a = probe(wire.pairs[0])
    for i in range(300):  # more than a transmit ring: the sender must not stall
        a.send(frame(B, A, i & 0xFF))
    assert wire.side(1).stats.rx_dropped == 300
    b = probe(wire.pairs[1])
    a.send(frame(B, A, 1))
    assert [f.data for f in b.recv_all()] == [frame(B, A, 1)]


def test_a_receiver_out_of_buffers_makes_the_sender_wait_not_drop(wire: Wire) -> None:
    a = probe(wire.pairs[0])
    b = probe(wire.pairs[1], NetDriver.with_options(rx_buffers=2, mergeable_buf_len=2048))
    sent = [frame(B, A, i) for i in range(5)]
    for f in sent:
        a.send(f)
    got = [f.data for f in b.recv_all()]
    got += [f.data for f in b.recv_all()]  # each poll refills: the waiting chains resume
    got += [f.data for f in b.recv_all()]
    assert got == sent
    assert wire.side(1).stats.rx_dropped == 0 and wire.side(1).stats.rx_busy > 0


def test_hostile_transmit_chains_break_or_count_only_the_sender(wire: Wire) -> None:
    a, b = probe(wire.pairs[0]), probe(wire.pairs[1])
    pa = wire.pairs[0]
    short = pa.allocator.alloc(16)
    tvq = a.tx_vqs[0]
    tvq.add_buf([(short, 7)], [], token=(short, False))  # shorter than its header
    tvq.kick()
    assert wire.side(0).stats.tx_errors == 1 and b.recv_all() == []
    tvq.add_buf([(pa.memory.size + (1 << 20), 1500)], [], token=(0, True))
    tvq.kick()
    assert pa.device.status & S.DEVICE_NEEDS_RESET
    assert wire.pairs[1].device.problems == [] and b.recv_all() == []
    b.send(frame(A, B, 1))  # the broken side has no driver up: dropped, b goes on
    assert wire.side(0).stats.rx_dropped == 1
    wire.pairs[0].remove()
    a = probe(wire.pairs[0])
    a.send(frame(B, A, 2))
    assert [f.data for f in b.recv_all()] == [frame(B, A, 2)]


def test_hostile_receive_buffer_breaks_only_the_receiver(wire: Wire) -> None:
    a = probe(wire.pairs[0])
    b = probe(wire.pairs[1], NetDriver.with_options(rx_buffers=1))
    a.send(frame(B, A, 0))  # uses b's only good buffer
    pb = wire.pairs[1]
    rvq = b.rx_vqs[0]
    rvq.add_buf([], [(pb.memory.size + 4096, 2048)], token="outside")
    rvq.kick()
    a.send(frame(B, A, 1))
    assert pb.device.status & S.DEVICE_NEEDS_RESET
    assert wire.pairs[0].device.problems == []
    assert not wire.pairs[0].device.status & S.DEVICE_NEEDS_RESET
    a.send(frame(B, A, 2))  # no driver up on b now: dropped, a is not stalled


def test_a_net_join_has_two_sides_and_no_named_mapping() -> None:
    with pytest.raises(LocalError, match="exactly 2 sides"):
        Join("net", 3)
    with pytest.raises(LocalError, match="unknown feature"):
        parse_features("guest_tso9", NetDevice.feature_names)
