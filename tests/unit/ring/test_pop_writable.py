"""The split ring's batch pop of one-descriptor writable buffers (net's receive fast lane):
just the buffers ``need`` bytes take, all or nothing; anything it does not take is left
for pop(), which gives every verdict."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from helpers.ring import RingPair, make_pair
from pyvirtio.ring import RingError

U16 = struct.Struct("<H")


@pytest.fixture
def pair() -> Iterator[RingPair]:
    p = make_pair(16, event_idx=True, indirect=True)
    yield p
    p.close()


def post(pair: RingPair, *lengths: int) -> list[int]:
    addrs = []
    for n in lengths:
        addr = pair.alloc.alloc(n, 64)
        pair.driver.add_buf([], [(addr, n)], addr)
        addrs.append(addr)
    pair.driver.kick_prepare()
    return addrs


def test_it_takes_just_the_buffers_the_bytes_need(pair: RingPair) -> None:
    addrs = post(pair, 100, 100, 100, 100)
    got = pair.device.pop_writable(150)
    assert [(n, bytes(buf[off : off + 4]) == pair.memory.read(a, 4))
            for (_, buf, off, n), a in zip(got, addrs, strict=False)] == [(100, True)] * 2
    assert pair.device.pending() == 2 and sorted(pair.device.in_flight()) == \
        sorted(head for head, *_ in got)
    pair.device.push_many([(head, n) for head, _, _, n in got])
    assert [pair.driver.get_buf() for _ in range(2)] == [(addrs[0], 100), (addrs[1], 100)]


def test_too_few_buffers_consume_nothing(pair: RingPair) -> None:
    post(pair, 100, 100)
    assert pair.device.pop_writable(201) == []
    assert pair.device.pending() == 2 and pair.device.in_flight() == []
    chain = pair.device.pop()
    assert chain is not None and chain.writable_len == 100


def test_a_chained_buffer_is_left_for_pop(pair: RingPair) -> None:
    addr = pair.alloc.alloc(200, 64)
    pair.driver.add_buf([], [(addr, 100), (addr + 100, 100)], "chained")
    pair.driver.kick_prepare()
    assert pair.device.pop_writable(10) == []
    chain = pair.device.pop()
    assert chain is not None and chain.writable_len == 200


def test_a_head_listed_twice_is_not_taken_twice(pair: RingPair) -> None:
    post(pair, 100)
    head = pair.avail_entry(0)
    # A hostile driver lists the same head again in the next avail slot.
    pair.memory.write(pair.driver.avail_addr + 4 + 2 * 1, U16.pack(head))
    pair.memory.write(pair.driver.avail_addr + 2, U16.pack(2))
    assert pair.device.pop_writable(150) == []  # would need the head twice: nothing
    assert pair.device.in_flight() == [] and pair.device.pending() == 2
    (only,) = pair.device.pop_writable(100)
    assert only[0] == head and only[3] == 100


def test_a_buffer_outside_guest_memory_is_left_for_pop_to_judge(pair: RingPair) -> None:
    pair.driver.add_buf([], [(pair.memory.size - 8, 64)], "beyond")  # runs past the end
    pair.driver.kick_prepare()
    assert pair.device.pop_writable(10) == []
    assert pair.device.broken is None  # the batch pop gives no verdict; pop() does
    with pytest.raises(RingError):
        pair.device.pop()
