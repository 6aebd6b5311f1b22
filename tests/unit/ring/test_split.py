"""The split ring, both ends: what each side writes into shared memory, and what it accepts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.ring import RingPair, make_pair
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import (
    DescriptorChain,
    DeviceQueue,
    DriverQueue,
    QueueFullError,
    QueueUsageError,
    RingError,
    gather,
    scatter,
)
from pyvirtio.ring.chain import split_segments
from pyvirtio.spec import BE
from pyvirtio.spec import split as S


@pytest.fixture
def pair() -> Iterator[RingPair]:
    p = make_pair(8)
    yield p
    p.close()


@pytest.fixture
def ipair() -> Iterator[RingPair]:
    p = make_pair(8, indirect=True)
    yield p
    p.close()


def buffers(p: RingPair, *data: bytes) -> list[tuple[int, int]]:
    out = []
    for d in data:
        addr = p.alloc.alloc(max(len(d), 1), 16)
        p.memory.write(addr, d)
        out.append((addr, len(d)))
    return out


# ---- driver side: what add_buf publishes ------------------------------------------------


def test_add_buf_writes_a_direct_chain_and_publishes_it(pair: RingPair) -> None:
    (o1, o2) = buffers(pair, b"head", b"payload")
    (i1,) = buffers(pair, bytes(32))
    head = pair.driver.add_buf([o1, o2], [i1], token="req")
    assert pair.avail_idx() == 1
    assert pair.avail_entry(0) == head
    a = pair.desc(head)
    assert a[:3] == (o1[0], 4, S.VRING_DESC_F_NEXT)
    b = pair.desc(a[3])
    assert b[:3] == (o2[0], 7, S.VRING_DESC_F_NEXT)
    c = pair.desc(b[3])
    assert c[:3] == (i1[0], 32, S.VRING_DESC_F_WRITE)
    assert pair.driver.num_free == 5 and pair.driver.in_flight == 1


def test_add_buf_with_indirect_uses_one_descriptor_and_a_table(ipair: RingPair) -> None:
    outs = buffers(ipair, b"a" * 10, b"b" * 20)
    ins = buffers(ipair, bytes(30))
    before = ipair.alloc.allocations
    head = ipair.driver.add_buf(outs, ins, token=1)
    assert ipair.driver.num_free == 7
    table_addr, length, flags, _ = ipair.desc(head)
    assert (length, flags) == (48, S.VRING_DESC_F_INDIRECT)
    assert ipair.alloc.allocations == before + 1
    rows = [S.desc_struct().unpack(ipair.memory.read(table_addr + 16 * i, 16)) for i in range(3)]
    assert rows == [(outs[0][0], 10, S.VRING_DESC_F_NEXT, 1),
                    (outs[1][0], 20, S.VRING_DESC_F_NEXT, 2),
                    (ins[0][0], 30, S.VRING_DESC_F_WRITE, 3)]
    chain = ipair.device.pop()
    assert chain is not None and chain.read() == b"a" * 10 + b"b" * 20
    ipair.device.push(chain, 5)
    assert ipair.driver.get_buf() == (1, 5)
    assert ipair.alloc.allocations == before  # the table went back
    assert ipair.driver.num_free == 8


def test_single_segment_buffers_stay_direct_even_with_indirect(ipair: RingPair) -> None:
    ipair.driver.add_buf([], buffers(ipair, bytes(8)), token=1)
    assert not ipair.desc(0)[2] & S.VRING_DESC_F_INDIRECT


def test_queue_full_raises_without_side_effects(pair: RingPair) -> None:
    (buf,) = buffers(pair, bytes(8))
    for i in range(4):
        pair.driver.add_buf([buf], [buf], token=i)
    assert pair.driver.num_free == 0
    idx = pair.avail_idx()
    with pytest.raises(QueueFullError) as err:
        pair.driver.add_buf([buf], [], token="x")
    assert isinstance(err.value, LocalError)
    assert pair.avail_idx() == idx and pair.driver.num_free == 0
    assert pair.driver.in_flight == 4


def test_queue_full_with_indirect_when_no_descriptor_is_left() -> None:
    p = make_pair(2, indirect=True)
    try:
        (buf,) = buffers(p, bytes(8))
        p.driver.add_buf([buf], [buf], token=1)
        p.driver.add_buf([buf], [buf], token=2)
        before = p.alloc.allocations
        with pytest.raises(QueueFullError):
            p.driver.add_buf([buf], [buf], token=3)
        assert p.alloc.allocations == before  # no table leaked
    finally:
        p.close()


def test_add_buf_refuses_a_none_token_and_an_empty_buffer(pair: RingPair) -> None:
    with pytest.raises(QueueUsageError):
        pair.driver.add_buf([(0x1000, 1)], [], token=None)
    with pytest.raises(QueueUsageError):
        pair.driver.add_buf([], [], token=1)
    assert pair.driver.num_free == 8 and pair.avail_idx() == 0


# ---- device side: pop and push ----------------------------------------------------------


def test_device_pops_what_the_driver_added_and_returns_it(pair: RingPair) -> None:
    outs = buffers(pair, b"hello ", b"world")
    ins = buffers(pair, bytes(4), bytes(8))
    pair.driver.add_buf(outs, ins, token="t")
    assert pair.device.pending() == 1
    chain = pair.device.pop()
    assert isinstance(chain, DescriptorChain)
    assert chain.read() == b"hello world" and chain.readable_len == 11
    assert chain.writable_len == 12 and [len(w) for w in chain.writable] == [4, 8]
    assert pair.device.pop() is None
    assert chain.write(b"0123456789") == 10
    pair.device.push(chain, 10)
    assert pair.used_idx() == 1 and pair.used_elem(0) == (chain.head, 10)
    assert pair.memory.read(ins[0][0], 4) == b"0123"
    assert pair.memory.read(ins[1][0], 6) == b"456789"
    assert pair.driver.get_buf() == ("t", 10)
    assert pair.driver.get_buf() is None


def test_out_of_order_completion_returns_each_token_once(pair: RingPair) -> None:
    (buf,) = buffers(pair, bytes(64))
    for t in range(4):
        pair.driver.add_buf([], [buf], token=t)
    chains = [pair.device.pop() for _ in range(4)]
    assert all(c is not None for c in chains)
    for i in (2, 0, 3, 1):
        c = chains[i]
        assert c is not None
        pair.device.push(c, i)
    got = [pair.driver.get_buf() for _ in range(4)]
    assert got == [(2, 2), (0, 0), (3, 3), (1, 1)]
    assert pair.driver.num_free == 8


def test_push_many_publishes_the_index_once(pair: RingPair) -> None:
    (buf,) = buffers(pair, bytes(64))
    for t in range(3):
        pair.driver.add_buf([], [buf], token=t)
    chains = [pair.device.pop() for _ in range(3)]
    assert pair.device.push_many((c, 1) for c in chains if c is not None) == 3
    assert pair.used_idx() == 3
    assert [pair.driver.get_buf() for _ in range(3)] == [(0, 1), (1, 1), (2, 1)]
    assert pair.device.push_many([]) == 0


def test_device_push_refuses_misuse(pair: RingPair) -> None:
    (buf,) = buffers(pair, bytes(16))
    pair.driver.add_buf([], [buf], token=1)
    chain = pair.device.pop()
    assert chain is not None
    with pytest.raises(QueueUsageError):
        pair.device.push(chain, 17)  # more than its writable bytes
    with pytest.raises(QueueUsageError):
        pair.device.push(chain, -1)
    with pytest.raises(QueueUsageError):
        pair.device.push(5, 0)  # never popped
    with pytest.raises(QueueUsageError):
        pair.device.push(100, 0)  # not even a descriptor
    pair.device.push(chain, 16)
    with pytest.raises(QueueUsageError):
        pair.device.push(chain, 0)  # twice
    assert pair.used_idx() == 1 and pair.device.broken is None


def test_rewind_offers_unpushed_chains_again(pair: RingPair) -> None:
    (buf,) = buffers(pair, bytes(16))
    for t in range(3):
        pair.driver.add_buf([], [buf], token=t)
    first = [pair.device.pop() for _ in range(3)]
    heads = [c.head for c in first if c is not None]
    pair.device.rewind(2)
    assert pair.device.in_flight() == heads[:1]
    again = [pair.device.pop(), pair.device.pop()]
    assert [c.head for c in again if c is not None] == heads[1:]
    assert pair.device.pop() is None


def test_in_flight_lists_popped_heads(pair: RingPair) -> None:
    (buf,) = buffers(pair, bytes(16))
    pair.driver.add_buf([], [buf], token=1)
    pair.driver.add_buf([], [buf], token=2)
    a, b = pair.device.pop(), pair.device.pop()
    assert a is not None and b is not None
    assert sorted(pair.device.in_flight()) == sorted([a.head, b.head])
    pair.device.push(a, 0)
    assert pair.device.in_flight() == [b.head]


def test_device_resumes_from_a_saved_position() -> None:
    """vhost-user GET/SET_VRING_BASE: a second DeviceQueue picks up where the first was."""
    p = make_pair(4)
    try:
        (buf,) = buffers(p, bytes(8))
        for t in range(3):
            p.driver.add_buf([], [buf], token=t)
        c0 = p.device.pop()
        assert c0 is not None
        p.device.push(c0, 1)
        d = p.driver
        resumed = DeviceQueue(p.memory, 4, d.desc_addr, d.avail_addr, d.used_addr,
                              last_avail_idx=p.device.last_avail_idx)
        assert resumed.used_idx == 1  # read back from the ring
        c1 = resumed.pop()
        assert c1 is not None and c1.head == 1
        resumed.push(c1, 2)
        assert p.driver.get_buf() == (0, 1)
        assert p.driver.get_buf() == (1, 2)
        explicit = DeviceQueue(p.memory, 4, d.desc_addr, d.avail_addr, d.used_addr,
                               last_avail_idx=2, used_idx=7)
        assert explicit.used_idx == 7
    finally:
        p.close()


def test_start_idx_places_both_ends_just_before_the_wrap() -> None:
    p = make_pair(4, start_idx=0xFFFE)
    try:
        assert p.avail_idx() == 0xFFFE and p.used_idx() == 0xFFFE
        assert p.used_event() == 0xFFFE and p.avail_event() == 0xFFFE
        (buf,) = buffers(p, bytes(8))
        for t in range(4):
            p.driver.add_buf([], [buf], token=t)
        assert p.avail_idx() == 2
        assert [p.avail_entry(s) for s in (2, 3, 0, 1)] == [0, 1, 2, 3]
        chains = [p.device.pop() for _ in range(4)]
        assert p.device.last_avail_idx == 2
        for c in reversed(chains):
            assert c is not None
            p.device.push(c, 3)
        assert p.used_idx() == 2
        assert [p.driver.get_buf() for _ in range(4)] == [(3, 3), (2, 3), (1, 3), (0, 3)]
        assert p.driver.last_used_idx == 2 and p.driver.num_free == 4
    finally:
        p.close()


def test_zero_length_and_spanning_segments_pop_correctly() -> None:
    memory = GuestMemory.anonymous(0x10000)
    memory.add_region(GuestMemory.anonymous(0x10000, gpa=0x10000).regions[0])
    try:
        alloc = Allocator(0, 0x8000)
        desc, avail, used = alloc.alloc(64, 16), alloc.alloc(14, 2), alloc.alloc(38, 4)
        drv = DriverQueue(memory, 4, desc, avail, used)
        dev = DeviceQueue(memory, 4, desc, avail, used)
        memory.write(0xFFF0, bytes(range(32)))
        drv.add_buf([(0xFFF0, 32), (0, 0)], [(0x1FF00, 0)], token=1)
        chain = dev.pop()
        assert chain is not None
        assert [len(s) for s in chain.readable] == [16, 16]  # split at the region boundary
        assert chain.read() == bytes(range(32)) and chain.writable_len == 0
    finally:
        memory.close()


# ---- construction -----------------------------------------------------------------------


def test_queues_refuse_bad_sizes_and_rings_outside_memory() -> None:
    memory = GuestMemory.anonymous(0x4000)
    try:
        for size in (0, 3, 65536):
            with pytest.raises(QueueUsageError):
                DeviceQueue(memory, size, 0, 0x1000, 0x2000)
            with pytest.raises(QueueUsageError):
                DriverQueue(memory, size, 0, 0x1000, 0x2000)
        with pytest.raises(RingError) as err:
            DeviceQueue(memory, 256, 0, 0x1000, 0x3800)  # used ring runs past the end
        assert "used ring" in str(err.value) and "0x3800" in str(err.value)
        with pytest.raises(RingError):
            DeviceQueue(memory, 1024, 0, 0x3F00, 0x3F00)  # table of 16 KiB at 0 is fine...
        with pytest.raises(QueueUsageError):
            DriverQueue(memory, 4, 0, 0x1000, 0x2000, indirect=True)  # no allocator
    finally:
        memory.close()


# ---- a hostile device, seen from the driver ----------------------------------------------


def test_device_returning_an_id_not_in_flight_breaks_the_driver_queue(pair: RingPair) -> None:
    (buf,) = buffers(pair, bytes(16))
    pair.driver.add_buf([], [buf], token=1)
    pair.write_used(0, 5, 0, idx=1)  # descriptor 5 was never made available
    with pytest.raises(RingError) as err:
        pair.driver.get_buf()
    assert "id 5" in str(err.value) and isinstance(err.value, PeerError)
    assert pair.driver.broken is not None
    with pytest.raises(RingError):
        pair.driver.get_buf()  # stays broken
    with pytest.raises(RingError):
        pair.driver.add_buf([], [buf], token=2)


def test_device_returning_an_id_beyond_the_table_breaks_the_driver_queue(
        pair: RingPair) -> None:
    pair.driver.add_buf([], buffers(pair, bytes(16)), token=1)
    pair.write_used(0, 0xFFFFFFFF, 0, idx=1)
    with pytest.raises(RingError) as err:
        pair.driver.get_buf()
    assert str(0xFFFFFFFF) in str(err.value)


def test_device_claiming_too_many_written_bytes_breaks_the_driver_queue(
        pair: RingPair) -> None:
    head = pair.driver.add_buf([], buffers(pair, bytes(16)), token=1)
    pair.write_used(0, head, 17, idx=1)
    with pytest.raises(RingError) as err:
        pair.driver.get_buf()
    assert "17 bytes" in str(err.value) and "16 writable" in str(err.value)
    assert pair.driver.broken


def test_device_returning_a_head_twice_breaks_the_driver_queue(pair: RingPair) -> None:
    head = pair.driver.add_buf([], buffers(pair, bytes(16)), token=1)
    pair.write_used(0, head, 1)
    pair.write_used(1, head, 1, idx=2)
    assert pair.driver.get_buf() == (1, 1)
    with pytest.raises(RingError):
        pair.driver.get_buf()


def test_device_moving_used_idx_too_far_breaks_the_driver_queue(pair: RingPair) -> None:
    pair.driver.add_buf([], buffers(pair, bytes(16)), token=1)
    pair.write_used(0, 0, 0, idx=9)  # 9 > queue size 8
    with pytest.raises(RingError) as err:
        pair.driver.get_buf()
    assert "more than the queue size" in str(err.value)


def test_detach_unused_returns_every_in_flight_token_and_frees_tables(
        ipair: RingPair) -> None:
    base = ipair.alloc.allocations
    bufs = buffers(ipair, bytes(8), bytes(8))
    for t in range(5):
        ipair.driver.add_buf(bufs[:1], bufs[1:], token=t)
    assert ipair.alloc.allocations == base + 2 + 5
    assert sorted(ipair.driver.detach_unused()) == [0, 1, 2, 3, 4]
    assert ipair.driver.num_free == 8 and ipair.driver.in_flight == 0
    assert ipair.alloc.allocations == base + 2


# ---- byte order ---------------------------------------------------------------------------


def test_big_endian_rings_work_end_to_end_and_are_big_endian_in_memory() -> None:
    p = make_pair(4, endian=BE)
    try:
        (o,) = buffers(p, b"xyz")
        (i,) = buffers(p, bytes(4))
        head = p.driver.add_buf([o], [i], token="be")
        raw_idx = p.memory.read(p.driver.avail_addr + 2, 2)
        assert raw_idx == b"\x00\x01"
        raw_desc = p.memory.read(p.driver.desc_addr + 16 * head, 16)
        assert raw_desc[:8] == o[0].to_bytes(8, "big") and raw_desc[8:12] == b"\0\0\0\x03"
        chain = p.device.pop()
        assert chain is not None and chain.read() == b"xyz"
        p.device.push(chain, 4)
        assert p.memory.read(p.driver.used_addr + 2, 2) == b"\x00\x01"
        assert p.memory.read(p.driver.used_addr + 4, 8) == head.to_bytes(4, "big") + (
            b"\0\0\0\x04")
        assert p.driver.get_buf() == ("be", 4)
    finally:
        p.close()


# ---- chain helpers -------------------------------------------------------------------------


def test_gather_scatter_and_split_segments() -> None:
    a, b, c = bytearray(3), bytearray(4), bytearray(5)
    segs = [memoryview(a), memoryview(b), memoryview(c)]
    assert scatter(segs, b"0123456789AB") == 12
    assert (a, b, c) == (bytearray(b"012"), bytearray(b"3456"), bytearray(b"789AB"))
    assert gather(segs) == b"0123456789AB"
    assert gather(segs, 5) == b"01234"
    assert gather(segs, 0) == b""
    assert scatter(segs, b"xy", offset=5) == 2 and bytes(b) == b"34xy"
    assert scatter(segs, b"too long for what is left", offset=10) == 2
    head, rest = split_segments(segs, 5)
    assert [bytes(s) for s in head] == [b"012", b"34"]
    assert [bytes(s) for s in rest] == [b"xy", b"789to"]
    head, rest = split_segments(segs, 3)
    assert [len(s) for s in head] == [3] and [len(s) for s in rest] == [4, 5]
    assert gather([memoryview(b"single")]) == b"single"
