"""Two guests' console ports joined (pyvirtio join console), each guest a pyvirtio console
driver in its own memory (DevicePair). Assertions are on what each guest's driver received
and on the used lengths its ring shows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.console import ShyDriver
from pyvirtio.device.join import Join, Mapping
from pyvirtio.driver.console import ConsoleDriver
from pyvirtio.errors import LocalError
from pyvirtio.spec import console as C
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair


class Joined:
    def __init__(self, join: Join) -> None:
        self.join = join
        self.pairs = [DevicePair(side) for side in join.sides]
        self.drivers: list[ConsoleDriver | None] = [None, None]

    def probe(self, i: int, driver: type[ConsoleDriver] = ConsoleDriver) -> ConsoleDriver:
        drv = self.pairs[i].probe(driver)
        assert isinstance(drv, ConsoleDriver)
        self.drivers[i] = drv
        return drv

    def close(self) -> None:
        for pair in self.pairs:
            pair.close()


@pytest.fixture
def joined() -> Iterator[Joined]:
    j = Joined(Join("console"))
    yield j
    j.close()


def test_bytes_cross_both_ways_in_order(joined: Joined) -> None:
    a, b = joined.probe(0), joined.probe(1)
    assert not a.multiport and not b.multiport  # the join offers port 0 only (hvc0)
    a.write(0, b"echo hello\n")
    assert b.read(0, 11) == b"echo hello\n"
    b.write(0, b"hello\r\n")
    assert a.read(0, 7) == b"hello\r\n"


def test_a_stream_larger_than_every_receive_buffer_is_split_and_arrives_whole(
        joined: Joined) -> None:
    a, b = joined.probe(0), joined.probe(1)
    data = bytes(range(251)) * 800  # 200 KB in 16 KiB chains, into 4 KiB buffers
    got = bytearray()
    sent = 0
    for _ in range(10000):
        if sent < len(data):
            sent += a.send(0, data[sent : sent + 16384])
        got += b.read_available(0)  # reading refills b's buffers, which resumes a
        if len(got) == len(data):
            break
    assert bytes(got) == data
    route = joined.join.routes[0]
    assert route.stats.bytes == len(data) and route.stats.buffers > route.stats.chains


def test_a_sender_waits_for_buffers_and_nothing_is_dropped(joined: Joined) -> None:
    a = joined.probe(0)
    b = joined.probe(1, ShyDriver)
    a.send(0, b"x" * 10000)  # one chain, no buffer on b's side yet
    assert b.read_available(0) == b""
    b.fill_receive(0, 1)
    assert b.read_available(0) == b"x" * 4096  # the chain is copied in part...
    b.fill_receive(0, 2)
    assert b.read_available(0) == b"x" * (10000 - 4096)  # ...and continued where it stopped
    assert joined.join.routes[0].stats.chains == 1


def test_sender_bytes_wait_for_a_guest_that_is_not_there_yet(joined: Joined) -> None:
    a = joined.probe(0)
    a.send(0, b"early")
    b = joined.probe(1)
    assert b.read(0, 5) == b"early"


def test_used_length_is_exactly_the_bytes_copied(joined: Joined) -> None:
    a = joined.probe(0)
    b = joined.probe(1, ShyDriver)
    pair = joined.pairs[1]
    buf = pair.allocator.alloc(4096)
    pair.memory.write(buf, b"\xee" * 4096)  # stale bytes the guest must never be told of
    vq = b.vqs[C.port_receiveq(0)]
    vq.add_buf([], [(buf, 4096)], token=buf)  # the driver reads what the used length says
    vq.kick()
    a.send(0, b"hello")
    assert b.read_available(0) == b"hello"  # used length 5, not the 4096 posted
    assert pair.memory.read(buf, 6) == b"hello\xee"


def test_writable_bytes_of_a_transmit_chain_are_never_written(joined: Joined) -> None:
    a, b = joined.probe(0), joined.probe(1)
    pair = joined.pairs[0]
    out, back = pair.allocator.alloc(16), pair.allocator.alloc(64)
    pair.memory.write(out, b"data")
    pair.memory.write(back, b"\x55" * 64)
    tvq = a.vqs[C.port_transmitq(0)]
    tvq.add_buf([(out, 4)], [(back, 64)], token="mixed")
    tvq.kick()
    assert b.read(0, 4) == b"data"
    assert tvq.get_buf() == ("mixed", 0)
    assert pair.memory.read(back, 64) == b"\x55" * 64


def test_a_receive_buffer_without_writable_bytes_is_returned_empty(joined: Joined) -> None:
    a = joined.probe(0)
    b = joined.probe(1, ShyDriver)
    pair = joined.pairs[1]
    ro = pair.allocator.alloc(64)
    vq = b.vqs[C.port_receiveq(0)]
    vq.add_buf([(ro, 64)], [], token=ro)
    vq.kick()
    b.fill_receive(0, 1)
    a.send(0, b"abc")
    assert b.read(0, 3) == b"abc"
    assert joined.join.routes[0].stats.bad_buffers == 1
    assert any("no writable bytes" in p for p in pair.device.problems)


def test_hostile_sender_ring_breaks_only_the_sender(joined: Joined) -> None:
    a, b = joined.probe(0), joined.probe(1)
    pair = joined.pairs[0]
    tvq = a.vqs[C.port_transmitq(0)]
    tvq.add_buf([(pair.memory.size + (1 << 20), 100)], [], token="outside")
    tvq.kick()
    assert pair.device.status & S.DEVICE_NEEDS_RESET
    assert pair.device.problems
    assert joined.pairs[1].device.problems == []
    assert b.read_available(0) == b""  # nothing half-copied reached the other guest
    b.send(0, b"to a, later")  # waits for a guest on side 0 that works again
    joined.pairs[0].remove()
    a = joined.probe(0)
    assert a.read(0, 11) == b"to a, later"
    a.write(0, b"back")
    assert b.read(0, 4) == b"back"


def test_hostile_receiver_ring_breaks_only_the_receiver(joined: Joined) -> None:
    a = joined.probe(0)
    b = joined.probe(1, ShyDriver)
    pair = joined.pairs[1]
    vq = b.vqs[C.port_receiveq(0)]
    vq.add_buf([], [(pair.memory.size + 4096, 4096)], token="outside")
    vq.kick()
    a.send(0, b"kept")
    assert pair.device.status & S.DEVICE_NEEDS_RESET
    assert joined.pairs[0].device.problems == []
    assert not joined.pairs[0].device.status & S.DEVICE_NEEDS_RESET
    joined.pairs[1].remove()
    b = joined.probe(1)
    assert b.read(0, 4) == b"kept"  # waited, not dropped


def test_named_mapping_and_mapping_errors() -> None:
    j = Joined(Join("console", mappings=[Mapping.parse("0:1>1:0")]))  # one way only
    try:
        a, b = j.probe(0), j.probe(1)
        a.write(0, b"one way")
        assert b.read(0, 7) == b"one way"
        b.send(0, b"nowhere")
        assert a.read_available(0) == b""
    finally:
        j.close()
    with pytest.raises(LocalError, match="another mapping"):
        Join("console", mappings=[Mapping.parse("0:1>1:0"), Mapping.parse("1:0>0:0")])
    with pytest.raises(LocalError, match="no queue 5"):
        Join("console", mappings=[Mapping.parse("0:5>1:0")])
    with pytest.raises(LocalError, match="SIDE:QUEUE"):
        Mapping.parse("0>1")
