"""Random interleavings of both ends of a ring, for both formats, checked against a model of
what a virtqueue must do whatever its layout.

Hypothesis drives the driver (add_buf, kick_prepare, get_buf, disable_cb, enable_cb,
enable_cb_delayed) and the device (pop, push, push_many, needs_notification,
disable/enable_notifications) of a split or a packed ring: out-of-order completion, queue
sizes that wrap the ring (and the packed wrap counters) many times, with and without
EVENT_IDX, INDIRECT_DESC and IN_ORDER. (test_split_properties.py additionally checks the
split ring's shared fields one by one.)

The model knows nothing of either layout: buffers are popped in the order they were added
with exactly the bytes the driver put there; every completion reaches the driver once with
the length the device reported (with IN_ORDER, in pop order: a device completing out of
order is held back, and a run published as one used entry still reports each buffer's own
length, since only completely filled buffers are folded into a run); add_buf refuses
exactly when the descriptors it needs are not free; enable_cb reports the race exactly
(False iff a used buffer is waiting). Liveness: a driver that went to sleep after
enable_cb said True is interrupted by the next completion, a device that went to sleep
after enable_notifications said False is kicked for the next buffer.

The last test runs one random workload through a split and a packed ring and requires the
same (token, length) sequence from both.
"""

from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.ring import AnyPair, make_any_pair
from pyvirtio.ring import DescriptorChain, QueueFullError
from pyvirtio.ring.packed import encode

SPLIT_SIZES = [1, 2, 4, 8, 16, 64, 256]
PACKED_SIZES = [1, 2, 3, 5, 8, 13, 64, 255]


@dataclass
class Buffer:
    token: int
    out: list[tuple[int, int]]
    ins: list[tuple[int, int]]
    data: bytes
    descriptors: int
    allocations: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return sum(n for _, n in self.ins)


