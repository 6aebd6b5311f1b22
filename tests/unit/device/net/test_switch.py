"""The L2 learning switch joining several virtio-net devices, each driven by a pyvirtio net
driver in its own guest memory (DevicePair). Assertions are on what each guest received."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from helpers.net import (
    BROADCAST,
    arp_request,
    features_without,
    l4_checksum_ok,
    mac,
    probe,
    tcp_tso_frame,
    udp_frame,
)
from pyvirtio.device.net import NetDevice, NetHdr
from pyvirtio.device.net.switch import Switch, SwitchPort
from pyvirtio.driver.net import NetDriver
from pyvirtio.spec import net as N
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Lan:
    switch: Switch
    clock: FakeClock
    pairs: dict[str, DevicePair] = field(default_factory=dict)
    drivers: dict[str, NetDriver] = field(default_factory=dict)
    ports: dict[str, SwitchPort] = field(default_factory=dict)

    def add(self, name: str, n: int, *, driver: type[NetDriver] = NetDriver,
            features: int | None = None, start: bool = True,
            **port_kwargs: object) -> DevicePair:
        pair = DevicePair(NetDevice(mac(n), name=name))
        self.pairs[name] = pair
        self.ports[name] = self.switch.add_port(pair.device, name, **port_kwargs)  # type: ignore[arg-type]
        if start:
            self.drivers[name] = probe(pair, driver, features)
        return pair

    def received(self, name: str) -> list[bytes]:
        return [f.data for f in self.drivers[name].recv_all()]


@pytest.fixture
def lan() -> Iterator[Lan]:
    clock = FakeClock()
    net = Lan(Switch(clock=clock, ageing_time=300.0, queue_frames=8), clock)
    yield net
    for pair in net.pairs.values():
        pair.close()


def frame(dst: bytes, src: bytes, tag: int, size: int = 60) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([tag]) * (size - 14)


@pytest.fixture
def abc(lan: Lan) -> Lan:
    for i, name in enumerate("abc", start=1):
        lan.add(name, i)
    return lan


def test_broadcast_reaches_every_other_port_but_not_the_sender(abc: Lan) -> None:
    arp = arp_request(mac(1), "10.0.0.1", "10.0.0.3")
    abc.drivers["a"].send(arp)
    assert abc.received("b") == [arp]
    assert abc.received("c") == [arp]
    assert abc.received("a") == []
    assert abc.switch.flooded == 1


def test_unicast_after_learning_goes_only_to_its_port(abc: Lan) -> None:
    d = abc.drivers
    d["b"].send(arp_request(mac(2), "10.0.0.2", "10.0.0.1"))  # the switch learns b
    for name in "ac":
        abc.received(name)
    reply = frame(mac(2), mac(1), 1)
    d["a"].send(reply)
    assert abc.received("b") == [reply]
    assert abc.received("c") == []  # c is promiscuous: it would have taken a flood
    assert abc.switch.lookup(mac(2)) is abc.ports["b"]


def test_unknown_unicast_is_flooded_and_refused_by_filtering_guests(abc: Lan) -> None:
    d = abc.drivers
    assert d["c"].set_promisc(False)
    f = frame(mac(2), mac(1), 2)  # b has not spoken yet: unknown
    d["a"].send(f)
    assert abc.received("b") == [f]
    assert abc.received("c") == []
    assert abc.ports["c"].stats.refused == 1
    assert abc.pairs["c"].device.stats.rx_filtered == 1


def test_learned_address_ages_out_and_is_flooded_again(abc: Lan) -> None:
    d = abc.drivers
    d["b"].send(frame(BROADCAST, mac(2), 0))
    abc.received("a"), abc.received("c")
    abc.clock.now += 299
    d["a"].send(frame(mac(2), mac(1), 1))
    assert abc.received("c") == []
    abc.clock.now += 2  # b silent for 301 s now
    late = frame(mac(2), mac(1), 2)
    d["a"].send(late)
    assert abc.received("c") == [late]
    assert abc.received("b")[-1] == late
    assert abc.switch.lookup(mac(2)) is None


def test_an_address_that_moves_is_relearned_on_its_new_port(abc: Lan) -> None:
    d = abc.drivers
    d["b"].send(frame(BROADCAST, mac(9), 0))  # 02:..:09 appears behind b
    d["c"].send(frame(BROADCAST, mac(9), 0))  # ...then behind c
    for name in "abc":
        abc.received(name)
    f = frame(mac(9), mac(1), 1)
    d["a"].send(f)
    assert abc.received("c") == [f]
    assert abc.received("b") == []
    assert abc.switch.moves == 1


def test_unicast_to_an_address_on_the_ingress_port_is_filtered(abc: Lan) -> None:
    d = abc.drivers
    d["a"].send(frame(BROADCAST, mac(1), 0))
    abc.received("b"), abc.received("c")
    d["a"].send(frame(mac(1), mac(1), 1))
    assert abc.received("b") == [] and abc.received("c") == []
    assert abc.switch.filtered == 1


def test_mac_table_is_bounded(lan: Lan) -> None:
    lan.switch.max_macs = 4
    lan.add("a", 1)
    lan.add("b", 2)
    for i in range(10):
        lan.drivers["a"].send(frame(BROADCAST, mac(100 + i), i))
    assert len(list(lan.switch.fdb())) == 4
    assert lan.switch.learn_overflows == 6
    assert len(lan.received("b")) == 10  # forwarding is unaffected


def test_guest_that_never_starts_fills_its_queue_then_drops_without_stalling_others(
        lan: Lan) -> None:
    lan.add("a", 1)
    lan.add("b", 2)
    lan.add("dead", 3, start=False)  # its driver never comes up: no receive buffers ever
    sent = [frame(BROADCAST, mac(1), i) for i in range(20)]
    for f in sent:
        lan.drivers["a"].send(f)
    assert lan.received("b") == sent
    dead = lan.ports["dead"]
    assert len(dead.queue) == 8
    assert dead.stats.drops == 12
    assert dead.stats.rx_frames == 0
    assert lan.pairs["a"].device.stats.tx_frames == 20


def test_guest_that_stops_refilling_queues_then_drops_and_catches_up_later(
        lan: Lan) -> None:
    lan.add("a", 1)
    lan.add("b", 2)
    lan.add("slow", 3, driver=NetDriver.with_options(rx_buffers=4))
    sent = [frame(BROADCAST, mac(1), i) for i in range(20)]
    for f in sent:
        lan.drivers["a"].send(f)
    assert lan.received("b") == sent  # the others never waited
    slow = lan.ports["slow"]
    assert slow.stats.rx_frames == 4 and len(slow.queue) == 8 and slow.stats.drops == 8
    got: list[bytes] = []
    for _ in range(10):  # the guest polls: each refill drains more of its queue
        got += lan.received("slow")
    assert got == sent[:12]  # 4 placed at once, then the 8 queued, in order; 8 dropped
    assert len(slow.queue) == 0


def test_tso_frames_pass_whole_to_tso_guests_and_segmented_to_others(lan: Lan) -> None:
    lan.add("a", 1)
    lan.add("tso", 2)
    lan.add("plain", 3, features=features_without(N.VIRTIO_NET_F_GUEST_TSO4,
                                                   N.VIRTIO_NET_F_GUEST_TSO6,
                                                   N.VIRTIO_NET_F_GUEST_CSUM))
    payload = bytes(range(256)) * 20
    f, hdr = tcp_tso_frame(mac(1), BROADCAST, payload, mss=1000)
    lan.drivers["a"].send(f, hdr)
    (whole,) = lan.drivers["tso"].recv_all()
    assert whole.data == f and whole.hdr == hdr
    segs = lan.drivers["plain"].recv_all()
    assert len(segs) == 6
    assert all(s.hdr == NetHdr() and l4_checksum_ok(s.data) for s in segs)
    assert b"".join(s.data[54:] for s in segs) == payload


def test_partial_checksum_is_completed_only_for_the_guest_that_needs_it(lan: Lan) -> None:
    lan.add("a", 1)
    lan.add("csum", 2)
    lan.add("nocsum", 3, features=features_without(N.VIRTIO_NET_F_GUEST_TSO4,
                                                    N.VIRTIO_NET_F_GUEST_TSO6,
                                                    N.VIRTIO_NET_F_GUEST_CSUM))
    f, hdr = udp_frame(mac(1), BROADCAST, "10.0.0.1", "10.0.0.255", 5, 6, b"hi" * 30,
                       partial=True)
    lan.drivers["a"].send(f, hdr)
    (passed,) = lan.drivers["csum"].recv_all()
    assert passed.data == f and passed.hdr.flags == N.VIRTIO_NET_HDR_F_NEEDS_CSUM
    (done,) = lan.drivers["nocsum"].recv_all()
    assert done.hdr.flags == 0 and l4_checksum_ok(done.data)


def test_used_length_never_exceeds_copied_bytes(lan: Lan) -> None:
    lan.add("a", 1)
    lan.add("b", 2, driver=NetDriver.with_options(mergeable_buf_len=300))
    for size in (60, 299, 300, 1514, 4000):
        f = frame(BROADCAST, mac(1), size & 0xFF, size)
        lan.drivers["a"].send(f)
        (got,) = lan.drivers["b"].recv_all()
        assert got.data == f
        assert sum(got.lengths) == 12 + size
        assert all(n <= 300 for n in got.lengths)


def test_hostile_tx_descriptor_outside_memory_breaks_only_that_port(abc: Lan) -> None:
    a = abc.pairs["a"]
    vq = abc.drivers["a"].tx_vqs[0]
    vq.add_buf([(a.memory.size + (1 << 30), 1500)], [], token=(0, True))
    vq.kick()
    assert a.device.status & S.DEVICE_NEEDS_RESET
    f = frame(BROADCAST, mac(2), 7)
    abc.drivers["b"].send(f)
    assert abc.received("c") == [f]
    assert abc.pairs["b"].device.problems == []


def test_hostile_truncated_header_is_dropped_and_counted_others_continue(abc: Lan) -> None:
    a = abc.pairs["a"]
    buf = a.allocator.alloc(16)
    vq = abc.drivers["a"].tx_vqs[0]
    vq.add_buf([(buf, 7)], [], token=(buf, False))
    vq.kick()
    assert a.device.stats.tx_errors == 1
    assert abc.ports["a"].stats.tx_frames == 0
    f = frame(BROADCAST, mac(1), 3)
    abc.drivers["a"].send(f)
    assert abc.received("b") == [f] and abc.received("c") == [f]


def test_stats_table_lists_every_port_with_its_counters(abc: Lan) -> None:
    abc.drivers["a"].send(frame(BROADCAST, mac(1), 1, 100))
    table = abc.switch.stats_table()
    lines = table.splitlines()
    assert lines[0].split() == ["port", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes",
                                "drops", "refused", "queued"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:4]}
    assert rows["a"] == ["0", "0", "1", "100", "0", "0", "0"]
    assert rows["b"] == ["1", "100", "0", "0", "0", "0", "0"]
    assert "learned 1 addresses" in lines[4]


def test_removed_port_is_forgotten_and_receives_nothing(abc: Lan) -> None:
    abc.drivers["b"].send(frame(BROADCAST, mac(2), 0))
    abc.received("a"), abc.received("c")
    abc.switch.remove_port(abc.ports["b"])
    assert abc.switch.lookup(mac(2)) is None
    f = frame(mac(2), mac(1), 1)
    abc.drivers["a"].send(f)
    assert abc.received("b") == []
    assert abc.received("c") == [f]
    abc.drivers["b"].send(frame(BROADCAST, mac(2), 2))  # b's transmissions go nowhere
    assert abc.received("a") == []
    assert abc.pairs["b"].device.stats.tx_dropped == 1



def test_hostile_rx_descriptor_outside_memory_breaks_only_that_port(lan: Lan) -> None:
    lan.add("a", 1)
    lan.add("b", 2)
    hostile = lan.add("hostile", 3, driver=NetDriver.with_options(rx_buffers=1))
    first = frame(BROADCAST, mac(1), 0)
    lan.drivers["a"].send(first)  # fills the hostile guest's only good buffer
    rvq = lan.drivers["hostile"].rx_vqs[0]
    rvq.add_buf([], [(hostile.memory.size + 4096, 2048)], token="outside")
    rvq.kick()
    later = [frame(BROADCAST, mac(1), i) for i in (1, 2)]
    for f in later:
        lan.drivers["a"].send(f)
    assert hostile.device.status & S.DEVICE_NEEDS_RESET
    assert any("outside guest memory" in p for p in hostile.device.problems)
    assert lan.received("b") == [first, *later]  # the others never noticed
    assert lan.pairs["a"].device.stats.tx_frames == 3
