"""Hostile split rings: generators of malformed rings, for proving a device survives its driver.

A device reads descriptor tables and avail rings that a guest driver wrote, and a driver may
be buggy or malicious. :class:`HostileRingGenerator` writes split rings into a
:class:`~pyvirtio.memory.GuestMemory` — valid ones, ones with exactly one targeted defect, and
random garbage or random mutations of valid rings — and describes each as a
:class:`HostileCase`: where the ring is, which features to start the device queue with, and a
:class:`Verdict` saying whether the ring must break the queue, for which :class:`Reason`,
naming which descriptor (and address), and which chains the device must pop before that.

The verdict comes from :func:`judge_ring`, a reference reader of the VIRTIO 1.x split ring
rules written independently of :mod:`pyvirtio.ring.split`: it reads a *copy* of the memory
with its own address translation, so a disagreement between the two is a bug in one of them.

Targeted defects (:class:`Defect`): a descriptor index at or beyond the queue size (in the
avail ring or in a ``next`` field); a chain longer than its table (a loop), in the
descriptor table or in an indirect table; INDIRECT inside an indirect table; INDIRECT
together with NEXT; INDIRECT when VIRTIO_F_INDIRECT_DESC was not negotiated; an indirect
table of 0 bytes or not a multiple of 16, or over the device's size limit; a buffer or table
outside guest memory (in a hole, past the end, straddling the end of memory, a table
straddling two regions); address + length overflowing 64 bits; avail->idx more than the queue
size ahead; a device-readable descriptor after a device-writable one; a head made available
again while it is still in flight.

Driving a case (the device side pops every chain, then completes them)::

    gen = HostileRingGenerator(memory, seed=1)
    for case in gen.cases(10_000):
        queue = case.device_queue(memory)
        try:
            for _ in range(case.size + 1):       # pop is bounded by the queue size
                chain = queue.pop()
                if chain is None:
                    break
                if case.complete_each:
                    queue.push(chain, 0)
        except RingError as exc:
            assert case.verdict.mismatch(str(exc)) is None
        else:
            assert not case.verdict.broken

``complete_each`` says how the harness must complete chains for the verdict to hold: True
means push every chain right after popping it (a head may then legitimately be offered
again), False means pop everything first (then a repeated head is a violation). Buffers of
``complete_each`` cases never overlap the rings or indirect tables, so completing a chain
cannot change what later pops read.
"""

from __future__ import annotations

import enum
import random
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.errors import LocalError
from pyvirtio.memory import GuestMemory
from pyvirtio.ring.split import MAX_INDIRECT_DESCRIPTORS, DeviceQueue

__all__ = [
    "Defect",
    "ExpectedChain",
    "HostileCase",
    "HostileRingGenerator",
    "Reason",
    "Verdict",
    "judge_ring",
]

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_NEXT, _WRITE, _INDIRECT = 1, 2, 4
_U64 = 1 << 64


class _Rng(random.Random):
    """``random.Random`` with the very same stream, minus the argument checks of
    ``randrange``/``randint`` (each a Python frame or two more): the generators draw a few
    hundred numbers per ring, and the checks were a tenth of a ring's cost."""

    def randrange(self, start: int, stop: int | None = None,
                  step: int = 1) -> int:
        if step == 1:
            if stop is None:
                if start > 0:
                    return self._randbelow(start)  # type: ignore[attr-defined]
            elif stop > start:
                return start + self._randbelow(stop - start)  # type: ignore[attr-defined]
        return super().randrange(start, stop, step)

    def randint(self, a: int, b: int) -> int:
        return self.randrange(a, b + 1)


class Reason(enum.Enum):
    """Why a ring must break the queue. ``pattern`` matches pyvirtio's RingError wording."""

    AVAIL_AHEAD = r"avail idx \d+ is \d+ entries ahead of last_avail_idx \d+, more than the"
    HEAD_RANGE = r"holds descriptor index \d+, beyond the queue size"
    DOUBLE_HEAD = r"was made available again while in flight"
    DESC_RANGE = r"is beyond the table size"
    LOOP = r"makes the chain longer than its table .*: a loop"
    NESTED_INDIRECT = r"is INDIRECT inside an indirect table"
    INDIRECT_NOT_NEGOTIATED = r"is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated"
    INDIRECT_WITH_NEXT = r"has both INDIRECT and NEXT"
    INDIRECT_LENGTH = r"not a positive multiple of 16"
    INDIRECT_TOO_LARGE = r"descriptors, over the limit of"
    OUTSIDE_MEMORY = r"outside guest memory"
    OVERFLOW = r"overflows 64 bits"
    READ_AFTER_WRITE = r"is readable but follows a writable descriptor"

    @property
    def names_address(self) -> bool:
        """Whether the message must also name the offending guest address."""
        return self in (Reason.OUTSIDE_MEMORY, Reason.OVERFLOW)

    def matches(self, message: str) -> bool:
        return re.search(self.value, message) is not None


