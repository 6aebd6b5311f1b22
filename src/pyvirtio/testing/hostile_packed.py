"""Hostile packed rings: the packed counterpart of :mod:`pyvirtio.testing.hostile`.

:class:`HostilePackedRingGenerator` is a :class:`~pyvirtio.testing.hostile.HostileRingGenerator`
(same memory layout, buffers, unmapped and straddling addresses, mutation and judge
machinery) that writes *packed* rings: chains laid out from the device's position with the
AVAIL/USED flags of each slot's lap, buffer ids in each chain's last descriptor, indirect
tables; and, so that chains can run into descriptors still in flight, a device whose used
position trails its avail position by ``behind`` descriptors (a restored queue).

:func:`judge_packed_ring` is the reference reader, written from VIRTIO 1.x §2.8
independently of :mod:`pyvirtio.ring.packed`: it reads a copy of memory with its own
address translation. Targeted defects (:class:`PackedDefect`): a buffer id at or beyond the
queue size, or one already in flight; a chain longer than the ring; a chain running into
descriptors in flight; a head marked AVAIL = USED = the wrap counter; a chain descriptor
not marked available for its lap; INDIRECT when not negotiated, with NEXT, in the middle of
a chain, or inside an indirect table; indirect tables of bad length, over the limit, outside
memory or across regions; buffers outside memory; address + length overflowing 64 bits; a
readable descriptor after a writable one.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pyvirtio.errors import LocalError
from pyvirtio.memory import GuestMemory
from pyvirtio.ring.packed import PackedDeviceQueue, encode
from pyvirtio.ring.split import MAX_INDIRECT_DESCRIPTORS
from pyvirtio.testing.hostile import (
    _DESC,
    _INDIRECT,
    _NEXT,
    _U16,
    _U64,
    _WRITE,
    ExpectedChain,
    HostileCase,
    HostileRingGenerator,
    Verdict,
    _Broken,
    _Snapshot,
)

__all__ = [
    "HostilePackedRingGenerator",
    "PackedDefect",
    "PackedHostileCase",
    "PackedReason",
    "judge_packed_ring",
]

_AVAIL, _USED = 1 << 7, 1 << 15
# Row flags above 16 bits: how the serialiser marks the slot for its lap.
_MARK_HEAD_USED = 1 << 17  # AVAIL = USED = the lap's wrap counter
_MARK_NOT_AVAIL = 1 << 18  # anything but "available in this lap"


class PackedReason(enum.Enum):
    """Why a packed ring must break the queue; ``pattern`` matches pyvirtio's wording."""

    ID_RANGE = r"carries buffer id \d+, beyond the queue size"
    ID_IN_FLIGHT = r"carries buffer id \d+, which is already in flight"
    CHAIN_TOO_LONG = r"makes the chain longer than the ring"
    OVERRUN = r"ring slots are not in flight"
    HEAD_USED = r"has AVAIL and USED both equal to the wrap counter"
    CHAIN_FLAGS = r"continues the chain but is not marked available"
    INDIRECT_NOT_NEGOTIATED = r"is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated"
    INDIRECT_WITH_NEXT = r"has both INDIRECT and NEXT"
    INDIRECT_IN_CHAIN = r"is INDIRECT in the middle of a chain"
    NESTED_INDIRECT = r"is INDIRECT inside an indirect table"
    INDIRECT_LENGTH = r"not a positive multiple of 16"
    INDIRECT_TOO_LARGE = r"descriptors, over the limit of"
    OUTSIDE_MEMORY = r"outside guest memory"
    OVERFLOW = r"overflows 64 bits"
    READ_AFTER_WRITE = r"is readable but follows a writable descriptor"

    @property
    def names_address(self) -> bool:
        return self in (PackedReason.OUTSIDE_MEMORY, PackedReason.OVERFLOW)

    def matches(self, message: str) -> bool:
        return re.search(self.value, message) is not None