class Runner:
    def __init__(self, pair: AnyPair, in_order: bool, draw: st.DrawFn | None,
                 rnd: random.Random | None = None) -> None:
        self.p = pair
        self.in_order = in_order
        self._draw = draw
        self.rnd = rnd
        self.size = pair.driver.size
        self.free = self.size
        self.next_token = 1
        self.refused: set[int] = set()
        self.pending: deque[Buffer] = deque()  # added, not popped
        self.popped: dict[int, tuple[Buffer, DescriptorChain]] = {}  # head/id -> popped
        self.pop_order: list[list[object]] = []  # IN_ORDER: [buffer, written or None]
        self.used_fifo: deque[tuple[Buffer, int]] = deque()  # published, not collected
        self.returned: list[tuple[int, int]] = []
        self.alloc_baseline = pair.alloc.allocations
        self.driver_sleeping = False
        self.published_while_sleeping = 0
        self.device_sleeping = False
        self.added_while_sleeping = 0

    def integers(self, lo: int, hi: int) -> int:
        if self._draw is not None:
            return self._draw(st.integers(lo, hi))
        assert self.rnd is not None
        return self.rnd.randint(lo, hi)

    def choice(self, items: list[int]) -> int:
        return items[self.integers(0, len(items) - 1)]

    # ---- driver -------------------------------------------------------------------------

    def add(self) -> None:
        p = self.p
        n_out = self.integers(0, 3)
        n_in = self.integers(0 if n_out else 1, 3)
        lengths = [self.integers(1, 48) for _ in range(n_out + n_in)]
        total = n_out + n_in
        descriptors = 1 if p.driver.indirect and total > 1 else total
        token = self.next_token
        self.next_token += 1
        data = bytes((token * 7 + i) & 0xFF for i in range(sum(lengths[:n_out])))
        buf = Buffer(token, [], [], data, descriptors)
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
        if descriptors > self.free:
            with pytest.raises(QueueFullError):
                p.driver.add_buf(buf.out, buf.ins, token)
            for addr in buf.allocations:
                p.alloc.free(addr)
            self.refused.add(token)
            return
        p.driver.add_buf(buf.out, buf.ins, token)
        self.free -= descriptors
        self.pending.append(buf)
        if self.device_sleeping:
            self.added_while_sleeping += 1

    def kick_prepare(self) -> None:
        got = self.p.driver.kick_prepare()
        if self.device_sleeping and self.added_while_sleeping:
            assert got, "lost kick: the device sleeps while buffers were added"
        if got:
            self.device_sleeping = False

    def get_buf(self) -> None:
        p = self.p
        got = p.driver.get_buf()
        self.driver_sleeping = False
        if not self.used_fifo:
            assert got is None
            return
        buf, written = self.used_fifo.popleft()
        assert got == (buf.token, written)
        self.returned.append((buf.token, written))
        filled = b"".join(p.memory.read(a, n) for a, n in buf.ins)
        assert filled[:written] == pattern(buf.token, written)
        assert filled[written:] == b"\xee" * (len(filled) - written)
        for addr in buf.allocations:
            p.alloc.free(addr)
        self.free += buf.descriptors

    def disable_cb(self) -> None:
        self.p.driver.disable_cb()
        self.driver_sleeping = False

    def enable_cb(self) -> None:
        got = self.p.driver.enable_cb()
        assert got == (not self.used_fifo), "enable_cb misjudged the race"
        if got:
            self.driver_sleeping = True
            self.published_while_sleeping = 0

    def enable_cb_delayed(self) -> None:
        got = self.p.driver.enable_cb_delayed()
        if self.used_fifo and not got:
            pass  # it asks us to collect: fine
        self.driver_sleeping = False  # it promised an interrupt only after more completions

    # ---- device -------------------------------------------------------------------------

    def pop(self) -> None:
        chain = self.p.device.pop()
        self.device_sleeping = False
        if not self.pending:
            assert chain is None
            return
        buf = self.pending.popleft()
        assert chain is not None
        assert chain.head not in self.popped
        assert chain.read() == buf.data
        assert chain.writable_len == buf.capacity
        self.popped[chain.head] = (buf, chain)
        if self.in_order:
            self.pop_order.append([buf, None])

    def _by_token(self) -> list[int]:
        """Popped heads in the order of their tokens (head numbers differ by format)."""
        return sorted(self.popped, key=lambda h: self.popped[h][0].token)

    def _complete(self, head: int) -> tuple[DescriptorChain, int]:
        buf, chain = self.popped.pop(head)
        written = self.integers(0, chain.writable_len)
        assert chain.write(pattern(buf.token, written)) == written
        if not self.in_order:
            self.used_fifo.append((buf, written))
            self.published_while_sleeping += 1
            return chain, written
        for entry in self.pop_order:
            if entry[0] is buf:
                entry[1] = written
        while self.pop_order and self.pop_order[0][1] is not None:
            b, w = self.pop_order.pop(0)
            assert isinstance(b, Buffer) and isinstance(w, int)
            self.used_fifo.append((b, w))
            self.published_while_sleeping += 1
        return chain, written

    def push(self) -> None:
        if not self.popped:
            return
        head = self.choice(self._by_token())  # any order
        chain, written = self._complete(head)
        self.p.device.push(chain, written)

    def push_many(self) -> None:
        if not self.popped:
            return
        heads = self._by_token()
        count = self.integers(1, len(heads))
        picked = []
        for _ in range(count):
            h = self.choice(heads)
            heads.remove(h)
            picked.append(h)
        done = [self._complete(h) for h in picked]
        assert self.p.device.push_many(done) == len(done)

    def needs_notification(self) -> None:
        got = self.p.device.needs_notification()
        if self.driver_sleeping and self.published_while_sleeping:
            assert got, "lost interrupt: the driver sleeps on buffers that were used"
        if got:
            self.driver_sleeping = False

    def disable_notifications(self) -> None:
        self.p.device.disable_notifications()
        self.device_sleeping = False

    def enable_notifications(self) -> None:
        got = self.p.device.enable_notifications()
        assert got == bool(self.pending), "enable_notifications misjudged the race"
        if not got:
            self.device_sleeping = True
            self.added_while_sleeping = 0

    # ---- checks -------------------------------------------------------------------------

    def check(self) -> None:
        p = self.p
        assert p.driver.num_free == self.free
        assert p.driver.has_used() == bool(self.used_fifo)
        assert sorted(p.device.in_flight()) == sorted(self.popped)

    def quiesce(self) -> None:
        for _ in range(self.size + 1):
            if not self.pending:
                break
            self.pop()
        while self.popped:
            self.push()
        while self.used_fifo:
            self.get_buf()
        self.get_buf()
        self.check()
        assert {t for t, _ in self.returned} == set(range(1, self.next_token)) - self.refused
        assert self.p.driver.num_free == self.size
        assert self.p.driver.in_flight == 0
        assert self.p.device.in_flight() == []
        assert self.p.alloc.allocations == self.alloc_baseline