class Defect(enum.Enum):
    """What the generator did to the ring."""

    NONE = "valid ring"
    HEAD_RANGE = "avail ring entry >= queue size"
    DESC_RANGE = "next field >= table size"
    LOOP = "chain loops in the descriptor table"
    INDIRECT_LOOP = "chain loops inside an indirect table"
    NESTED_INDIRECT = "indirect descriptor inside an indirect table"
    INDIRECT_WITH_NEXT = "INDIRECT together with NEXT"
    INDIRECT_NOT_NEGOTIATED = "INDIRECT without VIRTIO_F_INDIRECT_DESC"
    INDIRECT_LENGTH = "indirect table length 0 or not a multiple of 16"
    INDIRECT_TOO_LARGE = "indirect table over the device's limit"
    OUTSIDE_MEMORY = "buffer outside guest memory"
    TABLE_OUTSIDE_MEMORY = "indirect table outside guest memory or across regions"
    OVERFLOW = "address + length overflows 64 bits"
    AVAIL_AHEAD = "avail idx more than the queue size ahead"
    READ_AFTER_WRITE = "readable descriptor after a writable one"
    DOUBLE_HEAD = "head made available twice while in flight"
    GARBAGE = "random garbage"
    MUTATION = "random mutation of a valid ring"

    @property
    def reason(self) -> Reason | None:
        """The reason this defect must produce (None: valid, or decided by the judge)."""
        return _DEFECT_REASON.get(self)


_DEFECT_REASON = {
    Defect.HEAD_RANGE: Reason.HEAD_RANGE,
    Defect.DESC_RANGE: Reason.DESC_RANGE,
    Defect.LOOP: Reason.LOOP,
    Defect.INDIRECT_LOOP: Reason.LOOP,
    Defect.NESTED_INDIRECT: Reason.NESTED_INDIRECT,
    Defect.INDIRECT_WITH_NEXT: Reason.INDIRECT_WITH_NEXT,
    Defect.INDIRECT_NOT_NEGOTIATED: Reason.INDIRECT_NOT_NEGOTIATED,
    Defect.INDIRECT_LENGTH: Reason.INDIRECT_LENGTH,
    Defect.INDIRECT_TOO_LARGE: Reason.INDIRECT_TOO_LARGE,
    Defect.OUTSIDE_MEMORY: Reason.OUTSIDE_MEMORY,
    Defect.TABLE_OUTSIDE_MEMORY: Reason.OUTSIDE_MEMORY,
    Defect.OVERFLOW: Reason.OVERFLOW,
    Defect.AVAIL_AHEAD: Reason.AVAIL_AHEAD,
    Defect.READ_AFTER_WRITE: Reason.READ_AFTER_WRITE,
    Defect.DOUBLE_HEAD: Reason.DOUBLE_HEAD,
}


# ---- the reference judge ------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedChain:
    """A chain the device must pop: its head and its segments as ``(gpa, length)`` pairs,
    split where a buffer crosses from one memory region into the next."""

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


@dataclass(frozen=True)
class Verdict:
    """What a correct device does with a ring.

    ``chains`` are popped, in order, before the ring breaks (all of them if it is valid).
    ``reasons`` is empty for a valid ring; otherwise the violations found at the first bad
    element (any one of them is a correct report). ``culprit`` is a regular expression that
    the error message must match: it names the descriptor (``chain 3: indirect descriptor
    (table of descriptor 3) 2``), the avail ring entry or the avail index. ``address`` is the
    guest address a memory violation must name.
    """

    chains: tuple[ExpectedChain, ...]
    reasons: frozenset[Any] = frozenset()  # Reason, or PackedReason for packed rings
    culprit: str | None = None
    address: int | None = None

    @property
    def broken(self) -> bool:
        return bool(self.reasons)

    def mismatch(self, message: str) -> str | None:
        """None if ``message`` is a correct report of this verdict, else what is wrong."""
        if not self.reasons:
            return f"a valid ring broke the queue: {message}"
        matched = [r for r in self.reasons if r.matches(message)]
        if not matched:
            names = ", ".join(sorted(r.name for r in self.reasons))
            return f"reason is none of {names}: {message}"
        if self.culprit is not None and re.search(self.culprit, message) is None:
            return f"reason does not name the culprit /{self.culprit}/: {message}"
        if self.address is not None and any(r.names_address for r in matched):
            if f"0x{self.address:x}" not in message:
                return f"reason does not name address 0x{self.address:x}: {message}"
        return None


class _Snapshot:
    """A private copy of guest memory with its own address translation."""

    def __init__(self, regions: Sequence[tuple[int, bytes]]) -> None:
        self.regions = sorted(regions, key=lambda r: r[0])

    def single(self, addr: int, length: int) -> tuple[bytes, int] | None:
        """(region bytes, offset) if the whole range lies in one region."""
        for gpa, data in self.regions:
            if gpa <= addr and addr + length <= gpa + len(data):
                return data, addr - gpa
        return None

    def spans(self, addr: int, length: int) -> list[tuple[int, int]] | None:
        """The range cut at region boundaries, or None if any byte is unbacked."""
        out = []
        cur, end = addr, addr + length
        while cur < end:
            for gpa, data in self.regions:
                if gpa <= cur < gpa + len(data):
                    n = min(end, gpa + len(data)) - cur
                    out.append((cur, n))
                    cur += n
                    break
            else:
                return None
        return out


