"""virtio-net device against the pyvirtio net driver, in memory (DevicePair).

Two devices are joined either by a direct cable (``link``) or to a recording endpoint that
keeps copies of what the device hands on; every assertion is on what the peer actually got.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.net import (
    BROADCAST,
    arp_request,
    features_without,
    inet_sum,
    ipv4_header_ok,
    l4_checksum_ok,
    mac,
    probe,
    tcp_tso_frame,
    udp_frame,
)
from pyvirtio.device.net import (
    Delivery,
    Frame,
    NetDevice,
    NetEndpoint,
    NetHdr,
    Offload,
    frame_bytes,
    link,
)
from pyvirtio.device.net.offload import complete_checksum
from pyvirtio.driver.base import DeviceRefusedFeatures
from pyvirtio.driver.net import NetDriver, RxBuffer
from pyvirtio.ring import fresh_base
from pyvirtio.spec import features as F
from pyvirtio.spec import net as N
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair

MakePair = Callable[..., DevicePair]


class Recorder(NetEndpoint):
    """A peer that keeps a copy of every frame it is sent; can be told to answer BUSY."""

    def __init__(self) -> None:
        self.frames: list[tuple[NetHdr, bytes]] = []
        self.busy = False
        self.ready_calls = 0

    def receive(self, hdr: NetHdr, frame: Frame, length: int, *,
                flush: bool = True) -> Delivery:
        if self.busy:
            return Delivery.BUSY
        self.frames.append((hdr, frame_bytes(frame, length)))
        return Delivery.DELIVERED

    def peer_ready(self) -> None:
        self.ready_calls += 1


@pytest.fixture
def make_pair() -> Iterator[MakePair]:
    pairs: list[DevicePair] = []

    def make(n: int, legacy: bool = False, **kwargs: object) -> DevicePair:
        pair = DevicePair(NetDevice(mac(n), name=f"net{n}", **kwargs),  # type: ignore[arg-type]
                          legacy=legacy)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


def cable(make_pair: MakePair, a_driver: type[NetDriver] = NetDriver,
          b_driver: type[NetDriver] = NetDriver, a_features: int | None = None,
          b_features: int | None = None, **kwargs: object
          ) -> tuple[DevicePair, NetDriver, DevicePair, NetDriver]:
    a, b = make_pair(1, **kwargs), make_pair(2, **kwargs)
    link(a.device, b.device)
    return a, probe(a, a_driver, a_features), b, probe(b, b_driver, b_features)


def payload_frame(dst: bytes, src: bytes, size: int, fill: int = 0x5A) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([fill]) * (size - 14)


# ---- basics ------------------------------------------------------------------------------

def test_frame_crosses_a_cable_between_two_devices_unchanged(make_pair: MakePair) -> None:
    _, da, _, db = cable(make_pair)
    frame = arp_request(mac(1), "10.0.0.1", "10.0.0.2")
    da.send(frame)
    got = db.recv_all()
    assert [f.data for f in got] == [frame]
    assert got[0].hdr == NetHdr()


def test_config_space_holds_mac_link_status_and_queue_pairs(make_pair: MakePair) -> None:
    pair = make_pair(7, queue_pairs=3, mtu=9000)
    drv = probe(pair)
    assert drv.mac == mac(7)
    assert drv.link_up
    assert drv.max_queue_pairs == 3
    assert drv.mtu == 9000
    assert pair.device.hdr_len == 12


def test_link_down_raises_config_interrupt_and_drops_frames(make_pair: MakePair) -> None:
    _, da, b, db = cable(make_pair)
    before = b.transport.config_interrupts
    b.device.set_link(False)
    assert b.transport.config_interrupts == before + 1
    assert not db.link_up
    da.send(arp_request(mac(1), "10.0.0.1", "10.0.0.2"))
    assert db.recv_all() == []
    assert b.device.stats.rx_dropped == 1
    b.device.set_link(True)
    da.send(arp_request(mac(1), "10.0.0.1", "10.0.0.2"))
    assert len(db.recv_all()) == 1


def test_transmit_hands_the_frame_and_header_fields_to_the_peer(make_pair: MakePair) -> None:
    pair = make_pair(1)
    rec = Recorder()
    link(pair.device, rec)
    drv = probe(pair)
    frame, hdr = udp_frame(mac(1), mac(2), "10.0.0.1", "10.0.0.2", 1, 2, b"hello",
                           partial=True)
    drv.send(frame, hdr)
    assert rec.frames == [(hdr, frame)]
    assert pair.device.stats.tx_frames == 1
    assert pair.device.stats.tx_bytes == len(frame)


def test_header_in_its_own_descriptor_is_parsed(make_pair: MakePair) -> None:
    pair = make_pair(1)
    rec = Recorder()
    link(pair.device, rec)
    drv = probe(pair, NetDriver.with_options(tx_split_header=True))
    frame, hdr = udp_frame(mac(1), mac(2), "10.0.0.1", "10.0.0.2", 1, 2, b"x" * 100,
                           partial=True)
    drv.send(frame, hdr)
    assert rec.frames == [(hdr, frame)]


def test_legacy_driver_uses_the_10_byte_header(make_pair: MakePair) -> None:
    legacy = features_without(F.VERSION_1, N.VIRTIO_NET_F_MRG_RXBUF)
    a, da, _, db = cable(make_pair, a_features=legacy, b_features=legacy, legacy=True)
    assert da.hdr_len == 10 and a.device.hdr_len == 10
    frame = payload_frame(mac(2), mac(1), 200)
    da.send(frame)
    got = db.recv_all()
    assert [f.data for f in got] == [frame]
    assert got[0].lengths == (10 + 200,)


# ---- receive buffers ---------------------------------------------------------------------

def test_mergeable_frame_spans_buffers_with_exact_used_lengths(make_pair: MakePair) -> None:
    small = NetDriver.with_options(mergeable_buf_len=256)
    _, da, _, db = cable(make_pair, b_driver=small)
    frame = payload_frame(mac(2), mac(1), 1000)
    da.send(frame)
    (got,) = db.recv_all()
    assert got.data == frame
    assert got.num_buffers == 4  # 12 + 1000 bytes in 256-byte buffers
    assert got.lengths == (256, 256, 256, 12 + 1000 - 3 * 256)


def test_without_mrg_rxbuf_a_frame_too_big_for_the_buffer_is_dropped(
        make_pair: MakePair) -> None:
    plain = features_without(N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_GUEST_TSO4,
                             N.VIRTIO_NET_F_GUEST_TSO6)
    a, da, b, db = cable(make_pair, b_features=plain)
    assert db.rx_buf_len == 12 + 1518
    da.send(payload_frame(mac(2), mac(1), 2000))
    da.send(payload_frame(mac(2), mac(1), 1518))
    got = db.recv_all()
    assert [len(f.data) for f in got] == [1518]  # the small buffer survived for the next
    assert b.device.stats.rx_dropped == 1
    assert a.device.stats.tx_frames == 2


def test_big_buffers_without_mrg_hold_a_64k_frame(make_pair: MakePair) -> None:
    big = features_without(N.VIRTIO_NET_F_MRG_RXBUF)
    _, da, _, db = cable(make_pair, b_features=big)
    assert db.big_packets
    frame, hdr = tcp_tso_frame(mac(1), mac(2), bytes(range(256)) * 250, mss=1448)
    da.send(frame, hdr)
    (got,) = db.recv_all()
    assert got.data == frame
    assert got.hdr.gso_type == N.VIRTIO_NET_HDR_GSO_TCPV4


def test_used_length_is_what_was_written_and_stale_bytes_are_never_reported(
        make_pair: MakePair) -> None:
    _, da, b, db = cable(make_pair, b_driver=NetDriver.with_options(mergeable_buf_len=512))
    # Poison every posted receive buffer: anything reported but not written would show.
    for addr, size in db.rx_pools:
        b.memory.write(addr, b"\xee" * size)
    for size in (60, 500, 1500, 1514):
        frame = payload_frame(mac(2), mac(1), size, fill=0x11)
        da.send(frame)
        (got,) = db.recv_all()
        assert sum(got.lengths) == 12 + size
        assert got.data == frame
        assert b"\xee" not in got.data


def test_receive_batch_is_published_with_one_interrupt(make_pair: MakePair) -> None:
    pair = make_pair(2)
    drv = probe(pair)
    dev = pair.device
    before = pair.transport.interrupts
    frames = [payload_frame(mac(2), mac(1), 100, fill=i) for i in range(10)]
    for f in frames:
        assert dev.receive(NetHdr(), [f], len(f), flush=False) == Delivery.DELIVERED
    assert pair.transport.interrupts == before  # nothing published yet
    assert drv.recv_all() == []
    dev.flush_rx()
    assert pair.transport.interrupts == before + 1
    assert [f.data for f in drv.recv_all()] == frames


def test_transmit_completions_raise_no_interrupt_while_suppressed(make_pair: MakePair) -> None:
    pair = make_pair(1)
    rec = Recorder()
    link(pair.device, rec)
    drv = probe(pair)
    vq = drv.tx_vqs[0]
    # The very first completion may interrupt: a fresh used ring has no reference point.
    drv.send(payload_frame(mac(2), mac(1), 100))
    before = pair.transport.interrupts
    for i in range(50):
        drv.send(payload_frame(mac(2), mac(1), 100, fill=i))
    assert len(rec.frames) == 51
    assert pair.transport.interrupts == before  # the driver disabled transmit callbacks
    assert drv._free_old_xmit(0) > 0  # ...yet the device returned the buffers
    vq.enable_cb()
    drv.send(payload_frame(mac(2), mac(1), 100))
    assert pair.transport.interrupts == before + 1


# ---- backpressure ------------------------------------------------------------------------

def test_receiver_without_buffers_holds_the_sender_until_it_refills(
        make_pair: MakePair) -> None:
    few = NetDriver.with_options(rx_buffers=2)
    a, da, b, db = cable(make_pair, b_driver=few)
    frames = [payload_frame(mac(2), mac(1), 100, fill=i) for i in range(5)]
    for f in frames:
        da.send(f)
    # Two buffers posted: two frames placed, the third waits in A's transmit ring.
    assert a.device.stats.tx_frames == 2
    assert a.device.stats.tx_dropped == 0
    assert b.device.stats.rx_busy >= 1
    got = []
    for _ in range(10):
        got += db.recv_all()
        if len(got) == 5:
            break
    assert [f.data for f in got] == frames
    assert a.device.stats.tx_frames == 5


def test_a_receiver_whose_refill_kick_was_lost_is_served_at_the_second_watch(
        make_pair: MakePair) -> None:
    few = NetDriver.with_options(rx_buffers=2)
    a, da, b, db = cable(make_pair, b_driver=few)
    frames = [payload_frame(mac(2), mac(1), 100, fill=i) for i in range(4)]
    for f in frames:
        da.send(f)
    assert a.device.stats.tx_frames == 2  # B is out of buffers; A waits
    engine = b.device.queues[0].engine
    assert engine is not None and engine.waiting
    kick = b.device.kick
    b.device.kick = lambda index: None  # type: ignore[method-assign]  # the refill's kick is lost
    got = db.recv_all()
    b.device.kick = kick  # type: ignore[method-assign]
    assert a.device.stats.tx_frames == 2 and engine.waiting
    assert engine.watch() is None  # the kick may still be on its way
    assert engine.watch() == "buffers were posted without a kick: served"
    got += db.recv_all()
    assert [f.data for f in got] == frames
    assert b.device.lost_kicks == 1


def test_a_receiver_waiting_for_buffers_interrupts_its_driver_again_less_and_less_often(
        make_pair: MakePair) -> None:
    few = NetDriver.with_options(rx_buffers=2)
    _, da, b, _ = cable(make_pair, b_driver=few)
    for i in range(3):
        da.send(payload_frame(mac(2), mac(1), 100, fill=i))
    engine = b.device.queues[0].engine
    assert engine is not None and engine.waiting
    interrupts: list[int] = []
    b.device.notify_queue = interrupts.append  # the driver "missed" the first one
    acted = [engine.watch() is not None for _ in range(15)]
    assert [i + 1 for i, did in enumerate(acted) if did] == [1, 3, 7, 15]
    assert interrupts == [0, 0, 0, 0] and b.device.renotified == 4
    assert b.device.lost_kicks == 0


def test_frame_larger_than_the_whole_ring_can_hold_is_dropped_not_waited_for(
        make_pair: MakePair) -> None:
    tiny = NetDriver.with_options(queue_size=16, mergeable_buf_len=64)
    a, da, b, db = cable(make_pair, b_driver=tiny)
    da.send(payload_frame(mac(2), mac(1), 2000))  # 32 buffers needed, 16 can ever be posted
    small = payload_frame(mac(2), mac(1), 100)
    da.send(small)
    assert [f.data for f in db.recv_all()] == [small]
    assert b.device.stats.rx_dropped == 1
    assert a.device.stats.tx_frames == 2


def test_stopping_the_receive_queue_gives_back_buffers_popped_but_unused(
        make_pair: MakePair) -> None:
    few = NetDriver.with_options(rx_buffers=2, mergeable_buf_len=256)
    a, da, b, _ = cable(make_pair, b_driver=few)
    da.send(payload_frame(mac(2), mac(1), 1000))  # needs 4 buffers, 2 are posted
    assert a.device.stats.tx_frames == 0
    ring = b.device.ring(0)
    fresh = fresh_base(b.device.driver_features)
    assert ring is not None and ring.last_avail_idx == fresh + 2  # popped looking for room
    assert b.device.stop_queue(0) == fresh  # GET_VRING_BASE: nothing was consumed


# ---- offloads ----------------------------------------------------------------------------

def test_partial_checksum_is_completed_for_a_guest_without_guest_csum(
        make_pair: MakePair) -> None:
    no_csum = features_without(N.VIRTIO_NET_F_GUEST_CSUM, N.VIRTIO_NET_F_GUEST_TSO4,
                               N.VIRTIO_NET_F_GUEST_TSO6)
    _, da, b, db = cable(make_pair, b_features=no_csum)
    frame, hdr = udp_frame(mac(1), mac(2), "10.0.0.1", "10.0.0.2", 7, 9, b"payload!" * 9,
                           partial=True)
    assert not l4_checksum_ok(frame)
    da.send(frame, hdr)
    (got,) = db.recv_all()
    assert got.hdr == NetHdr()
    assert l4_checksum_ok(got.data)
    assert got.data[:40] == frame[:40] and got.data[42:] == frame[42:]
    assert b.device.stats.rx_converted == 1


def test_partial_checksum_passes_through_to_a_guest_with_guest_csum(
        make_pair: MakePair) -> None:
    _, da, _, db = cable(make_pair)
    frame, hdr = udp_frame(mac(1), mac(2), "10.0.0.1", "10.0.0.2", 7, 9, b"abc", partial=True)
    da.send(frame, hdr)
    (got,) = db.recv_all()
    assert got.data == frame
    assert got.hdr.flags == N.VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert (got.hdr.csum_start, got.hdr.csum_offset) == (34, 6)


def test_tso_frame_is_delivered_whole_to_a_guest_with_guest_tso4(make_pair: MakePair) -> None:
    _, da, b, db = cable(make_pair)
    frame, hdr = tcp_tso_frame(mac(1), mac(2), bytes(range(256)) * 40, mss=1448)
    da.send(frame, hdr)
    (got,) = db.recv_all()
    assert got.data == frame
    assert got.hdr == hdr
    assert b.device.stats.rx_converted == 0


@pytest.mark.parametrize("v6", [False, True], ids=["tcpv4", "tcpv6"])
def test_tso_frame_is_segmented_for_a_guest_without_guest_tso(make_pair: MakePair,
                                                              v6: bool) -> None:
    no_tso = features_without(N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_TSO6)
    _, da, b, db = cable(make_pair, b_features=no_tso)
    payload = bytes(i * 7 % 251 for i in range(10000))
    mss = 1448
    frame, hdr = tcp_tso_frame(mac(1), mac(2), payload, mss=mss, v6=v6, flags=0x19)  # +FIN
    da.send(frame, hdr)
    got = db.recv_all()
    assert len(got) == -(-len(payload) // mss)
    l4 = 54 if v6 else 34
    data = b""
    for i, seg in enumerate(got):
        assert seg.hdr.gso_type == N.VIRTIO_NET_HDR_GSO_NONE
        assert l4_checksum_ok(seg.data)
        if not v6:
            assert ipv4_header_ok(seg.data)
            assert struct.unpack_from("!H", seg.data, 18)[0] == 1 + i  # IP id advances
        seq = struct.unpack_from("!I", seg.data, l4 + 4)[0]
        assert seq == 1000 + len(data)
        tcp_flags = seg.data[l4 + 13]
        last = i == len(got) - 1
        assert bool(tcp_flags & 0x01) == last and bool(tcp_flags & 0x08) == last
        chunk = seg.data[l4 + 20 :]
        assert len(chunk) == (mss if not last else len(payload) - mss * i)
        data += chunk
    assert data == payload
    assert b.device.stats.rx_converted == 1


def test_segments_wait_for_room_together_rather_than_arrive_in_part(
        make_pair: MakePair) -> None:
    no_tso = features_without(N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_TSO6)
    few = NetDriver.with_options(rx_buffers=16, mergeable_buf_len=2048)
    a, da, b, db = cable(make_pair, b_driver=few, b_features=no_tso)
    payloads = [bytes([i]) * 14480 for i in (1, 2)]  # 10 segments each, 16 buffers posted
    for p in payloads:
        frame, hdr = tcp_tso_frame(mac(1), mac(2), p, mss=1448)
        da.send(frame, hdr)
    assert a.device.stats.tx_frames == 1  # the second waits: only 6 buffers were left
    got = []
    for _ in range(5):
        got += db.recv_all()
    assert len(got) == 20
    assert b"".join(g.data[54:] for g in got) == b"".join(payloads)
    assert b.device.stats.rx_dropped == 0


def test_guest_offloads_command_turns_tso_delivery_into_segments(make_pair: MakePair) -> None:
    _, da, b, db = cable(make_pair)
    assert b.device.rx_offloads() == Offload.CSUM | Offload.TSO4 | Offload.TSO6
    assert db.set_guest_offloads(1 << N.VIRTIO_NET_F_GUEST_CSUM)
    assert b.device.rx_offloads() == Offload.CSUM
    frame, hdr = tcp_tso_frame(mac(1), mac(2), b"z" * 3000, mss=1000)
    da.send(frame, hdr)
    got = db.recv_all()
    assert len(got) == 3
    assert all(g.hdr.flags == N.VIRTIO_NET_HDR_F_DATA_VALID for g in got)
    # Only negotiated offloads may be turned back on.
    assert not db.set_guest_offloads(1 << N.VIRTIO_NET_F_GUEST_UFO)


@pytest.mark.parametrize(
    ("name", "hdr", "features"),
    [
        ("csum without CSUM", NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6),
         features_without(N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_HOST_TSO4,
                          N.VIRTIO_NET_F_HOST_TSO6)),
        ("csum beyond frame", NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 4000), None),
        ("gso size 0", NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 1, 54, 0, 34, 16), None),
        ("gso without csum", NetHdr(0, 1, 54, 1448, 34, 16), None),
        ("ufo never offered", NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 3, 42, 1000, 34, 6),
         None),
        ("ecn never offered", NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0x81, 54, 1000, 34, 16),
         None),
        ("tso4 not negotiated", NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 1, 54, 1000, 34, 16),
         features_without(N.VIRTIO_NET_F_HOST_TSO4)),
    ],
)
def test_invalid_offload_requests_are_dropped_and_counted(
        make_pair: MakePair, name: str, hdr: NetHdr, features: int | None) -> None:
    pair = make_pair(1)
    rec = Recorder()
    link(pair.device, rec)
    drv = probe(pair, features=features)
    frame, _ = tcp_tso_frame(mac(1), mac(2), b"q" * 100, mss=1000)
    drv.send(frame, hdr)
    drv.send(frame)  # a plain frame after it still goes through
    assert [f for _, f in rec.frames] == [frame]
    assert pair.device.stats.tx_errors == 1
    assert not pair.device.status & S.DEVICE_NEEDS_RESET


# ---- hostile transmit chains -------------------------------------------------------------

def test_truncated_header_is_dropped_counted_and_the_queue_keeps_working(
        make_pair: MakePair) -> None:
    pair = make_pair(1)
    rec = Recorder()
    link(pair.device, rec)
    drv = probe(pair)
    buf = pair.allocator.alloc(64)
    pair.memory.write(buf, b"\x01" * 5)
    vq = drv.tx_vqs[0]
    vq.add_buf([(buf, 5)], [], token=(buf, False))  # 5 bytes: not even a header
    vq.kick()
    assert pair.device.stats.tx_errors == 1
    assert "less than the 12-byte virtio-net header" in (pair.device.last_error or "")
    frame = payload_frame(mac(2), mac(1), 64)
    drv.send(frame)
    assert [f for _, f in rec.frames] == [frame]
    assert not pair.device.status & S.DEVICE_NEEDS_RESET


def test_receive_buffer_without_writable_bytes_is_returned_empty_and_skipped(
        make_pair: MakePair) -> None:
    _, da, b, db = cable(make_pair, b_driver=NetDriver.with_options(rx_buffers=1))
    first = payload_frame(mac(2), mac(1), 80, fill=1)
    da.send(first)  # fills B's only posted buffer
    addr = b.allocator.alloc(256)
    rvq = db.rx_vqs[0]
    rvq.add_buf([(addr, 256)], [], token=RxBuffer(addr, 256))  # device-readable only
    rvq.kick()
    second = payload_frame(mac(2), mac(1), 80, fill=2)
    da.send(second)
    got: list[bytes] = []
    for _ in range(5):
        got += [f.data for f in db.recv_all()]
    assert got == [first, second]
    assert b.device.stats.rx_bad_buffers == 1
    assert db.rx_errors == 1  # the driver saw a zero-length buffer and dropped it
    assert not b.device.status & S.DEVICE_NEEDS_RESET


def test_frame_shorter_than_ethernet_header_is_dropped(make_pair: MakePair) -> None:
    pair = make_pair(1)
    rec = Recorder()
    link(pair.device, rec)
    drv = probe(pair)
    drv.send(b"\x00" * 10)
    assert rec.frames == [] and pair.device.stats.tx_errors == 1


def test_transmit_descriptor_outside_guest_memory_breaks_the_queue(
        make_pair: MakePair) -> None:
    pair = make_pair(1)
    rec = Recorder()
    link(pair.device, rec)
    drv = probe(pair)
    vq = drv.tx_vqs[0]
    vq.add_buf([(pair.memory.size + 4096, 100)], [], token=(0, True))
    vq.kick()
    assert pair.device.status & S.DEVICE_NEEDS_RESET
    assert any("outside guest memory" in p for p in pair.device.problems)
    assert rec.frames == []
    # The device refuses receive traffic while it needs a reset, without raising.
    assert pair.device.receive(NetHdr(), [BROADCAST * 3], 18) == Delivery.BUSY


# ---- control queue -----------------------------------------------------------------------

def test_promisc_off_filters_frames_for_other_addresses(make_pair: MakePair) -> None:
    _, da, b, db = cable(make_pair)
    assert db.set_promisc(False)
    mine = payload_frame(mac(2), mac(1), 60, fill=1)
    other = payload_frame(mac(9), mac(1), 60, fill=2)
    bcast = payload_frame(BROADCAST, mac(1), 60, fill=3)
    multi = payload_frame(b"\x01\x00\x5e\x00\x00\x01", mac(1), 60, fill=4)
    for f in (mine, other, bcast, multi):
        da.send(f)
    assert [f.data for f in db.recv_all()] == [mine, bcast]
    assert b.device.stats.rx_filtered == 2


def test_mac_table_and_rx_modes_select_what_is_received(make_pair: MakePair) -> None:
    _, da, _, db = cable(make_pair)
    group = b"\x01\x00\x5e\x00\x00\x07"
    assert db.set_promisc(False)
    assert db.set_mac_table(unicast=[mac(9)], multicast=[group])
    frames = {
        "mine": payload_frame(mac(2), mac(1), 60, fill=1),
        "listed": payload_frame(mac(9), mac(1), 60, fill=2),
        "unlisted": payload_frame(mac(8), mac(1), 60, fill=3),
        "group": payload_frame(group, mac(1), 60, fill=4),
        "other group": payload_frame(b"\x01\x00\x5e\x00\x00\x08", mac(1), 60, fill=5),
        "bcast": payload_frame(BROADCAST, mac(1), 60, fill=6),
    }

    def received() -> set[str]:
        for f in frames.values():
            da.send(f)
        data = {f.data for f in db.recv_all()}
        return {k for k, f in frames.items() if f in data}

    assert received() == {"mine", "listed", "group", "bcast"}
    assert db.set_allmulti(True)
    assert received() == {"mine", "listed", "group", "other group", "bcast"}
    assert db.set_nobcast(True) and db.set_nomulti(True)
    assert received() == {"mine", "listed"}
    assert db.set_nouni(True)
    assert received() == set()


def test_malformed_mac_table_is_refused_and_leaves_the_filter_alone(
        make_pair: MakePair) -> None:
    _, _, b, db = cable(make_pair)
    assert db.set_mac_table(unicast=[mac(9)])
    bad = struct.pack("<I", 3) + mac(5)  # claims 3 entries, carries 1
    assert not db.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_TABLE_SET, bad,
                          struct.pack("<I", 0))
    assert b.device.rx_filter.unicast == frozenset({mac(9)})


def test_mac_table_beyond_64_entries_falls_back_to_accepting_that_kind(
        make_pair: MakePair) -> None:
    _, da, b, db = cable(make_pair)
    assert db.set_promisc(False)
    groups = [bytes((0x01, 0, 0x5E, 0, 1, i)) for i in range(100)]
    assert db.set_mac_table(unicast=[], multicast=groups)
    assert b.device.rx_filter.multi_overflow and not b.device.rx_filter.uni_overflow
    unlisted_group = payload_frame(b"\x01\x00\x5e\x00\x02\x00", mac(1), 60, fill=1)
    unlisted_host = payload_frame(mac(8), mac(1), 60, fill=2)
    da.send(unlisted_group)
    da.send(unlisted_host)
    assert [f.data for f in db.recv_all()] == [unlisted_group]


def test_mac_addr_set_changes_config_and_the_filter(make_pair: MakePair) -> None:
    _, da, b, db = cable(make_pair)
    assert db.set_promisc(False)
    assert db.set_mac(mac(42))
    assert db.config_mac() == mac(42) and b.device.mac == mac(42)
    old = payload_frame(mac(2), mac(1), 60, fill=1)
    new = payload_frame(mac(42), mac(1), 60, fill=2)
    da.send(old)
    da.send(new)
    assert [f.data for f in db.recv_all()] == [new]
    b.device.reset()
    assert b.device.mac == mac(2)  # reset restores the configured address


def test_announce_sets_status_until_the_driver_acks(make_pair: MakePair) -> None:
    pair = make_pair(1)
    drv = probe(pair)
    before = pair.transport.config_interrupts
    assert pair.device.announce()
    assert pair.transport.config_interrupts == before + 1
    assert drv.announce_requested
    assert drv.announce_ack()
    assert not drv.announce_requested and not pair.device.announce_pending


def test_unknown_and_unnegotiated_commands_are_refused(make_pair: MakePair) -> None:
    pair = make_pair(1)
    drv = probe(pair, features=features_without(N.VIRTIO_NET_F_CTRL_RX_EXTRA))
    assert not drv.command(0x7F, 0)
    assert not drv.set_nobcast(True)  # an RX_EXTRA command without RX_EXTRA
    assert not drv.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01\x01")
    assert drv.set_promisc(True)


def test_multiqueue_pairs_are_set_and_flows_spread_over_receive_queues(
        make_pair: MakePair) -> None:
    a, da, b, db = cable(make_pair, queue_pairs=4)
    assert db.max_queue_pairs == 4
    assert not db.set_queue_pairs(5)
    assert db.set_queue_pairs(4)
    assert b.device.active_queue_pairs == 4
    for port in range(32):
        frame, _ = udp_frame(mac(1), mac(2), "10.0.0.1", "10.0.0.2", 1000 + port, 53, b"q")
        da.send(frame, queue=port % 4)
    got = db.recv_all()
    assert len(got) == 32
    assert len({g.queue for g in got}) > 1
    assert a.device.stats.tx_frames == 32
    # One flow stays on one queue whatever its packets' lengths (no reordering).
    for size in range(1, 200, 13):
        frame, _ = udp_frame(mac(1), mac(2), "10.0.0.1", "10.0.0.2", 4242, 53, b"s" * size)
        da.send(frame)
    assert len({g.queue for g in db.recv_all()}) == 1


def test_features_missing_a_dependency_are_refused(make_pair: MakePair) -> None:
    pair = make_pair(1)
    with pytest.raises(DeviceRefusedFeatures):
        probe(pair, features=features_without(N.VIRTIO_NET_F_GUEST_CSUM))
    assert any("GUEST_TSO4 requires GUEST_CSUM" in p for p in pair.device.problems)


def test_reset_restores_promiscuous_receive_and_drops_batched_work(
        make_pair: MakePair) -> None:
    pair = make_pair(2)
    drv = probe(pair)
    assert drv.set_promisc(False)
    f = payload_frame(mac(2), mac(1), 60)
    pair.device.receive(NetHdr(), [f], len(f), flush=False)
    pair.device.reset()
    assert pair.device.rx_filter.promisc
    assert not any(q.engine is not None and q.engine.done for q in pair.device.queues)
    assert pair.device.receive(NetHdr(), [f], len(f)) == Delivery.BUSY  # no driver yet


# ---- properties --------------------------------------------------------------------------

@given(st.binary(min_size=0, max_size=3000), st.binary(min_size=2, max_size=2))
@settings(max_examples=300, deadline=None)
def test_software_checksum_matches_the_rfc1071_loop(data: bytes, seed: bytes) -> None:
    # The field at offset 14 holds a pseudo-header sum (``seed``) that the checksum covers.
    frame = bytearray(b"\0" * 14 + seed + data)
    complete_checksum(frame, 14, 0)
    assert inet_sum(seed + bytes(frame[14:])) == 0xFFFF


@given(size=st.integers(min_value=14, max_value=9000),
       buf_len=st.integers(min_value=64, max_value=4096))
@settings(max_examples=40, deadline=None)
def test_any_frame_lands_intact_in_any_mergeable_buffer_size(size: int, buf_len: int) -> None:
    a = DevicePair(NetDevice(mac(1)), memory_size=8 << 20)
    b = DevicePair(NetDevice(mac(2)), memory_size=8 << 20)
    try:
        link(a.device, b.device)
        da = probe(a)
        db = probe(b, NetDriver.with_options(mergeable_buf_len=buf_len))  # 256 buffers
        frame = bytes((i * 13) & 0xFF for i in range(size))
        da.send(frame)
        (got,) = db.recv_all()
        assert got.data == frame
        assert sum(got.lengths) == 12 + size
        assert all(n <= buf_len for n in got.lengths)
        assert got.num_buffers == -(-(12 + size) // buf_len)
    finally:
        a.close()
        b.close()