class PackedDefect(enum.Enum):
    NONE = "valid ring"
    ID_RANGE = "buffer id >= queue size"
    ID_IN_FLIGHT = "buffer id made available twice while in flight"
    CHAIN_TOO_LONG = "chain around the whole ring"
    OVERRUN = "chain runs into descriptors in flight"
    HEAD_USED = "head marked used for the current lap"
    CHAIN_FLAGS = "chain descriptor not marked available"
    INDIRECT_NOT_NEGOTIATED = "INDIRECT without VIRTIO_F_INDIRECT_DESC"
    INDIRECT_WITH_NEXT = "INDIRECT together with NEXT"
    INDIRECT_IN_CHAIN = "INDIRECT after direct descriptors"
    NESTED_INDIRECT = "indirect descriptor inside an indirect table"
    INDIRECT_LENGTH = "indirect table length 0 or not a multiple of 16"
    INDIRECT_TOO_LARGE = "indirect table over the device's limit"
    OUTSIDE_MEMORY = "buffer outside guest memory"
    TABLE_OUTSIDE_MEMORY = "indirect table outside guest memory or across regions"
    OVERFLOW = "address + length overflows 64 bits"
    READ_AFTER_WRITE = "readable descriptor after a writable one"
    GARBAGE = "random garbage"
    MUTATION = "random mutation of a valid ring"

    @property
    def reason(self) -> PackedReason | None:
        if self in (PackedDefect.NONE, PackedDefect.GARBAGE, PackedDefect.MUTATION):
            return None
        if self is PackedDefect.TABLE_OUTSIDE_MEMORY:
            return PackedReason.OUTSIDE_MEMORY
        return PackedReason[self.name]


# ---- the reference judge ------------------------------------------------------------------