class _Broken(Exception):
    def __init__(self, reasons: set[Any], culprit: str, address: int | None = None) -> None:
        super().__init__(culprit)
        self.reasons = frozenset(reasons)
        self.culprit = culprit
        self.address = address


def judge_ring(
    regions: Sequence[tuple[int, bytes]],
    size: int,
    desc_addr: int,
    avail_addr: int,
    last_avail_idx: int,
    *,
    indirect: bool,
    complete_each: bool,
    max_indirect: int = MAX_INDIRECT_DESCRIPTORS,
) -> Verdict:
    """Read a split ring the way the VIRTIO 1.x rules say a device must, and say what it
    must pop and whether (and why) it must give up.

    ``regions`` are ``(gpa, bytes)`` copies of guest memory. The rules: at most ``size``
    entries may be pending; heads and ``next`` fields index their table; a chain visits at
    most as many descriptors as its table holds; zero or more direct descriptors may be
    followed by one INDIRECT descriptor (without NEXT, only when negotiated, never inside an
    indirect table) whose table is a positive multiple of 16 bytes, at most ``max_indirect``
    entries, inside one region; buffers of non-zero length lie in guest memory (adjacent
    regions may be crossed) without wrapping 64 bits; no device-readable descriptor follows
    device-writable bytes (zero-length descriptors carry no bytes and are not looked at);
    a head is not offered again while in flight (unless ``complete_each``).
    """
    mem = _Snapshot(regions)
    ring = mem.single(avail_addr, 4 + 2 * size)
    table = mem.single(desc_addr, 16 * size)
    if ring is None or table is None:
        raise LocalError("the ring itself must lie in guest memory")
    avail_data, avail_off = ring
    avail_idx = _U16.unpack_from(avail_data, avail_off + 2)[0]
    chains: list[ExpectedChain] = []
    in_flight: set[int] = set()
    last = last_avail_idx & 0xFFFF
    try:
        while True:
            pending = (avail_idx - last) & 0xFFFF
            if pending == 0:
                break
            if pending > size:
                raise _Broken({Reason.AVAIL_AHEAD}, rf"avail idx {avail_idx}(?!\d)")
            head = _U16.unpack_from(avail_data, avail_off + 4 + 2 * (last % size))[0]
            last = (last + 1) & 0xFFFF
            if head >= size:
                raise _Broken({Reason.HEAD_RANGE}, rf"descriptor index {head}(?!\d)")
            if head in in_flight:
                raise _Broken({Reason.DOUBLE_HEAD}, rf"descriptor {head} was made available")
            chains.append(_judge_chain(mem, table, size, head, indirect, max_indirect))
            if not complete_each:
                in_flight.add(head)
    except _Broken as exc:
        return Verdict(tuple(chains), exc.reasons, exc.culprit, exc.address)
    return Verdict(tuple(chains))


def _culprit(head: int, where: str, idx: int) -> str:
    """The pattern naming descriptor ``idx`` of ``where`` in chain ``head``."""
    return rf"chain {head}: {re.escape(where)} {idx}(?!\d)"


def _judge_chain(mem: _Snapshot, desc_table: tuple[bytes, int], size: int, head: int,
                 indirect_ok: bool, max_indirect: int) -> ExpectedChain:
    data, base = desc_table
    table_len = size
    where = "descriptor"
    in_indirect = False
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    idx, visited = head, 0
    while True:
        if idx >= table_len:
            raise _Broken({Reason.DESC_RANGE}, _culprit(head, where, idx))
        visited += 1
        if visited > table_len:
            raise _Broken({Reason.LOOP}, _culprit(head, where, idx))
        addr, length, flags, nxt = _DESC.unpack_from(data, base + 16 * idx)
        if flags & _INDIRECT:
            problems = set()
            if in_indirect:
                problems.add(Reason.NESTED_INDIRECT)
            if not indirect_ok:
                problems.add(Reason.INDIRECT_NOT_NEGOTIATED)
            if flags & _NEXT:
                problems.add(Reason.INDIRECT_WITH_NEXT)
            if length == 0 or length % 16:
                problems.add(Reason.INDIRECT_LENGTH)
            elif length // 16 > max_indirect:
                problems.add(Reason.INDIRECT_TOO_LARGE)
            if addr + length > _U64:
                problems.add(Reason.OVERFLOW)
            elif length and mem.single(addr, length) is None:
                problems.add(Reason.OUTSIDE_MEMORY)
            if problems:
                raise _Broken(problems, _culprit(head, where, idx), addr)
            found = mem.single(addr, length)
            assert found is not None
            data, base = found
            table_len = length // 16
            where = f"indirect descriptor (table of descriptor {idx})"
            in_indirect = True
            idx, visited = 0, 0
            continue
        writes = bool(flags & _WRITE)
        problems = set()
        spans: list[tuple[int, int]] | None = []
        if length:
            if addr + length > _U64:
                problems.add(Reason.OVERFLOW)
            else:
                spans = mem.spans(addr, length)
                if spans is None:
                    problems.add(Reason.OUTSIDE_MEMORY)
        if not writes and writable:
            problems.add(Reason.READ_AFTER_WRITE)
        if problems:
            raise _Broken(problems, _culprit(head, where, idx), addr)
        assert spans is not None
        (writable if writes else readable).extend(spans)
        if not flags & _NEXT:
            return ExpectedChain(head, tuple(readable), tuple(writable))
        idx = nxt


