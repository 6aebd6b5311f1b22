"""Random interleavings of both ends of a split ring, checked against a reference model.

Hypothesis drives a DriverQueue (add_buf, kick_prepare, get_buf, disable_cb, enable_cb,
enable_cb_delayed) and a DeviceQueue (pop, push, push_many, needs_notification,
disable/enable_notifications) on one ring: out-of-order completion, queue sizes 1..256,
with and without EVENT_IDX and INDIRECT, and starting indices near 65535 so the free-running
16-bit indices wrap.

The model below is written from the VIRTIO 1.x rules and Linux's virtio_ring.c/vhost
behaviour, not from pyvirtio's code: it tracks what each side must have written into the
shared notification fields (avail->flags, used_event, used->flags, avail_event) and decides
every kick and every interrupt with its own ``need_event``. On top of that exact model, two
liveness properties are checked independently of the fields' values: a driver that
re-enabled callbacks with nothing pending is interrupted by the next completion, and a
device that re-enabled notifications with nothing pending is kicked for the next buffer.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.ring import RingPair, make_pair
from pyvirtio.ring import DescriptorChain, QueueFullError

SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def need_event(event: int, new: int, old: int) -> bool:
    """Notify iff ``event`` lies in the window [old, new) of free-running 16-bit indices."""
    window = (new - old) & 0xFFFF
    return any((old + k) & 0xFFFF == event for k in range(window))


@dataclass
class Buffer:
    token: int
    out: list[tuple[int, int]]
    ins: list[tuple[int, int]]
    data: bytes
    descriptors: int  # table descriptors it occupies
    allocations: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return sum(n for _, n in self.ins)


class Model:
    """What both sides must have done, and what each decision must be."""

    def __init__(self, size: int, event_idx: bool, indirect: bool, start: int) -> None:
        self.size, self.event_idx, self.indirect = size, event_idx, indirect
        # driver
        self.avail = start
        self.last_used = start
        self.num_added = 0
        self.cb_disabled = False
        self.used_event = start  # in memory
        self.avail_flags = 0  # in memory
        self.free = size
        # device
        self.last_avail = start
        self.used = start
        self.kicks_enabled = True
        self.avail_event = start  # in memory
        self.used_flags = 0  # in memory
        self.signalled = start
        self.signalled_valid = False
        # buffers
        self.pending: deque[Buffer] = deque()  # added, not popped (avail ring order)
        self.popped: dict[int, tuple[Buffer, DescriptorChain]] = {}  # head -> popped
        self.used_fifo: deque[tuple[Buffer, int]] = deque()  # pushed, not collected
        self.returned: set[int] = set()
        # liveness bookkeeping
        self.driver_sleeping = False  # enable_cb said True: only an interrupt wakes it
        self.pushed_while_sleeping = 0
        self.device_sleeping = False  # enable_notifications said False: only a kick wakes it
        self.added_while_sleeping = 0


class Runner:
    def __init__(self, pair: RingPair, model: Model, data: st.DataObject) -> None:
        self.p, self.m, self.data = pair, model, data
        self.next_token = 1
        self.refused: set[int] = set()  # tokens add_buf refused with QueueFullError
        self.alloc_baseline = pair.alloc.allocations

    def draw(self, strategy: st.SearchStrategy):  # type: ignore[no-untyped-def]
        return self.data.draw(strategy)

    # ---- driver -------------------------------------------------------------------------

    def add(self) -> None:
        m, p = self.m, self.p
        n_out = self.draw(st.integers(0, 3))
        n_in = self.draw(st.integers(0 if n_out else 1, 3))
        lengths = [self.draw(st.integers(1, 48)) for _ in range(n_out + n_in)]
        total = n_out + n_in
        descriptors = 1 if m.indirect and total > 1 else total
        token = self.next_token
        self.next_token += 1
        buf = Buffer(token, [], [], b"", descriptors)
        data = os.urandom(sum(lengths[:n_out]))
        pos = 0
        for i, n in enumerate(lengths):
            addr = p.alloc.alloc(n, 8)
            buf.allocations.append(addr)
            if i < n_out:
                p.memory.write(addr, data[pos : pos + n])
                pos += n
                buf.out.append((addr, n))
            else:
                p.memory.write(addr, b"\xee" * n)
                buf.ins.append((addr, n))
        buf.data = data
        if descriptors > m.free:
            with pytest.raises(QueueFullError):
                p.driver.add_buf(buf.out, buf.ins, token)
            for addr in buf.allocations:
                p.alloc.free(addr)
            self.refused.add(token)
            return
        p.driver.add_buf(buf.out, buf.ins, token)
        m.free -= descriptors
        m.avail = (m.avail + 1) & 0xFFFF
        m.num_added += 1
        m.pending.append(buf)
        if m.device_sleeping:
            m.added_while_sleeping += 1

    def kick_prepare(self) -> None:
        m = self.m
        old = (m.avail - m.num_added) & 0xFFFF
        if m.event_idx:
            expect = need_event(m.avail_event, m.avail, old)
        else:
            expect = not m.used_flags & 1
        got = self.p.driver.kick_prepare()
        assert got == expect, f"kick_prepare {got}, model {expect}"
        if m.device_sleeping and m.added_while_sleeping:
            assert got, "lost kick: the device is waiting for buffers that were added"
        if got:
            m.device_sleeping = False  # the kick wakes it
        m.num_added = 0

    def get_buf(self) -> None:
        m, p = self.m, self.p
        got = p.driver.get_buf()
        m.driver_sleeping = False
        if not m.used_fifo:
            assert got is None
            return
        buf, written = m.used_fifo.popleft()
        assert got == (buf.token, written)
        assert buf.token not in m.returned
        m.returned.add(buf.token)
        filled = b"".join(p.memory.read(a, n) for a, n in buf.ins)
        assert filled[:written] == pattern(buf.token, written)  # what the device wrote
        assert filled[written:] == b"\xee" * (len(filled) - written)  # and nothing more
        for addr in buf.allocations:
            p.alloc.free(addr)
        m.free += buf.descriptors
        m.last_used = (m.last_used + 1) & 0xFFFF
        if m.event_idx and not m.cb_disabled:
            m.used_event = m.last_used

    def disable_cb(self) -> None:
        m = self.m
        self.p.driver.disable_cb()
        m.driver_sleeping = False
        if not m.cb_disabled:
            m.cb_disabled = True
            if m.event_idx:
                m.used_event = (m.last_used - 1) & 0xFFFF  # as far away as it gets
            else:
                m.avail_flags = 1

    def _enable(self) -> None:
        m = self.m
        if m.cb_disabled:
            m.cb_disabled = False
            if not m.event_idx:
                m.avail_flags = 0

    def enable_cb(self) -> None:
        m = self.m
        self._enable()
        m.used_event = m.last_used
        expect = m.used == m.last_used  # False: buffers were used meanwhile (the race)
        got = self.p.driver.enable_cb()
        assert got == expect
        if got:
            m.driver_sleeping = True
            m.pushed_while_sleeping = 0

    def enable_cb_delayed(self) -> None:
        m = self.m
        self._enable()
        bufs = ((m.avail - m.last_used) & 0xFFFF) * 3 // 4
        m.used_event = (m.last_used + bufs) & 0xFFFF
        expect = (m.used - m.last_used) & 0xFFFF <= bufs
        assert self.p.driver.enable_cb_delayed() == expect
        m.driver_sleeping = False  # it promised an interrupt only after `bufs` more

    # ---- device -------------------------------------------------------------------------

    def pop(self) -> None:
        m, p = self.m, self.p
        chain = p.device.pop()
        m.device_sleeping = False
        if not m.pending:
            assert chain is None
            return
        buf = m.pending.popleft()
        assert chain is not None
        assert chain.head not in m.popped
        assert chain.read() == buf.data
        assert chain.readable_len == len(buf.data)
        assert chain.writable_len == buf.capacity
        m.popped[chain.head] = (buf, chain)
        m.last_avail = (m.last_avail + 1) & 0xFFFF
        if m.event_idx and m.kicks_enabled:
            m.avail_event = m.last_avail

    def _complete(self, head: int) -> tuple[DescriptorChain, int]:
        m = self.m
        buf, chain = m.popped.pop(head)
        written = self.draw(st.integers(0, chain.writable_len))
        assert chain.write(pattern(buf.token, written)) == written
        m.used_fifo.append((buf, written))
        m.used = (m.used + 1) & 0xFFFF
        if m.driver_sleeping:
            m.pushed_while_sleeping += 1
        return chain, written

    def push(self) -> None:
        if not self.m.popped:
            return
        head = self.draw(st.sampled_from(sorted(self.m.popped)))  # any order
        chain, written = self._complete(head)
        self.p.device.push(chain, written)

    def push_many(self) -> None:
        if not self.m.popped:
            return
        heads = self.draw(st.lists(st.sampled_from(sorted(self.m.popped)), min_size=1,
                                   unique=True))
        done = [self._complete(h) for h in heads]
        assert self.p.device.push_many(done) == len(done)

    def needs_notification(self) -> None:
        m = self.m
        new, old, valid = m.used, m.signalled, m.signalled_valid
        if new == old:
            expect = False  # nothing new (and no reference point is taken)
        else:
            m.signalled, m.signalled_valid = new, True
            if m.event_idx:
                # A fresh or restored queue has no reference point: notify to be safe.
                expect = True if not valid else need_event(m.used_event, new, old)
            else:
                expect = not m.avail_flags & 1
        got = self.p.device.needs_notification()
        assert got == expect, f"needs_notification {got}, model {expect}"
        if m.driver_sleeping and m.pushed_while_sleeping:
            assert got, "lost interrupt: the driver sleeps on buffers that were used"
        if got:
            m.driver_sleeping = False

    def disable_notifications(self) -> None:
        m = self.m
        self.p.device.disable_notifications()
        m.device_sleeping = False  # it is awake and polling
        m.kicks_enabled = False
        if not m.event_idx:
            m.used_flags = 1

    def enable_notifications(self) -> None:
        m = self.m
        m.kicks_enabled = True
        if m.event_idx:
            m.avail_event = m.last_avail
        else:
            m.used_flags = 0
        expect = m.avail != m.last_avail
        assert self.p.device.enable_notifications() == expect
        if not expect:
            m.device_sleeping = True
            m.added_while_sleeping = 0

    # ---- checks -------------------------------------------------------------------------

    def check_shared_fields(self) -> None:
        m, p = self.m, self.p
        assert p.avail_idx() == m.avail
        assert p.used_idx() == m.used
        assert p.avail_flags() == m.avail_flags
        assert p.used_flags() == m.used_flags
        if m.event_idx:
            assert p.used_event() == m.used_event
            assert p.avail_event() == m.avail_event
        assert p.driver.num_free == m.free
        assert p.device.pending() == len(m.pending)
        assert p.driver.has_used() == bool(m.used_fifo)
        assert sorted(p.device.in_flight()) == sorted(m.popped)

    def quiesce(self) -> None:
        """Complete everything; then nothing may be left over anywhere."""
        m, p = self.m, self.p
        for _ in range(m.size + 1):
            if not m.pending:
                break
            self.pop()
        while m.popped:
            self.push()
        while m.used_fifo:
            self.get_buf()
        self.get_buf()  # and one more: nothing
        self.check_shared_fields()
        assert m.returned == set(range(1, self.next_token)) - self.refused
        assert p.driver.num_free == m.size
        assert p.driver.in_flight == 0
        assert p.device.in_flight() == []
        assert p.alloc.allocations == self.alloc_baseline  # no indirect table leaked


def pattern(token: int, n: int) -> bytes:
    return bytes((token * 31 + i) & 0xFF for i in range(n))


OPS = {
    "add": 6, "kick_prepare": 3, "pop": 5, "push": 4, "push_many": 1, "needs_notification": 3,
    "get_buf": 5, "disable_cb": 1, "enable_cb": 2, "enable_cb_delayed": 1,
    "disable_notifications": 1, "enable_notifications": 2,
}
OP_LIST = [name for name, weight in OPS.items() for _ in range(weight)]


@st.composite
def starts(draw: st.DrawFn, size: int) -> int:
    kind = draw(st.sampled_from(["zero", "wrap", "any"]))
    if kind == "zero":
        return 0
    if kind == "wrap":
        return (0x10000 - draw(st.integers(0, 2 * size + 2))) & 0xFFFF
    return draw(st.integers(0, 0xFFFF))


def run_interleaving(event_idx: bool, indirect: bool, data: st.DataObject) -> None:
    size = data.draw(st.sampled_from(SIZES), label="size")
    start = data.draw(starts(size), label="start")
    p = make_pair(size, event_idx=event_idx, indirect=indirect, start_idx=start)
    try:
        runner = Runner(p, Model(size, event_idx, indirect, start), data)
        runner.check_shared_fields()
        for _ in range(data.draw(st.integers(0, 120), label="ops")):
            op = data.draw(st.sampled_from(OP_LIST))
            getattr(runner, op)()
            runner.check_shared_fields()
        runner.quiesce()
    finally:
        p.close()


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])


@PROPERTY_SETTINGS
@given(data=st.data())
def test_interleavings_plain(data: st.DataObject) -> None:
    run_interleaving(False, False, data)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_interleavings_event_idx(data: st.DataObject) -> None:
    run_interleaving(True, False, data)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_interleavings_indirect(data: st.DataObject) -> None:
    run_interleaving(False, True, data)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_interleavings_event_idx_and_indirect(data: st.DataObject) -> None:
    run_interleaving(True, True, data)


def test_reference_need_event_agrees_with_the_spec_helper_everywhere_near_the_wrap() -> None:
    from pyvirtio.spec.split import vring_need_event

    for old in (0, 1, 0xFFF0, 0xFFFF):
        for window in range(0, 40):
            new = (old + window) & 0xFFFF
            for event in range(0x10000 - 24, 0x10000 + 24):
                event &= 0xFFFF
                assert vring_need_event(event, new, old) == need_event(event, new, old)