def judge_packed_ring(
    regions: Sequence[tuple[int, bytes]],
    size: int,
    desc_addr: int,
    start: int,
    behind: int,
    *,
    indirect: bool,
    complete_each: bool,
    max_indirect: int = MAX_INDIRECT_DESCRIPTORS,
) -> Verdict:
    """Read a packed ring the way VIRTIO 1.x §2.8 says a device must, from position/wrap
    ``start`` with ``behind`` descriptors in flight from before (ids unknown), and say what
    it must pop and whether (and why) it must give up.

    A slot is available when its AVAIL bit equals the lap's wrap counter and USED does
    not; AVAIL = USED = wrap counter at the next position is impossible (the device writes
    used descriptors only behind it). A chain is consecutive slots with NEXT, each marked
    available for its own lap, at most ``size`` long and not reaching descriptors in flight;
    a buffer is direct descriptors or one INDIRECT descriptor (negotiated, without NEXT,
    first in its chain) whose table is a positive multiple of 16 bytes, at most
    ``max_indirect`` entries, in one region, holding no INDIRECT entry (other flags there
    are ignored: the table's length ends it). Buffers of non-zero length lie in guest
    memory without wrapping 64 bits; nothing readable follows writable bytes. The last
    descriptor's id is below ``size`` and not in flight (unless ``complete_each``).
    """
    mem = _Snapshot(regions)
    ring_at = mem.single(desc_addr, 16 * size)
    if ring_at is None:
        raise LocalError("the ring itself must lie in guest memory")
    data, base = ring_at
    pos, wrap = start & 0x7FFF, start >> 15 & 1
    in_flight_descs = behind
    ids: set[int] = set()
    chains: list[ExpectedChain] = []

    def row(p: int) -> tuple[int, int, int, int]:
        addr, length, buf_id, flags = _DESC.unpack_from(data, base + 16 * p)
        return addr, length, buf_id, flags

    try:
        for _ in range(size + 1):
            flags = row(pos)[3]
            if bool(flags & _AVAIL) != bool(wrap):
                break
            if bool(flags & _USED) == bool(wrap):
                raise _Broken({PackedReason.HEAD_USED}, rf"ring slot {pos} \(")
            first = pos
            room = size - in_flight_descs
            readable: list[tuple[int, int]] = []
            writable: list[tuple[int, int]] = []
            p, w, count = pos, wrap, 0
            while True:
                here = rf"chain at slot {first}: ring slot {p} \("
                count += 1
                if count > size:
                    raise _Broken({PackedReason.CHAIN_TOO_LONG}, here)
                if count > room:
                    raise _Broken({PackedReason.OVERRUN}, here)
                addr, length, buf_id, flags = row(p)
                if count > 1 and (bool(flags & _AVAIL) != bool(w)
                                  or bool(flags & _USED) == bool(w)):
                    raise _Broken({PackedReason.CHAIN_FLAGS}, here)
                if flags & _INDIRECT:
                    problems = set()
                    if not indirect:
                        problems.add(PackedReason.INDIRECT_NOT_NEGOTIATED)
                    if flags & _NEXT:
                        problems.add(PackedReason.INDIRECT_WITH_NEXT)
                    if count > 1:
                        problems.add(PackedReason.INDIRECT_IN_CHAIN)
                    if problems:
                        raise _Broken(problems, here)
                    if length == 0 or length % 16:
                        problems.add(PackedReason.INDIRECT_LENGTH)
                    elif length // 16 > max_indirect:
                        problems.add(PackedReason.INDIRECT_TOO_LARGE)
                    elif addr + length > _U64:
                        problems.add(PackedReason.OVERFLOW)
                    elif mem.single(addr, length) is None:
                        problems.add(PackedReason.OUTSIDE_MEMORY)
                    if problems:
                        raise _Broken(problems, here, addr)
                    found = mem.single(addr, length)
                    assert found is not None
                    tdata, tbase = found
                    for i in range(length // 16):
                        t_addr, t_len, _, t_flags = _DESC.unpack_from(tdata, tbase + 16 * i)
                        at = rf"chain at slot {first}: indirect descriptor {i} \(table of " \
                             rf"ring slot {p} "
                        _segment(mem, t_addr, t_len, t_flags, at, readable, writable,
                                 nested=bool(t_flags & _INDIRECT))
                else:
                    _segment(mem, addr, length, flags, here, readable, writable)
                if not flags & _NEXT:
                    break
                p += 1
                if p == size:
                    p, w = 0, w ^ 1
            if buf_id >= size:
                raise _Broken({PackedReason.ID_RANGE}, here)
            if buf_id in ids:
                raise _Broken({PackedReason.ID_IN_FLIGHT}, here)
            if not complete_each:
                ids.add(buf_id)
                in_flight_descs += count
            chains.append(ExpectedChain(buf_id, tuple(readable), tuple(writable)))
            pos += count
            if pos >= size:
                pos, wrap = pos - size, wrap ^ 1
    except _Broken as exc:
        return Verdict(tuple(chains), exc.reasons, exc.culprit, exc.address)
    return Verdict(tuple(chains))


def _segment(mem: _Snapshot, addr: int, length: int, flags: int, culprit: str,
             readable: list[tuple[int, int]], writable: list[tuple[int, int]],
             nested: bool = False) -> None:
    if nested:
        raise _Broken({PackedReason.NESTED_INDIRECT}, culprit)
    writes = bool(flags & _WRITE)
    if length:
        if addr + length > _U64:
            raise _Broken({PackedReason.OVERFLOW}, culprit, addr)
        spans = mem.spans(addr, length)
        if spans is None:
            raise _Broken({PackedReason.OUTSIDE_MEMORY}, culprit, addr)
    else:
        spans = []
    if not writes and writable:
        raise _Broken({PackedReason.READ_AFTER_WRITE}, culprit)
    (writable if writes else readable).extend(spans)


# ---- the generator ------------------------------------------------------------------------


@dataclass
class PackedHostileCase(HostileCase):
    """A packed ring: ``last_avail_idx`` is ``position | wrap << 15``; the device's used
    position trails it by ``behind`` descriptors (``used_idx``)."""

    used_idx: int = 0
    behind: int = 0

    def device_queue(self, memory: GuestMemory, **kwargs: object) -> PackedDeviceQueue:  # type: ignore[override]
        queue = PackedDeviceQueue(
            memory, self.size, self.desc_addr, self.avail_addr, self.used_addr,
            event_idx=self.event_idx, indirect=self.indirect,
            last_avail_idx=self.last_avail_idx, used_idx=self.used_idx,
            name=f"hostile packed {self.defect.name}",
            **kwargs,  # type: ignore[arg-type]
        )
        queue.max_indirect = self.max_indirect
        return queue


def _lin(pos: int, wrap: int, size: int) -> int:
    return pos + (0 if wrap else size)


def _unlin(lin: int, size: int) -> tuple[int, int]:
    lin %= 2 * size
    return (lin, 1) if lin < size else (lin - size, 0)


class HostilePackedRingGenerator(HostileRingGenerator):
    """Writes packed rings into ``memory`` and describes them (see the module docstring).
    The ring sits where the split generator puts its descriptor table; the driver and
    device event suppression areas follow it."""

    defects = PackedDefect

    def __init__(self, memory: GuestMemory, *, seed: int | None = None,
                 sizes: Sequence[int] = (1, 2, 3, 4, 5, 8, 13, 16, 32, 64)) -> None:
        super().__init__(memory, seed=seed, sizes=sizes)
        self.driver_area = self.desc_addr + 16 * 64
        self.device_area = self.driver_area + 4

    def _try(self, defect: PackedDefect) -> PackedHostileCase | None:  # type: ignore[override]
        r = self.rng
        size = r.choice(self.sizes)
        start_lin = r.randrange(2 * size)
        pos0, wrap0 = _unlin(start_lin, size)
        indirect = r.random() < 0.6
        event_idx = r.random() < 0.5
        complete_each = defect not in (PackedDefect.ID_IN_FLIGHT, PackedDefect.OVERRUN,
                                       PackedDefect.GARBAGE, PackedDefect.MUTATION) \
            and r.random() < 0.3
        needs_table = defect in (PackedDefect.NESTED_INDIRECT, PackedDefect.INDIRECT_WITH_NEXT,
                                 PackedDefect.INDIRECT_NOT_NEGOTIATED,
                                 PackedDefect.INDIRECT_LENGTH, PackedDefect.INDIRECT_TOO_LARGE,
                                 PackedDefect.TABLE_OUTSIDE_MEMORY)
        if needs_table:
            indirect = True
        behind = 0 if complete_each or r.random() < 0.5 else r.randint(0, size - 1)
        if defect is PackedDefect.OVERRUN:
            behind = r.randint(1, size - 1) if size > 1 else 0
            if behind == 0:
                return None
        max_indirect = MAX_INDIRECT_DESCRIPTORS if r.random() < 0.8 else r.randint(1, 6)
        room = size - behind
        # rows[k]: the descriptor at linear position start_lin + k
        rows: list[list[int]] = []
        heads: list[int] = []  # row index of each chain's first descriptor
        tables: list[tuple[int, list[list[int]]]] = []  # (gpa, rows) per indirect chain
        table_of: dict[int, int] = {}  # head row -> index in tables
        tables_at = self._table_lo
        free_ids = list(range(size))
        r.shuffle(free_ids)
        want = r.randint(1, room)
        while len(rows) < room and len(heads) < want:
            use_table = indirect and r.random() < 0.5 and tables_at + 16 <= self._table_hi
            if needs_table and not heads:
                use_table = True
                if tables_at + 16 > self._table_hi:
                    return None
            buf_id = free_ids.pop() if free_ids else r.randrange(size)
            heads.append(len(rows))
            if use_table:
                n = r.randint(1, min(6, max_indirect))
                n = min(n, (self._table_hi - tables_at) // 16)
                segs = self._segments(n)
                entries = [[a, ln, r.randrange(1 << 16), f | (r.choice([0, _NEXT])
                                                              if r.random() < 0.1 else 0)]
                           for a, ln, f in segs]
                table_of[len(rows)] = len(tables)
                tables.append((tables_at, entries))
                rows.append([tables_at, 16 * n, buf_id,
                             _INDIRECT | (_WRITE if r.random() < 0.1 else 0)])
                tables_at += 16 * n
            else:
                n = r.randint(1, min(room - len(rows), 4 if r.random() < 0.9 else size))
                for i, (a, ln, f) in enumerate(self._segments(n)):
                    last = i + 1 == n
                    rows.append([a, ln, buf_id if last else r.randrange(1 << 16),
                                 f | (0 if last else _NEXT)])
            if complete_each and r.random() < 0.3:
                free_ids.append(buf_id)  # reused after completion: legal
        if len(rows) > room:
            return None
        if not self._apply_packed(defect, size, room, rows, heads, tables, table_of,
                                  max_indirect):
            return None
        if defect is PackedDefect.INDIRECT_NOT_NEGOTIATED:
            indirect = False
        # ---- serialise: flags for each row's lap, the rest of the ring not available ----
        ring = bytearray(self.rng.randbytes(16 * size))
        for p in range(size):  # default: "used in the lap before" for the lap it is read in
            k = (p - pos0) % size
            _, w = _unlin(start_lin + k, size)
            _U16.pack_into(ring, 16 * p + 14, (_AVAIL | _USED) if not w else 0)  # flags
        for k in range(behind):  # in flight from before: available in their lap
            p, w = _unlin(start_lin - behind + k, size)
            _U16.pack_into(ring, 16 * p + 14, _AVAIL if w else _USED)
        for k, (addr, length, buf_id, flags) in enumerate(rows[:size]):
            p, w = _unlin(start_lin + k, size)
            good = _AVAIL if w else _USED
            mark = good
            if flags & _MARK_HEAD_USED:
                mark = (_AVAIL | _USED) if w else 0
            elif flags & _MARK_NOT_AVAIL:
                mark = r.choice([m for m in (0, _AVAIL, _USED, _AVAIL | _USED) if m != good])
            _DESC.pack_into(ring, 16 * p, addr, length, buf_id,
                            (flags & 0xFFFF & ~(_AVAIL | _USED)) | mark)
        self._write(self.desc_addr, ring)
        self._write(self.driver_area, r.randbytes(4))
        self._write(self.device_area, bytes(4))
        for gpa, entries in tables:
            if entries:
                self._write(gpa, b"".join(_DESC.pack(*e) for e in entries))
        note = defect.value
        if defect is PackedDefect.MUTATION:
            targets = [(self.desc_addr, 16 * size)]
            targets += [(gpa, 16 * len(e)) for gpa, e in tables if e]
            note = "mutation: " + self._mutate_ranges(size, targets)
        elif defect is PackedDefect.GARBAGE:
            note = self._packed_garbage(size, start_lin)
        start = encode(pos0, wrap0)
        used = encode(*_unlin(start_lin - behind, size))
        verdict = judge_packed_ring(self._snapshot(), size, self.desc_addr, start, behind,
                                    indirect=indirect, complete_each=complete_each,
                                    max_indirect=max_indirect)
        if defect.reason is not None and defect.reason not in verdict.reasons:
            return None
        if defect is PackedDefect.NONE and verdict.broken:
            return None
        return PackedHostileCase(
            defect=defect, size=size, desc_addr=self.desc_addr, avail_addr=self.driver_area,
            used_addr=self.device_area, last_avail_idx=start, event_idx=event_idx,
            indirect=indirect, complete_each=complete_each, verdict=verdict,
            description=note, max_indirect=max_indirect,
            used_range=(self.desc_addr, 16 * 64 + 8), used_idx=used, behind=behind,
        )

    def _apply_packed(self, defect: PackedDefect, size: int, room: int,
                      rows: list[list[int]], heads: list[int],
                      tables: list[tuple[int, list[list[int]]]],
                      table_of: dict[int, int], max_indirect: int) -> bool:
        """Put a targeted ``defect`` into the rows (before they are serialised). False if
        this ring cannot carry it (the caller draws another ring)."""
        r = self.rng
        ends = [(heads[i + 1] if i + 1 < len(heads) else len(rows)) - 1
                for i in range(len(heads))]
        direct = [i for i, h in enumerate(heads) if h not in table_of]
        if defect in (PackedDefect.NONE, PackedDefect.GARBAGE, PackedDefect.MUTATION,
                      PackedDefect.INDIRECT_NOT_NEGOTIATED):
            return defect is not PackedDefect.INDIRECT_NOT_NEGOTIATED or bool(table_of)
        if defect is PackedDefect.ID_RANGE:
            rows[r.choice(ends)][2] = self._beyond(size)
        elif defect is PackedDefect.ID_IN_FLIGHT:
            if len(heads) < 2:
                return False
            i = r.randrange(1, len(heads))
            rows[ends[i]][2] = rows[ends[r.randrange(i)]][2]
        elif defect is PackedDefect.CHAIN_TOO_LONG:
            del rows[:]
            heads[:] = [0]
            tables.clear()
            for _ in range(size):  # all NEXT: the walk comes back to the head
                rows.append([self._data_range(8), 8, r.randrange(size), _NEXT])
        elif defect is PackedDefect.OVERRUN:
            last = rows[-1]
            if last[3] & _INDIRECT:
                return False
            last[3] |= _NEXT  # the last chain grows into descriptors in flight
            for _ in range(r.randint(room - len(rows) + 1, size - len(rows))):
                rows.append([self._data_range(8), 8, last[2], _NEXT | (last[3] & _WRITE)])
            rows[-1][3] &= ~_NEXT
        elif defect is PackedDefect.HEAD_USED:
            rows[heads[r.randrange(len(heads))]][3] |= _MARK_HEAD_USED
        elif defect is PackedDefect.CHAIN_FLAGS:
            multi = [i for i in direct if ends[i] > heads[i]]
            if not multi:
                return False
            i = r.choice(multi)
            k = r.randint(heads[i] + 1, ends[i])
            rows[k][3] |= _MARK_NOT_AVAIL
        elif defect is PackedDefect.INDIRECT_IN_CHAIN:
            multi = [i for i in direct if ends[i] > heads[i]]
            if not multi or not self._table_lo + 16 <= self._table_hi:
                return False
            i = r.choice(multi)
            k = r.randint(heads[i] + 1, ends[i])
            rows[k][0], rows[k][1] = self._table_lo, 16
            rows[k][3] |= _INDIRECT
        elif defect in (PackedDefect.OUTSIDE_MEMORY, PackedDefect.OVERFLOW,
                        PackedDefect.READ_AFTER_WRITE, PackedDefect.NESTED_INDIRECT):
            cands: list[list[int]] = []
            for i, h in enumerate(heads):
                if h in table_of:
                    cands += tables[table_of[h]][1]
                else:
                    cands += rows[h:ends[i] + 1]
            if defect is PackedDefect.NESTED_INDIRECT:
                cands = [e for _, es in tables for e in es]
            if not cands:
                return False
            if defect is PackedDefect.READ_AFTER_WRITE:
                i = r.randrange(len(heads))
                seq = tables[table_of[heads[i]]][1] if heads[i] in table_of \
                    else rows[heads[i]:ends[i] + 1]
                if len(seq) < 2:
                    return False
                j = r.randrange(len(seq) - 1)
                seq[j][3] |= _WRITE
                for e in seq[j:]:
                    if e[1] == 0:
                        e[0], e[1] = self._data_range(8), 8
                for e in seq[j + 1:]:
                    e[3] &= ~_WRITE
                return True
            victim = r.choice(cands)
            if defect is PackedDefect.NESTED_INDIRECT:
                victim[3] |= _INDIRECT
                return True
            if victim[1] < 2:
                victim[1] = r.randint(2, 600)
            if defect is PackedDefect.OUTSIDE_MEMORY:
                victim[0] = self._unmapped(victim[1])
            else:
                victim[0] = _U64 - r.randint(1, victim[1] - 1)
        else:
            if not table_of:
                return False
            k = r.choice(list(table_of))
            head = rows[k]
            if defect is PackedDefect.INDIRECT_WITH_NEXT:
                head[3] |= _NEXT
                if k + 1 >= len(rows):
                    rows.append([self._data_range(8), 8, head[2], 0])
            elif defect is PackedDefect.INDIRECT_LENGTH:
                head[1] = r.choice([0, r.randint(1, 15), 16 * r.randint(1, 6) + r.randint(1, 15)])
            elif defect is PackedDefect.INDIRECT_TOO_LARGE:
                if len(tables[table_of[k]][1]) <= max_indirect:
                    head[1] = 16 * r.randint(max_indirect + 1, max_indirect + (1 << 20))
            elif defect is PackedDefect.TABLE_OUTSIDE_MEMORY:
                if self._boundaries and r.random() < 0.3:
                    head[1] = max(head[1], 32)
                    head[0] = r.choice(self._boundaries) - r.randint(1, head[1] - 1)
                else:
                    head[0] = self._unmapped(head[1])
                tables[table_of[k]] = (0, [])
            else:
                raise AssertionError(defect)
        return True

    def _packed_garbage(self, size: int, start_lin: int) -> str:
        """Random descriptors, mostly with plausible flags for their lap."""
        r = self.rng
        out = bytearray()
        for p in range(size):
            k = (p - start_lin) % size
            _, w = _unlin(start_lin + k, size)
            if r.random() < 0.2:
                out += r.randbytes(16)
                continue
            length = r.choice([0, r.randint(1, 64), r.randint(1, 600), r.randrange(1 << 32)])
            lo, hi = self._span
            addr = r.randint(max(0, lo - 256), min(hi + 256, _U64 - 1)) \
                if r.random() < 0.8 else r.randrange(1 << 64)
            flags = r.randrange(8)
            if flags & _INDIRECT and r.random() < 0.7:
                length = 16 * r.randint(1, 8)
                addr = r.randint(self._table_lo, self._table_hi - length)
            roll = r.random()
            mark = (_AVAIL if w else _USED) if roll < 0.8 else r.choice(
                [0, _AVAIL, _USED, _AVAIL | _USED])
            buf_id = r.randrange(size) if r.random() < 0.85 else r.randrange(1 << 16)
            out += _DESC.pack(addr, length, buf_id, flags | mark)
        self._write(self.desc_addr, out)
        rows_needed = (self._table_hi - self._table_lo) // 16
        self._write(self._table_lo, b"".join(r.choices(self._plausible_rows, k=rows_needed)))
        return "garbage"