# ---- the generator ------------------------------------------------------------------------


@dataclass
class HostileCase:
    """One generated ring, already written into guest memory.

    Start the device queue with :meth:`device_queue` (or with these fields by hand):
    ``size`` entries at ``desc_addr``/``avail_addr``/``used_addr``, consuming from
    ``last_avail_idx`` (often just below the 16-bit wrap), with EVENT_IDX and
    INDIRECT_DESC negotiated as ``event_idx``/``indirect`` say. ``verdict`` is what a
    correct device does with it; ``description`` says what was done to the ring.
    """

    defect: Any  # a Defect (PackedDefect for packed rings)
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    last_avail_idx: int
    event_idx: bool
    indirect: bool
    #: push each chain as soon as it is popped (see the module docstring)
    complete_each: bool
    verdict: Verdict
    description: str = ""
    #: the device's limit on descriptors per indirect table (DeviceQueue.max_indirect)
    max_indirect: int = MAX_INDIRECT_DESCRIPTORS
    #: (gpa, length) of the used ring: besides the writable buffers of the verdict's
    #: chains, the only guest memory the device may write
    used_range: tuple[int, int] = (0, 0)

    def device_queue(self, memory: GuestMemory, **kwargs: object) -> DeviceQueue:
        """A DeviceQueue started on this ring with this case's features and limit."""
        queue = DeviceQueue(
            memory, self.size, self.desc_addr, self.avail_addr, self.used_addr,
            event_idx=self.event_idx, indirect=self.indirect,
            last_avail_idx=self.last_avail_idx, name=f"hostile {self.defect.name}",
            **kwargs,  # type: ignore[arg-type]
        )
        queue.max_indirect = self.max_indirect
        return queue


@dataclass
class _Chain:
    head: int
    direct: list[int]  # descriptor table indices, in chain order
    table: int | None = None  # gpa of the indirect table (last direct descriptor points at it)
    entries: list[list[int]] = field(default_factory=list)  # indirect table rows