def pattern(token: int, n: int) -> bytes:
    return bytes((token * 31 + i) & 0xFF for i in range(n))


OPS = {
    "add": 6, "kick_prepare": 3, "pop": 5, "push": 4, "push_many": 1, "needs_notification": 3,
    "get_buf": 5, "disable_cb": 1, "enable_cb": 2, "enable_cb_delayed": 1,
    "disable_notifications": 1, "enable_notifications": 2,
}
OP_LIST = [name for name, weight in OPS.items() for _ in range(weight)]
FLAGS = [(e, i, o) for e in (False, True) for i in (False, True) for o in (False, True)]
FLAG_IDS = [f"{'event_idx' if e else 'notify'}-{'indirect' if i else 'direct'}-"
            f"{'in_order' if o else 'any_order'}" for e, i, o in FLAGS]


@st.composite
def ring_start(draw: st.DrawFn, fmt: str, size: int) -> int:
    if fmt == "split":
        return draw(st.sampled_from([0, (0x10000 - draw(st.integers(0, 2 * size + 2)))
                                     & 0xFFFF, draw(st.integers(0, 0xFFFF))]))
    return encode(draw(st.integers(0, size - 1)), draw(st.integers(0, 1)))


PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])


@pytest.mark.parametrize("fmt", ["split", "packed"])
@pytest.mark.parametrize(("event_idx", "indirect", "in_order"), FLAGS, ids=FLAG_IDS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_interleavings(fmt: str, event_idx: bool, indirect: bool, in_order: bool,
                       data: st.DataObject) -> None:
    size = data.draw(st.sampled_from(SPLIT_SIZES if fmt == "split" else PACKED_SIZES),
                     label="size")
    start = data.draw(ring_start(fmt, size), label="start")
    p = make_any_pair(fmt, size, event_idx=event_idx, indirect=indirect, in_order=in_order,
                      start=start)
    try:
        runner = Runner(p, in_order, data.draw)
        runner.check()
        for _ in range(data.draw(st.integers(0, 150), label="ops")):
            getattr(runner, data.draw(st.sampled_from(OP_LIST)))()
            runner.check()
        runner.quiesce()
    finally:
        p.close()


def run_workload(fmt: str, size: int, seed: int, steps: int,
                 **flags: bool) -> list[tuple[int, int]]:
    p = make_any_pair(fmt, size, **flags)
    try:
        runner = Runner(p, flags.get("in_order", False), None, random.Random(seed))
        ops = random.Random(seed ^ 0x5EED)
        for _ in range(steps):
            getattr(runner, ops.choice(OP_LIST))()
        runner.quiesce()
        return runner.returned
    finally:
        p.close()


@pytest.mark.parametrize(("event_idx", "indirect", "in_order"), FLAGS, ids=FLAG_IDS)
def test_split_and_packed_return_the_same_token_length_sequence(
        event_idx: bool, indirect: bool, in_order: bool) -> None:
    """The same random workload (the same adds, pops, out-of-order pushes, collections,
    with the same sizes and lengths) through a split and a packed ring of the same size."""
    flags = {"event_idx": event_idx, "indirect": indirect, "in_order": in_order}
    seeds = int(os.environ.get("PYVIRTIO_RING_SEEDS", "20"))
    for seed in range(seeds):
        size = [4, 8, 16, 64][seed % 4]
        split = run_workload("split", size, seed, 3000, **flags)
        packed = run_workload("packed", size, seed, 3000, **flags)
        assert len(split) > 100
        assert split == packed, f"seed {seed}: the formats diverged"