class HostileRingGenerator:
    """Writes split rings into ``memory`` and describes them (see the module docstring).

    The rings go at the start of the first region (which needs at least 4 KiB); buffers and
    indirect tables use the rest of memory. Out-of-memory addresses are taken from the holes
    between regions, below the first and past the last. Queue sizes are drawn from
    ``sizes``; small queues make loops and wrap-arounds frequent.
    """

    def __init__(self, memory: GuestMemory, *, seed: int | None = None,
                 sizes: Sequence[int] = (1, 2, 4, 8, 8, 16, 16, 32, 64)) -> None:
        regions = memory.regions
        if not regions or regions[0].size < 4096:
            raise LocalError("the hostile ring generator needs a first region of >= 4 KiB")
        self.memory = memory
        self.rng: random.Random = _Rng(seed)
        self.sizes = tuple(sizes)
        if max(self.sizes) > 64:
            raise LocalError("hostile rings are generated for queue sizes up to 64")
        self._regions = [(r.gpa, r.size, r.buf) for r in regions]
        first = regions[0].gpa
        self.desc_addr = first
        self.avail_addr = first + 16 * 64
        self.used_addr = self.avail_addr + 4 + 2 * 64 + 2 + 2  # 4-byte aligned
        ring_end = self.used_addr + 4 + 8 * 64 + 2
        ring_end = (ring_end + 63) & ~63
        # Extents: maximal runs of adjacent regions, minus the ring area.
        extents: list[list[int]] = []
        for gpa, size, _ in self._regions:
            if extents and extents[-1][1] == gpa:
                extents[-1][1] = gpa + size
            else:
                extents.append([gpa, gpa + size])
        extents[0][0] = ring_end
        if extents[0][0] >= extents[0][1]:
            extents.pop(0)
        if not extents:
            raise LocalError("no guest memory left for buffers after the ring area")
        # Indirect tables come from the top of the largest extent, data from the rest.
        big = max(extents, key=lambda e: e[1] - e[0])
        table_bytes = min(2048, (big[1] - big[0]) // 2) & ~15
        self._table_lo, self._table_hi = big[1] - table_bytes, big[1]
        big[1] -= table_bytes
        self._data = [(lo, hi) for lo, hi in extents if hi > lo]
        self._fits: dict[int, list[tuple[int, int]]] = {}  # length -> extents it fits in
        self._boundaries = [gpa for gpa, _, _ in self._regions[1:]
                            if any(lo < gpa < hi for lo, hi in self._data)]
        lo_all = self._regions[0][0]
        hi_all = max(gpa + size for gpa, size, _ in self._regions)
        self._span = (lo_all, hi_all)
        holes = []
        prev_end = None
        for gpa, size, _ in self._regions:
            if prev_end is not None and gpa > prev_end:
                holes.append((prev_end, gpa))
            prev_end = gpa + size
        if lo_all > 0:
            holes.append((max(0, lo_all - 4096), lo_all))
        if hi_all < _U64:
            holes.append((hi_all, min(hi_all + 4096, _U64)))
        self._holes = holes
        # Region ends not followed by another region (and not the top of the address space,
        # where a straddling range would overflow instead).
        self._straddle_ends = [gpa + size for gpa, size, _ in self._regions
                               if gpa + size < _U64
                               and not any(g == gpa + size for g, _, _ in self._regions)]
        # Rows for garbage indirect tables: small buffers somewhere in or near memory.
        self._plausible_rows = [
            _DESC.pack(self.rng.randint(lo_all, hi_all - 1), self.rng.randint(0, 128),
                       self.rng.randrange(8), self.rng.randrange(8)) for _ in range(512)]

    # ---- public -----------------------------------------------------------------------

    #: the defects this generator plants (an enum with NONE, GARBAGE, MUTATION members and
    #: a ``reason`` property)
    defects: type[enum.Enum] = Defect

    def cases(self, count: int, defect: Any = None) -> Iterator[HostileCase]:
        """``count`` cases (each overwrites the previous ring)."""
        for _ in range(count):
            yield self.case(defect)

    def case(self, defect: Any = None) -> HostileCase:
        """Write one ring into memory and describe it. ``defect`` None picks one: a third
        valid, a third targeted, a third garbage or mutation."""
        r = self.rng
        kinds: Any = self.defects
        if defect is None:
            roll = r.random()
            if roll < 0.3:
                defect = kinds.NONE
            elif roll < 0.65:
                defect = r.choice([d for d in kinds if d.reason is not None])
            elif roll < 0.82:
                defect = kinds.GARBAGE
            else:
                defect = kinds.MUTATION
        for _ in range(100):
            case = self._try(defect)
            if case is not None:
                return case
        raise LocalError(f"could not generate a {defect.name} ring in this memory")

    # ---- building blocks ----------------------------------------------------------------

    def _u16_start(self, size: int) -> int:
        r = self.rng
        roll = r.random()
        if roll < 0.4:
            return (0x10000 - r.randint(0, 2 * size + 1)) & 0xFFFF  # cross the 16-bit wrap
        if roll < 0.6:
            return 0
        return r.randrange(0x10000)

    def _beyond(self, limit: int) -> int:
        """An index at or past ``limit`` (often exactly at it: off-by-one bugs live there)."""
        return limit if self.rng.random() < 0.3 else self.rng.randint(limit, 0xFFFF)

    def _data_range(self, length: int, span_boundary: bool = False) -> int:
        """An address whose ``length`` bytes are mapped (inside the data area)."""
        r = self.rng
        if span_boundary and self._boundaries and length >= 2:
            b = r.choice(self._boundaries)
            addr = b - r.randint(1, length - 1)
            if any(lo <= addr and addr + length <= hi for lo, hi in self._data):
                return addr
        fits = self._fits.get(length)
        if fits is None:
            fits = self._fits[length] = [(lo, hi) for lo, hi in self._data if hi - lo >= length]
        lo, hi = r.choice(fits)
        return r.randint(lo, hi - length)

    def _seg_len(self) -> int:
        r = self.rng.random()
        if r < 0.08:
            return 0
        if r < 0.85:
            return self.rng.randint(1, 64)
        return self.rng.randint(65, 700)

    def _unmapped(self, length: int) -> int:
        """An address whose range of ``length`` > 0 bytes is not wholly mapped."""
        r = self.rng
        roll = r.random()
        if roll < 0.5 and self._holes:
            lo, hi = r.choice(self._holes)
            return r.randint(lo, hi - 1)
        if roll < 0.8 and self._straddle_ends:
            # straddle the end of a region into a hole or past the end of memory
            e = r.choice(self._straddle_ends)
            if length == 1:
                return e
            # Often just one byte too far: that is where off-by-one bounds checks fail.
            return e - (length - 1 if r.random() < 0.3 else r.randint(0, length - 1))
        return r.choice([r.randrange(1 << 64) & ~0xFFF | 0x800, (1 << 63) + r.randrange(4096),
                         (self._span[1] + r.randrange(1 << 40)) % _U64])

    def _segments(self, nseg: int) -> list[tuple[int, int, int]]:
        """``nseg`` valid (addr, len, flags) segments: readable ones, then writable ones."""
        r = self.rng
        nread = r.randint(0, nseg)
        segs = []
        for i in range(nseg):
            length = self._seg_len()
            flags = 0 if i < nread else _WRITE
            if length == 0:
                addr = r.choice([0, r.randrange(1 << 64), self._data_range(1)])
            else:
                addr = self._data_range(length, r.random() < 0.15)
            if r.random() < 0.04:
                flags |= r.choice([8, 0x10, 0x80, 0x8000])  # unknown bits are ignored
            segs.append((addr, length, flags))
        return segs

    def _try(self, defect: Defect) -> HostileCase | None:
        r = self.rng
        size = r.choice(self.sizes)
        start = self._u16_start(size)
        indirect = r.random() < 0.6
        event_idx = r.random() < 0.5
        complete_each = defect not in (Defect.DOUBLE_HEAD, Defect.GARBAGE,
                                       Defect.MUTATION) and r.random() < 0.3
        needs_indirect = defect in (Defect.INDIRECT_LOOP, Defect.NESTED_INDIRECT,
                                    Defect.INDIRECT_WITH_NEXT, Defect.INDIRECT_NOT_NEGOTIATED,
                                    Defect.INDIRECT_LENGTH, Defect.INDIRECT_TOO_LARGE,
                                    Defect.TABLE_OUTSIDE_MEMORY)
        if needs_indirect:
            indirect = True
        # Mostly the device's real limit; sometimes a tiny one, so that an oversized table
        # can lie inside guest memory (and a table exactly at the limit must pass).
        max_indirect = MAX_INDIRECT_DESCRIPTORS if r.random() < 0.8 else r.randint(1, 6)
        noise = r.randbytes(16 * size)  # unused descriptors hold garbage
        desc = [list(_DESC.unpack_from(noise, 16 * i)) for i in range(size)]
        tables_at = self._table_lo
        free = list(range(size))
        r.shuffle(free)
        chains: list[_Chain] = []
        want = r.randint(1, size)
        if defect is Defect.DOUBLE_HEAD and size < 2:
            return None
        for n in range(want):
            if not free:
                break
            use_table = indirect and r.random() < 0.5 and tables_at + 16 <= self._table_hi
            if needs_indirect and n == 0:
                use_table = True
            ndirect = r.randint(0 if use_table else 1, min(len(free) - (1 if use_table else 0),
                                                           4 if r.random() < 0.9 else size))
            if use_table and r.random() < 0.7:
                ndirect = 0
            # Tables up to the device's limit (exactly at it sometimes); INDIRECT_TOO_LARGE
            # goes over it on purpose.
            ntable = r.randint(1, min(6, max_indirect)) if use_table else 0
            if use_table and tables_at + 16 * ntable > self._table_hi:
                ntable = (self._table_hi - tables_at) // 16
            idxs = [free.pop() for _ in range(ndirect + (1 if use_table else 0))]
            segs = self._segments(ndirect + ntable)
            chain = _Chain(head=idxs[0], direct=idxs)
            for i, di in enumerate(idxs[:ndirect]):
                addr, length, flags = segs[i]
                last = i + 1 == len(idxs)
                desc[di] = [addr, length, flags | (0 if last else _NEXT),
                            idxs[i + 1] if not last else r.randrange(1 << 16)]
            if use_table:
                chain.table = tables_at
                tables_at += 16 * ntable
                for j in range(ntable):
                    addr, length, flags = segs[ndirect + j]
                    last = j + 1 == ntable
                    chain.entries.append([addr, length, flags | (0 if last else _NEXT),
                                          j + 1 if not last else r.randrange(1 << 16)])
                head_flags = _INDIRECT | (_WRITE if r.random() < 0.1 else 0)  # WRITE ignored
                desc[idxs[-1]] = [chain.table, 16 * ntable, head_flags, r.randrange(1 << 16)]
            chains.append(chain)
        heads = [c.head for c in chains]
        if complete_each and len(heads) < size and r.random() < 0.3:
            heads.append(r.choice(heads))  # offered again after completion: legal
        avail_idx = (start + len(heads)) & 0xFFFF
        if defect is Defect.AVAIL_AHEAD:
            avail_idx = (start + r.randint(size + 1, 0xFFFF)) & 0xFFFF
        elif defect is Defect.INDIRECT_NOT_NEGOTIATED:
            indirect = False
        elif not self._apply(defect, size, desc, chains, heads, max_indirect):
            return None
        # ---- serialise ----
        desc_bytes = b"".join(_DESC.pack(*d) for d in desc)
        avail = bytearray(r.randbytes(4 + 2 * size + 2))  # flags, slots not offered, used_event
        _U16.pack_into(avail, 0, r.choice([0, 0, 1, r.randrange(1 << 16)]))
        _U16.pack_into(avail, 2, avail_idx)
        for i, h in enumerate(heads):
            _U16.pack_into(avail, 4 + 2 * ((start + i) % size), h)
        used = bytearray(4 + 8 * size + 2)
        _U16.pack_into(used, 2, r.randrange(1 << 16))
        self._write(self.desc_addr, desc_bytes)
        self._write(self.avail_addr, avail)
        self._write(self.used_addr, used)
        for c in chains:
            if c.table is not None and c.entries:
                self._write(c.table, b"".join(_DESC.pack(*e) for e in c.entries))
        note = defect.value
        if defect is Defect.MUTATION:
            note = self._mutate(size, chains)
        elif defect is Defect.GARBAGE:
            note = self._garbage(size, start)
        verdict = judge_ring(self._snapshot(), size, self.desc_addr, self.avail_addr, start,
                             indirect=indirect, complete_each=complete_each,
                             max_indirect=max_indirect)
        if defect.reason is not None and defect.reason not in verdict.reasons:
            return None  # the defect was shadowed by an earlier problem: try again
        if defect is Defect.NONE and verdict.broken:
            return None
        return HostileCase(
            defect=defect, size=size, desc_addr=self.desc_addr, avail_addr=self.avail_addr,
            used_addr=self.used_addr, last_avail_idx=start, event_idx=event_idx,
            indirect=indirect, complete_each=complete_each, verdict=verdict,
            description=note, max_indirect=max_indirect,
            used_range=(self.used_addr, 4 + 8 * size + 2),
        )

    def _apply(self, defect: Defect, size: int, desc: list[list[int]], chains: list[_Chain],
               heads: list[int], max_indirect: int) -> bool:
        """Put a targeted ``defect`` into the ring model (before it is serialised). False if
        this ring cannot carry it (the caller draws another ring)."""
        r = self.rng
        if defect in (Defect.NONE, Defect.GARBAGE, Defect.MUTATION):
            return True
        if defect is Defect.HEAD_RANGE:
            heads[r.randrange(len(heads))] = self._beyond(size)
            return True
        if defect is Defect.DOUBLE_HEAD:
            if len(heads) < 2:
                return False
            i = r.randrange(1, len(heads))
            heads[i] = heads[r.randrange(i)]
            return True
        with_table = [c for c in chains if c.table is not None]
        direct_only = [c for c in chains if c.table is None]
        if defect in (Defect.LOOP,):
            if not direct_only:
                return False
            victim = r.choice(direct_only)
            last = desc[victim.direct[-1]]
            last[2] |= _NEXT
            last[3] = r.choice(victim.direct)
            return True
        if defect is Defect.DESC_RANGE:
            victim = r.choice(chains)
            direct = [desc[i] for i in victim.direct[: len(victim.direct)
                                                     - (victim.table is not None)]]
            if victim.entries and (not direct or r.random() < 0.5):
                row = r.choice(victim.entries)
                row[2] |= _NEXT
                row[3] = self._beyond(len(victim.entries))
            elif direct:
                row = r.choice(direct)
                row[2] = row[2] & ~_INDIRECT | _NEXT
                row[3] = self._beyond(size)
            else:
                return False
            return True
        if defect in (Defect.OUTSIDE_MEMORY, Defect.OVERFLOW, Defect.READ_AFTER_WRITE):
            victim = r.choice(chains)
            rows = [desc[i] for i in victim.direct[: len(victim.direct)
                                                   - (victim.table is not None)]]
            rows += victim.entries
            if not rows:
                return False
            if defect is Defect.READ_AFTER_WRITE:
                if len(rows) < 2:
                    return False
                i = r.randrange(len(rows) - 1)
                rows[i][2] |= _WRITE
                for row in rows[i:]:
                    if row[1] == 0:
                        row[1] = 8
                        row[0] = self._data_range(8)
                for row in rows[i + 1:]:
                    row[2] &= ~_WRITE
                return True
            row = r.choice(rows)
            if row[1] < 2:
                row[1] = r.randint(2, 600)
            if defect is Defect.OUTSIDE_MEMORY:
                row[0] = self._unmapped(row[1])
            else:
                row[0] = _U64 - r.randint(1, row[1] - 1)
            return True
        # The rest need a chain with an indirect table.
        if not with_table:
            return False
        victim = r.choice(with_table)
        head_row = desc[victim.direct[-1]]
        if defect is Defect.INDIRECT_LOOP:
            victim.entries[-1][2] |= _NEXT
            victim.entries[-1][3] = r.randrange(len(victim.entries))
        elif defect is Defect.NESTED_INDIRECT:
            row = r.choice(victim.entries)
            row[2] |= _INDIRECT
            if r.random() < 0.5:
                row[0], row[1] = self._data_range(32), 32
        elif defect is Defect.INDIRECT_WITH_NEXT:
            head_row[2] |= _NEXT
            head_row[3] = r.randrange(size)
        elif defect is Defect.INDIRECT_LENGTH:
            head_row[1] = r.choice([0, r.randint(1, 15), 16 * r.randint(1, 6) + r.randint(1, 15),
                                    r.randrange(1 << 32) | 1])
        elif defect is Defect.INDIRECT_TOO_LARGE:
            if len(victim.entries) > max_indirect:
                pass  # the table as built is already over this device's limit
            else:
                head_row[1] = 16 * r.choice([max_indirect + 1,
                                             r.randint(max_indirect + 1, (1 << 28) - 1)])
        elif defect is Defect.TABLE_OUTSIDE_MEMORY:
            if self._boundaries and r.random() < 0.3:
                # In memory, but across two regions: a table must be one contiguous view.
                head_row[1] = max(head_row[1], 32)
                head_row[0] = r.choice(self._boundaries) - r.randint(1, head_row[1] - 1)
            else:
                head_row[0] = self._unmapped(head_row[1])
            victim.table = None  # nothing to write there
            victim.entries = []
        else:
            raise AssertionError(defect)
        return True

    def _mutate(self, size: int, chains: list[_Chain]) -> str:
        """Flip bits or plant boundary values in the ring just written."""
        targets: list[tuple[int, int]] = [(self.desc_addr, 16 * size),
                                          (self.avail_addr + 2, 2 + 2 * size)]
        targets += [(c.table, 16 * len(c.entries)) for c in chains if c.table is not None]
        return self._mutate_ranges(size, targets)

    def _mutate_ranges(self, size: int, targets: list[tuple[int, int]]) -> str:
        """Flip bits or plant boundary values (0, 1, around ``size``, all ones, the ends
        of memory) at random places of the ``(gpa, length)`` targets."""
        r = self.rng
        notes = []
        for _ in range(r.randint(1, 4)):
            base, length = r.choice(targets)
            off = r.randrange(length)
            if r.random() < 0.6:
                byte = self._read(base + off, 1)[0] ^ (1 << r.randrange(8))
                self._write(base + off, bytes([byte]))
                notes.append(f"flip at 0x{base + off:x}")
            else:
                width = r.choice([2, 4, 8])
                off -= off % width
                if off + width > length:
                    continue
                value = r.choice([0, 1, size - 1, size, size + 1, 0xFFFF, (1 << 8 * width) - 1,
                                  self._span[1], self._span[0] - 1])
                value &= (1 << 8 * width) - 1
                self._write(base + off, value.to_bytes(width, "little"))
                notes.append(f"{value:#x} at 0x{base + off:x}")
        return "mutation: " + ", ".join(notes)

    def _garbage(self, size: int, start: int) -> str:
        """Random descriptors (biased towards plausible values) and a random avail ring."""
        r = self.rng
        rows = []
        for _ in range(size):
            roll = r.random()
            if roll < 0.25:
                rows.append(r.randbytes(16))
                continue
            length = r.choice([0, r.randint(1, 64), r.randint(1, 600), r.randrange(1 << 32)])
            if r.random() < 0.8:
                lo, hi = self._span
                addr = r.randint(max(0, lo - 256), min(hi + 256, _U64 - 1))
            else:
                addr = r.randrange(1 << 64)
            flags = r.randrange(8) if r.random() < 0.9 else r.randrange(1 << 16)
            if flags & _INDIRECT and r.random() < 0.7:
                length = 16 * r.randint(1, 8)
                addr = r.randint(self._table_lo, self._table_hi - length)
            nxt = r.randrange(size) if r.random() < 0.85 else r.randrange(1 << 16)
            rows.append(_DESC.pack(addr, length, flags, nxt))
        self._write(self.desc_addr, b"".join(rows))
        # Indirect tables area: random but plausible rows too.
        rows_needed = (self._table_hi - self._table_lo) // 16
        self._write(self._table_lo, b"".join(r.choices(self._plausible_rows, k=rows_needed)))
        avail = bytearray(r.randbytes(4 + 2 * size))
        roll = r.random()
        pending = r.randint(0, size) if roll < 0.9 else r.randrange(1 << 16)
        _U16.pack_into(avail, 2, (start + pending) & 0xFFFF)
        for i in range(size):
            if r.random() < 0.85:
                _U16.pack_into(avail, 4 + 2 * i, r.randrange(size))
        self._write(self.avail_addr, avail)
        return f"garbage, {pending} pending"

    # ---- memory access (own translation, so the generator does not trust GuestMemory) ---

    def _locate(self, addr: int, length: int) -> tuple[memoryview, int]:
        for gpa, size, buf in self._regions:
            if gpa <= addr and addr + length <= gpa + size:
                return buf, addr - gpa
        raise LocalError(f"generator write outside one region: 0x{addr:x} +{length}")

    def _write(self, addr: int, data: bytes | bytearray) -> None:
        buf, off = self._locate(addr, len(data))
        buf[off : off + len(data)] = data

    def _read(self, addr: int, length: int) -> bytes:
        buf, off = self._locate(addr, length)
        return bytes(buf[off : off + length])

    def _snapshot(self) -> list[tuple[int, bytes]]:
        return [(gpa, bytes(buf[:size])) for gpa, size, buf in self._regions]

