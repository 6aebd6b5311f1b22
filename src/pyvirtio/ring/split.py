"""Split virtqueues, both ends, sans-I/O.

:class:`DriverQueue` is what a guest driver runs (Linux ``virtio_ring.c``): it owns the
descriptor table and the avail ring, adds buffers, decides whether a kick is needed and
collects used buffers. :class:`DeviceQueue` is what a device runs (vhost, QEMU
``virtio.c``): it pops descriptor chains from the avail ring, pushes them to the used ring
and decides whether the driver needs an interrupt.

Both are handed a :class:`~pyvirtio.memory.GuestMemory` and three guest-physical addresses.
Neither ever notifies, sleeps or opens a file: ``kick_prepare()`` and
``needs_notification()`` only *answer* whether to notify; the transport does it.

Everything read from shared memory is untrusted. A violation by the peer marks the queue
broken with a reason naming the descriptor and address (:class:`RingError`); nothing outside
guest memory is ever read or written, because every access goes through GuestMemory views
that were bounds-checked when created.

All indices are free-running 16-bit counters (mod 2^16), as in the spec.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence

from pyvirtio.memory import GuestMemory, GuestMemoryError
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring.barrier import full_barrier
from pyvirtio.ring.chain import DescriptorChain
from pyvirtio.ring.errors import QueueFullError, QueueUsageError, RingError
from pyvirtio.ring.inorder import InOrderCompletions
from pyvirtio.ring.queue import DeviceRing, DriverRing, ShortChain, WritableBuffer
from pyvirtio.spec import LE, Endian
from pyvirtio.spec import split as S

_NEXT = S.VRING_DESC_F_NEXT
_WRITE = S.VRING_DESC_F_WRITE
_INDIRECT = S.VRING_DESC_F_INDIRECT
U64_LIMIT = 1 << 64

_NEXT_WRITE = _NEXT | _WRITE
_TABLE3 = 3 * S.VRING_DESC_SIZE
_EMPTY = memoryview(b"")

# Upper bound on descriptors in one indirect table. The spec bounds direct chains by the
# queue size but says nothing for indirect tables; like QEMU and vhost we cap them so a
# hostile table cannot make us build a huge segment list.
MAX_INDIRECT_DESCRIPTORS = 4096


def _map_area(memory: GuestMemory, addr: int, length: int, what: str) -> memoryview:
    try:
        return memory.view(addr, length)
    except GuestMemoryError as exc:
        raise RingError(f"{what} at 0x{addr:x} +{length} is outside guest memory: {exc}") from exc


def _check_size(size: int) -> None:
    if not S.is_valid_queue_size(size):
        raise QueueUsageError(f"queue size {size} is not a power of two in 1..32768")


class _SplitRing:
    """What both ends of a split ring share: the three areas mapped once as views of guest
    memory (so each access afterwards is only an offset into a checked view), the structs
    for the byte order, and the broken state."""

    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, event_idx: bool, indirect: bool, endian: Endian,
                 name: str) -> None:
        _check_size(size)
        self.memory = memory
        self.size = size
        self.name = name
        self.event_idx = event_idx
        self.indirect = indirect
        self._mask = size - 1
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self._desc = _map_area(memory, desc_addr, S.desc_table_size(size), "descriptor table")
        self._avail = _map_area(memory, avail_addr, S.avail_size(size), "avail ring")
        self._used = _map_area(memory, used_addr, S.used_size(size), "used ring")
        self._desc_struct = S.desc_struct(endian)
        self._u16 = S.u16_struct(endian)
        self._elem = S.used_elem_struct(endian)
        self._used_event_off = S.used_event_offset(size)
        self._avail_event_off = S.avail_event_offset(size)
        self.broken: str | None = None

    def _break(self, reason: str) -> RingError:
        if self.broken is None:
            self.broken = f"{self.name}: {reason}"
        return RingError(self.broken)

    def fail(self, reason: str) -> RingError:
        """Mark the queue broken because of ``reason`` (a request its device refused),
        unless it is already; returns the error naming the first reason."""
        return self._break(reason)


class RegionSpans:
    """What the batch pops (``pop_short``, ``pop_writable``) of both ring formats keep of
    guest memory: its regions as ``(gpa, end, buffer)``, and the one used last."""

    memory: GuestMemory
    _spans: tuple[tuple[int, int, memoryview], ...]
    _span_gen: int
    _hot: tuple[int, int, memoryview]

    def _init_spans(self) -> None:
        self._spans = ()
        self._span_gen = -1
        self._hot = (0, 0, _EMPTY)

    def _hot_span(self) -> tuple[int, int, memoryview]:
        """The memory region the last batch pop used (refreshing the regions first if the
        memory table changed)."""
        memory = self.memory
        if memory.generation != self._span_gen:
            self._spans = tuple((r.gpa, r.end, r.buf) for r in memory.regions)
            self._span_gen = memory.generation
            self._hot = (0, 0, _EMPTY)
        return self._hot

    def _find(self, addr: int, length: int) -> tuple[int, int, memoryview] | None:
        for span in self._spans:
            if span[0] <= addr and addr + length <= span[1]:
                return span
        return None


class DeviceQueue(_SplitRing, RegionSpans):
    """The device side of a split virtqueue.

    ``last_avail_idx`` is the next avail ring slot to consume; ``used_idx`` the next used
    ring slot to fill. Both are restored from outside for vhost-user (SET_VRING_BASE) and
    reconnection; by default ``used_idx`` is read back from the ring itself.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        in_order: bool = False,
        endian: Endian = LE,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
        name: str = "queue",
    ) -> None:
        super().__init__(memory, size, desc_addr, avail_addr, used_addr, event_idx, indirect,
                         endian, name)
        self.last_avail_idx = last_avail_idx & 0xFFFF
        if used_idx is None:
            used_idx = self._u16.unpack_from(self._used, 2)[0]
        self.used_idx = used_idx & 0xFFFF
        self._signalled_used = self.used_idx
        self._signalled_valid = False
        self._kicks_enabled = True
        # A full barrier ran after the last used->idx store (enable_notifications' own):
        # needs_notification may then skip its barrier, as the drain ends with both.
        self._fenced = False
        self._inflight = bytearray(size)  # 1 while a head is popped and not yet published
        self.max_indirect = MAX_INDIRECT_DESCRIPTORS
        self._init_spans()
        self._desc3 = struct.Struct(endian + "QIHH" * 3)  # an indirect table of three
        # VIRTIO_F_IN_ORDER: completions are published in pop order, runs of completely
        # filled buffers as one used element (ring/inorder.py).
        self.in_order = in_order
        self._order = InOrderCompletions() if in_order else None

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else "ok"
        return (f"DeviceQueue({self.name}, size={self.size}, last_avail={self.last_avail_idx}, "
                f"used={self.used_idx}, {state})")

    # ---- consuming available buffers ----------------------------------------------------

    @property
    def avail_idx(self) -> int:
        """The driver's avail->idx as it is in memory now."""
        idx: int = self._u16.unpack_from(self._avail, 2)[0]
        return idx

    def pending(self) -> int:
        """How many chains the driver has made available that were not popped yet."""
        return (self.avail_idx - self.last_avail_idx) & 0xFFFF

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None when the avail ring is drained.

        Raises :class:`RingError` (and the queue stays broken) on any malformed input.
        """
        if self.broken is not None:
            raise RingError(self.broken)
        last = self.last_avail_idx
        avail_idx = self._u16.unpack_from(self._avail, 2)[0]
        pending = (avail_idx - last) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise self._break(
                f"avail idx {avail_idx} is {pending} entries ahead of last_avail_idx {last}, "
                f"more than the queue size {self.size}"
            )
        slot = last & self._mask
        head = self._u16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if self.event_idx and self._kicks_enabled:
            # Ask for a kick only for entries beyond what we have seen (libvhost-user does
            # the same); saves a notification per request when the driver is ahead.
            self._u16.pack_into(self._used, self._avail_event_off, self.last_avail_idx)
        if head >= self.size:
            raise self._break(
                f"avail ring slot {slot} holds descriptor index {head}, beyond the queue "
                f"size {self.size}"
            )
        if self._inflight[head]:
            raise self._break(f"descriptor {head} was made available again while in flight")
        chain = self._read_chain(head)
        self._inflight[head] = 1
        if self._order is not None:
            self._order.popped(head, 1, chain.writable_len)
        return chain

    def resume(self, head: int) -> DescriptorChain:
        """Take chain ``head`` as popped again, without consuming an avail slot.

        For a back-end restarted after a crash that resubmits the requests its predecessor
        had popped but never completed (vhost-user inflight tracking); the caller restores
        :attr:`last_avail_idx` itself. ``head`` comes from shared memory too: it is checked
        like a popped one, and a bad one breaks the queue (:class:`RingError`).
        """
        if self.broken is not None:
            raise RingError(self.broken)
        if not 0 <= head < self.size:
            raise self._break(f"resubmitted descriptor index {head} is beyond the queue size "
                              f"{self.size}")
        if self._inflight[head]:
            raise self._break(f"descriptor {head} was resubmitted while already in flight")
        chain = self._read_chain(head)
        self._inflight[head] = 1
        if self._order is not None:
            self._order.popped(head, 1, chain.writable_len)
        return chain

    def pop_short(self, limit: int = 0xFFFF) -> list[ShortChain]:
        """Batch pop: the next available chains that are *short*, as plain tuples.

        A short chain is exactly three descriptors, directly linked or as an indirect table
        of three: readable, then readable or writable, then writable, none empty, all three
        inside one guest memory region (a Linux block request: header, data, status). Each
        comes back as ``(head, buf, off0, len0, off1, len1, writable1, off2, len2)``, the
        offsets being into ``buf``, the region's memory, and is in flight as if popped.

        Stops at ``limit`` chains or at the first entry that is not short, leaving it for
        :meth:`pop`, which applies every ring rule (this method never breaks the queue: a
        malformed entry is simply not short). For the fast path of a device whose requests
        are such chains; serve anything unusual in one with :meth:`chain`.
        """
        out: list[ShortChain] = []
        if self.broken is not None or self._order is not None:
            return out  # broken, or IN_ORDER's bookkeeping: every chain goes through pop()
        avail = self._avail
        desc = self._desc
        _u16 = self._u16.unpack_from
        _desc1 = self._desc_struct.unpack_from
        _desc3 = self._desc3.unpack_from
        inflight = self._inflight
        qsize = self.size
        mask = self._mask
        last = self.last_avail_idx
        pending = self._batch_pending(limit)
        hb, he, hbuf = self._hot_span()
        append = out.append
        while pending:
            pending -= 1
            head = _u16(avail, 4 + 2 * (last & mask))[0]
            if head >= qsize or inflight[head]:
                break
            addr, length, flags, nxt = _desc1(desc, head << 4)
            if flags == _INDIRECT:
                if length != _TABLE3 or not self.indirect:
                    break
                if not hb <= addr <= he - _TABLE3:
                    span = self._find(addr, _TABLE3)
                    if span is None:
                        break
                    hb, he, hbuf = span
                a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _n2 = _desc3(hbuf, addr - hb)
                if n0 != 1 or n1 != 2:
                    break
            elif flags == _NEXT and nxt < qsize:
                a0, l0, f0 = addr, length, flags
                a1, l1, f1, n1 = _desc1(desc, nxt << 4)
                if n1 >= qsize:
                    break
                a2, l2, f2, _n2 = _desc1(desc, n1 << 4)
            else:
                break
            if (f0 != _NEXT or f2 != _WRITE or not (l0 and l1 and l2)
                    or (f1 != _NEXT_WRITE and f1 != _NEXT)):
                break
            if not hb <= a0 <= he - l0:
                span = self._find(a0, l0)
                if span is None:
                    break
                hb, he, hbuf = span
            if not (hb <= a1 and a1 + l1 <= he and hb <= a2 and a2 + l2 <= he):
                break
            inflight[head] = 1
            last = (last + 1) & 0xFFFF
            append((head, hbuf, a0 - hb, l0, a1 - hb, l1, f1 == _NEXT_WRITE, a2 - hb, l2))
        self._hot = (hb, he, hbuf)
        if out:
            self._batch_popped(last)
        return out

    def pop_writable(self, need: int) -> list[WritableBuffer]:
        """Batch pop, all or nothing: the next available buffers that are each one
        device-writable descriptor (not empty, inside one guest memory region: Linux's
        receive buffers with mergeable receive buffers), just enough of them to hold
        ``need`` bytes, as ``(head, buf, offset, length)`` tuples in flight as if popped.

        Pops nothing (and returns ``[]``) if the entries available before the first one
        that is not such a buffer hold less: those are left for :meth:`pop`, which applies
        every ring rule (a malformed entry is simply not one of these buffers).
        """
        out: list[WritableBuffer] = []
        if self.broken is not None or self._order is not None:
            return out  # broken, or IN_ORDER's bookkeeping: every chain goes through pop()
        avail = self._avail
        desc = self._desc
        _u16 = self._u16.unpack_from
        _desc1 = self._desc_struct.unpack_from
        inflight = self._inflight
        qsize = self.size
        mask = self._mask
        last = self.last_avail_idx
        pending = self._batch_pending(0xFFFF)
        hb, he, hbuf = self._hot_span()
        append = out.append
        while need > 0 and pending:
            pending -= 1
            head = _u16(avail, 4 + 2 * (last & mask))[0]
            if head >= qsize or inflight[head]:
                break
            addr, length, flags, _ = _desc1(desc, head << 4)
            if flags != _WRITE or not length:
                break
            if not hb <= addr <= he - length:
                span = self._find(addr, length)
                if span is None:
                    break
                hb, he, hbuf = span
            inflight[head] = 1  # (now: a head listed twice in the batch stops it)
            last = (last + 1) & 0xFFFF
            need -= length
            append((head, hbuf, addr - hb, length))
        self._hot = (hb, he, hbuf)
        if need > 0:
            for head, *_ in out:  # too few: nothing consumed
                inflight[head] = 0
            return []
        self._batch_popped(last)
        return out

    # what the batch pops (pop_short, pop_writable) share

    def _batch_pending(self, limit: int) -> int:
        """Entries a batch pop may look at: the available ones, at most ``limit``; 0 for a
        broken avail index (pop() says so)."""
        pending = (self._u16.unpack_from(self._avail, 2)[0] - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            return 0
        return min(pending, limit)

    def _batch_popped(self, last: int) -> None:
        """A batch pop consumed the entries up to ``last``."""
        self.last_avail_idx = last
        if self.event_idx and self._kicks_enabled:
            self._u16.pack_into(self._used, self._avail_event_off, last)

    def chain(self, head: int) -> DescriptorChain:
        """The full chain of ``head``, which is in flight (popped by :meth:`pop_short`):
        read with every ring rule, breaking the queue (:class:`RingError`) if it is bad."""
        if self.broken is not None:
            raise RingError(self.broken)
        if not 0 <= head < self.size or not self._inflight[head]:
            raise QueueUsageError(f"{self.name}: chain {head} is not in flight")
        return self._read_chain(head)

    def _read_chain(self, head: int) -> DescriptorChain:
        # ``head`` < size (the callers checked). A chain of one plain descriptor (a receive
        # buffer, a small request) needs no walk; anything else, or anything wrong with it,
        # takes the general walk, which reads the descriptor again and gives the verdict.
        memory = self.memory
        unpack = self._desc_struct.unpack_from
        table = self._desc
        addr, length, flags, _ = unpack(table, 16 * head)
        if not flags & (_NEXT | _INDIRECT) and addr + length <= U64_LIMIT:
            try:
                views = memory.views(addr, length) if length else []
            except GuestMemoryError:
                pass
            else:
                if flags & _WRITE:
                    return DescriptorChain(head, [], views, 0, length)
                return DescriptorChain(head, views, [], length, 0)
        table_len = self.size
        where = "descriptor"  # names the table in error messages
        idx = head
        count = 0
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        indirect_seen = False
        while True:
            if idx >= table_len:
                raise self._break(
                    f"chain {head}: {where} {idx} is beyond the table size {table_len}"
                )
            count += 1
            if count > table_len:
                raise self._break(
                    f"chain {head}: {where} {idx} makes the chain longer than its table "
                    f"({table_len} descriptors): a loop"
                )
            addr, length, flags, nxt = unpack(table, 16 * idx)
            if flags & _INDIRECT:
                if indirect_seen:
                    raise self._break(
                        f"chain {head}: {where} {idx} is INDIRECT inside an indirect table"
                    )
                if not self.indirect:
                    raise self._break(
                        f"chain {head}: descriptor {idx} is INDIRECT but "
                        "VIRTIO_F_INDIRECT_DESC was not negotiated"
                    )
                if flags & _NEXT:
                    raise self._break(
                        f"chain {head}: descriptor {idx} has both INDIRECT and NEXT"
                    )
                if length == 0 or length % S.VRING_DESC_SIZE:
                    raise self._break(
                        f"chain {head}: descriptor {idx} has an indirect table of {length} "
                        "bytes, not a positive multiple of 16"
                    )
                if length // S.VRING_DESC_SIZE > self.max_indirect:
                    raise self._break(
                        f"chain {head}: descriptor {idx} has an indirect table of "
                        f"{length // 16} descriptors, over the limit of {self.max_indirect}"
                    )
                if addr + length > U64_LIMIT:
                    raise self._break(
                        f"chain {head}: descriptor {idx} indirect table 0x{addr:x} +{length} "
                        "overflows 64 bits"
                    )
                try:
                    table = memory.view(addr, length)
                except GuestMemoryError as exc:
                    raise self._break(
                        f"chain {head}: descriptor {idx} points its indirect table outside "
                        f"guest memory: 0x{addr:x} +{length} ({exc})"
                    ) from exc
                table_len = length // S.VRING_DESC_SIZE
                where = f"indirect descriptor (table of descriptor {idx})"
                indirect_seen = True
                idx = 0
                count = 0
                continue
            if length:
                if addr + length > U64_LIMIT:
                    raise self._break(
                        f"chain {head}: {where} {idx} range 0x{addr:x} +{length} overflows "
                        "64 bits"
                    )
                try:
                    views = memory.views(addr, length)
                except GuestMemoryError as exc:
                    raise self._break(
                        f"chain {head}: {where} {idx} points outside guest memory: "
                        f"0x{addr:x} +{length}"
                    ) from exc
                if flags & _WRITE:
                    writable += views
                    wlen += length
                else:
                    if writable:
                        raise self._break(
                            f"chain {head}: {where} {idx} is readable but follows a writable "
                            "descriptor"
                        )
                    readable += views
                    rlen += length
            elif not flags & _WRITE and writable:
                raise self._break(
                    f"chain {head}: {where} {idx} is readable but follows a writable descriptor"
                )
            if not flags & _NEXT:
                break
            idx = nxt
        return DescriptorChain(head, readable, writable, rlen, wlen)

    # ---- returning used buffers ---------------------------------------------------------

    def push(self, chain: DescriptorChain | int, written: int) -> None:
        """Return a chain to the driver with the number of bytes written into it."""
        if self.broken is not None:
            raise RingError(self.broken)
        head = self._take(chain, written)
        if self._order is not None:
            self._order.complete(head, written)
            self._publish_in_order()
            return
        slot = self.used_idx & self._mask
        self._elem.pack_into(self._used, 4 + 8 * slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The element is stored before the index (program order; x86 keeps stores ordered).
        self._u16.pack_into(self._used, 2, self.used_idx)
        self._fenced = False

    def push_many(self, completions: Iterable[tuple[DescriptorChain | int, int]]) -> int:
        """Return several chains with one used->idx update; returns how many."""
        if self.broken is not None:
            raise RingError(self.broken)
        idx = self.used_idx
        pack = self._elem.pack_into
        used = self._used
        n = 0
        if self._order is not None:
            for chain, written in completions:
                self._order.complete(self._take(chain, written), written)
                n += 1
            self._publish_in_order()  # one pass: runs span the whole call
            return n
        inflight = self._inflight
        size = self.size
        mask = self._mask
        for chain, written in completions:
            if type(chain) is int and 0 <= chain < size and inflight[chain] and written >= 0:
                head = chain  # a fast lane's (head, length): checked inline, no call
                inflight[head] = 0
            else:
                head = self._take(chain, written)
            pack(used, 4 + 8 * (idx & mask), head, written)
            idx = (idx + 1) & 0xFFFF
            n += 1
        if n:
            self.used_idx = idx
            self._u16.pack_into(used, 2, idx)
            self._fenced = False
        return n

    def _take(self, chain: DescriptorChain | int, written: int) -> int:
        if isinstance(chain, int):
            head = chain
        else:
            head = chain.head
            if written > chain.writable_len:
                raise QueueUsageError(
                    f"{self.name}: used length {written} for chain {head} exceeds its "
                    f"{chain.writable_len} writable bytes"
                )
        if written < 0:
            raise QueueUsageError(f"{self.name}: negative used length {written}")
        if not 0 <= head < self.size or not self._inflight[head]:
            raise QueueUsageError(f"{self.name}: chain {head} is not in flight")
        if self._order is None:
            self._inflight[head] = 0
        elif not self._order.pending(head):
            raise QueueUsageError(f"{self.name}: chain {head} is not in flight")
        return head

    def forge_used(self, buf_id: int, written: int, *, skip: int = 0,
                   wrong_wrap: bool = False, retire: bool = False) -> None:
        """Hostile-device testing only (:mod:`pyvirtio.device.chaos`): store the used
        element ``(buf_id, written)`` unchecked and move used->idx past it and ``skip``
        more slots that were never written. ``retire``: ``buf_id`` is an in-flight head
        that this element returns (the device stops tracking it). ``wrong_wrap`` is for
        the packed ring (a split ring has no wrap counter)."""
        if self.broken is not None:
            raise RingError(self.broken)
        if retire and 0 <= buf_id < self.size:
            self._inflight[buf_id] = 0
        idx = self.used_idx
        self._elem.pack_into(self._used, 4 + 8 * (idx & self._mask), buf_id & 0xFFFFFFFF,
                             written & 0xFFFFFFFF)
        self.used_idx = (idx + 1 + skip) & 0xFFFF
        self._u16.pack_into(self._used, 2, self.used_idx)

    def _publish_in_order(self) -> None:
        """IN_ORDER: publish every run now complete in pop order as one used element (the
        run's last head) at the slot of its first buffer, moving used->idx by the run's
        length (VIRTIO 1.x §2.7.9)."""
        assert self._order is not None
        idx = self.used_idx
        batches = self._order.batches()
        for heads, count, last_written in batches:  # count: each weighs 1
            for h in heads:
                self._inflight[h] = 0
            self._elem.pack_into(self._used, 4 + 8 * (idx & self._mask), heads[-1],
                                 last_written)
            idx = (idx + count) & 0xFFFF
        if batches:
            self.used_idx = idx
            self._u16.pack_into(self._used, 2, idx)
            self._fenced = False

    def in_flight(self) -> list[int]:
        """Heads popped and not yet pushed."""
        if self._order is not None:
            return [i for i, f in enumerate(self._inflight) if f and self._order.pending(i)]
        return [i for i, f in enumerate(self._inflight) if f]

    def rewind(self, count: int) -> None:
        """Un-pop the last ``count`` chains (they are offered again by the next pops).

        Only valid for chains not yet pushed; used when a back-end must give up mid-batch.
        """
        for i in range(count):
            slot = (self.last_avail_idx - 1 - i) & self._mask
            head = self._u16.unpack_from(self._avail, 4 + 2 * slot)[0]
            if head < self.size:
                self._inflight[head] = 0
                if self._order is not None:
                    self._order.unpop(head)
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    # ---- notification suppression -------------------------------------------------------

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call.

        With EVENT_IDX: iff used->idx moved past the driver's used_event. Without: iff
        something was pushed and the driver did not set VRING_AVAIL_F_NO_INTERRUPT.
        """
        new = self.used_idx
        old = self._signalled_used
        if new == old:
            # Nothing new. Leave the reference point alone: taking it here would swallow
            # the "no reference yet" interrupt a restored queue owes the driver.
            return False
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not self._fenced:
            full_barrier()  # our used->idx store must be visible before we read used_event
        if self.event_idx:
            if not valid:
                return True  # no reference point yet (fresh or restored queue): be safe
            used_event = self._u16.unpack_from(self._avail, self._used_event_off)[0]
            # S.vring_need_event(used_event, new, old), inline: once per drain
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags = self._u16.unpack_from(self._avail, 0)[0]
        return not flags & S.VRING_AVAIL_F_NO_INTERRUPT

    def disable_notifications(self) -> None:
        """Tell the driver not to kick (we are polling)."""
        self._kicks_enabled = False
        if not self.event_idx:
            self._u16.pack_into(self._used, 0, S.VRING_USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask for kicks again. Returns True if buffers arrived meanwhile (the device-side
        mirror of the enable_cb race): the caller must pop again instead of sleeping."""
        self._kicks_enabled = True
        if self.event_idx:
            self._u16.pack_into(self._used, self._avail_event_off, self.last_avail_idx)
        else:
            self._u16.pack_into(self._used, 0, 0)
        full_barrier()
        self._fenced = True  # it also orders every used->idx store made before it
        return self._u16.unpack_from(self._avail, 2)[0] != self.last_avail_idx

    @property
    def used_event(self) -> int:
        idx: int = self._u16.unpack_from(self._avail, self._used_event_off)[0]
        return idx

    @property
    def avail_flags(self) -> int:
        flags: int = self._u16.unpack_from(self._avail, 0)[0]
        return flags


class _InFlight:
    __slots__ = ("descs", "in_capacity", "indirect_addr", "token")

    def __init__(self, token: object, descs: list[int], in_capacity: int,
                 indirect_addr: int | None) -> None:
        self.token = token
        self.descs = descs
        self.in_capacity = in_capacity
        self.indirect_addr = indirect_addr


class DriverQueue(_SplitRing):
    """The driver side of a split virtqueue (the paper's virtqueue ops).

    Buffers are scatter-gather lists of ``(guest_physical_address, length)`` pairs. The
    driver's view of what it has in flight lives here in Python, never re-read from shared
    memory, so a device scribbling over the descriptor table cannot confuse it.
    ``allocator`` (needed for indirect descriptors) hands out guest memory for indirect tables.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        in_order: bool = False,
        allocator: Allocator | None = None,
        endian: Endian = LE,
        name: str = "queue",
        start_idx: int = 0,
    ) -> None:
        if indirect and allocator is None:
            raise QueueUsageError("indirect descriptors need an allocator for their tables")
        super().__init__(memory, size, desc_addr, avail_addr, used_addr, event_idx, indirect,
                         endian, name)
        self.allocator = allocator
        # A fresh ring: the driver owns initialisation of all three areas.
        self._desc[:] = bytes(len(self._desc))
        self._avail[:] = bytes(len(self._avail))
        self._used[:] = bytes(len(self._used))
        # Free descriptors. Without IN_ORDER a stack (pop() gives 0 first); with it, a
        # queue in ring order (descriptors are used in ring order, §2.7.5, and return in
        # that order, so the free ones stay one run: popleft() takes the next in the ring).
        self.in_order = in_order
        self._free: deque[int] = deque(range(size) if in_order else range(size - 1, -1, -1))
        self._inflight: list[_InFlight | None] = [None] * size
        self._order: deque[int] = deque()  # IN_ORDER: heads in the order they were added
        # The rest of an in-order batch: (token, written, entry), each freed when returned.
        self._ready: deque[tuple[object, int, _InFlight]] = deque()  # the rest of an in-order batch
        # ``start_idx`` starts both free-running indices somewhere other than 0 (tests use it
        # to cross the 16-bit wrap quickly; a restored ring resumes where it was). The device
        # side honours it by reading used->idx from the ring and being given last_avail_idx
        # = start_idx. avail_event/used_event start equal to it too, as 0 does on a fresh
        # ring, so the first buffer is kicked and the first completion interrupts.
        start_idx &= 0xFFFF
        self.avail_idx = start_idx  # shadow of avail->idx
        self.last_used_idx = start_idx
        self._num_added = 0
        self._avail_flags = 0
        if start_idx:
            self._u16.pack_into(self._avail, 2, start_idx)
            self._u16.pack_into(self._avail, self._used_event_off, start_idx)
            self._u16.pack_into(self._used, 2, start_idx)
            self._u16.pack_into(self._used, self._avail_event_off, start_idx)

    def __repr__(self) -> str:
        return (f"DriverQueue({self.name}, size={self.size}, free={len(self._free)}, "
                f"avail={self.avail_idx}, last_used={self.last_used_idx})")

    @property
    def num_free(self) -> int:
        """Free descriptors in the table."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Buffers added and not yet returned by get_buf."""
        return sum(1 for e in self._inflight if e is not None) + len(self._ready)

    def _take_free(self) -> int:
        return self._free.popleft() if self.in_order else self._free.pop()

    def _give_back(self, descs: list[int]) -> None:
        if self.in_order:
            self._free.extend(descs)
        else:
            self._free.extend(reversed(descs))

    # ---- add ----------------------------------------------------------------------------

    def add_buf(
        self,
        out_sgs: Sequence[tuple[int, int]],
        in_sgs: Sequence[tuple[int, int]],
        token: object,
    ) -> int:
        """Expose a buffer: ``out_sgs`` the device reads, ``in_sgs`` it writes.

        ``token`` comes back from :meth:`get_buf` when the device is done. Returns the head
        descriptor id. Raises :class:`QueueFullError` without side effects if there is no room.
        """
        if self.broken is not None:
            raise RingError(self.broken)
        if token is None:
            raise QueueUsageError("token must not be None (None means 'nothing used')")
        total = len(out_sgs) + len(in_sgs)
        if total == 0:
            raise QueueUsageError("a buffer needs at least one scatter-gather entry")
        pack = self._desc_struct.pack_into
        in_capacity = 0
        for _, length in in_sgs:
            in_capacity += length
        indirect_addr: int | None = None
        if self.indirect and total > 1 and self.allocator is not None:
            if not self._free:
                raise QueueFullError(f"{self.name}: no free descriptor")
            indirect_addr = self.allocator.alloc(16 * total, 16)
            table = self.memory.view(indirect_addr, 16 * total)
            i = 0
            for addr, length in out_sgs:
                pack(table, 16 * i, addr, length, _NEXT if i + 1 < total else 0, i + 1)
                i += 1
            for addr, length in in_sgs:
                flags = _WRITE | (_NEXT if i + 1 < total else 0)
                pack(table, 16 * i, addr, length, flags, i + 1)
                i += 1
            head = self._take_free()
            pack(self._desc, 16 * head, indirect_addr, 16 * total, _INDIRECT, 0)
            descs = [head]
        else:
            if len(self._free) < total:
                raise QueueFullError(
                    f"{self.name}: {total} descriptors needed, {len(self._free)} free"
                )
            descs = [self._take_free() for _ in range(total)]
            i = 0
            for addr, length in out_sgs:
                nxt = descs[i + 1] if i + 1 < total else 0
                pack(self._desc, 16 * descs[i], addr, length, _NEXT if i + 1 < total else 0, nxt)
                i += 1
            for addr, length in in_sgs:
                nxt = descs[i + 1] if i + 1 < total else 0
                flags = _WRITE | (_NEXT if i + 1 < total else 0)
                pack(self._desc, 16 * descs[i], addr, length, flags, nxt)
                i += 1
            head = descs[0]
        self._inflight[head] = _InFlight(token, descs, in_capacity, indirect_addr)
        if self.in_order:
            self._order.append(head)
        # Publish: ring entry first, then the index (stores stay ordered).
        self._u16.pack_into(self._avail, 4 + 2 * (self.avail_idx & self._mask), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._u16.pack_into(self._avail, 2, self.avail_idx)
        self._num_added += 1
        return head

    def kick_prepare(self) -> bool:
        """Whether the device must be notified about buffers added since the last call.

        Honours VRING_USED_F_NO_NOTIFY, or with EVENT_IDX the device's avail_event.
        """
        full_barrier()  # avail->idx must be visible before we read the device's suppression
        new = self.avail_idx
        old = (new - self._num_added) & 0xFFFF
        self._num_added = 0
        if self.event_idx:
            avail_event = self._u16.unpack_from(self._used, self._avail_event_off)[0]
            return S.vring_need_event(avail_event, new, old)
        flags = self._u16.unpack_from(self._used, 0)[0]
        return not flags & S.VRING_USED_F_NO_NOTIFY

    # ---- collect used -------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        """The device's used->idx as it is in memory now."""
        idx: int = self._u16.unpack_from(self._used, 2)[0]
        return idx

    def has_used(self) -> bool:
        """Whether get_buf would return something (virtqueue_poll)."""
        return bool(self._ready) or self.used_idx != self.last_used_idx

    def get_buf(self) -> tuple[object, int] | None:
        """The next used buffer as ``(token, bytes_written)``, or None.

        Buffers may come back in any order. With IN_ORDER one used element may return a
        run of buffers (the id of the last; used->idx moves by the run's length): all but
        the last count as completely written. Raises :class:`RingError` if the device
        returns an id that is not in flight or claims more bytes than the buffer could hold.
        """
        if self.broken is not None:
            raise RingError(self.broken)
        if self._ready:
            return self._collect(*self._ready.popleft())
        used_idx = self._u16.unpack_from(self._used, 2)[0]
        last = self.last_used_idx
        if used_idx == last:
            return None
        ahead = (used_idx - last) & 0xFFFF
        if ahead > self.size:
            raise self._break(
                f"device moved used idx to {used_idx}, {ahead} entries past {last}, more than "
                f"the queue size {self.size}"
            )
        head, written = self._elem.unpack_from(self._used, 4 + 8 * (last & self._mask))
        entry = self._inflight[head] if head < self.size else None
        if entry is None:
            raise self._break(
                f"device returned id {head} in used slot {last & self._mask}, which is not an "
                "in-flight buffer"
            )
        if written > entry.in_capacity:
            raise self._break(
                f"device claims {written} bytes written into buffer {head}, which has only "
                f"{entry.in_capacity} writable bytes"
            )
        batch = [head]
        if self.in_order:
            batch = []
            for h in self._order:
                batch.append(h)
                if h == head:
                    break
            if len(batch) > ahead:
                raise self._break(
                    f"device returned id {head} in used slot {last & self._mask} for a run "
                    f"of {len(batch)} buffers, but used idx moved only {ahead} entries"
                )
            for _ in batch:
                self._order.popleft()
        if len(batch) == 1:
            self._inflight[head] = None
            result = self._collect(entry.token, written, entry)
        else:
            for h in batch:
                e = self._inflight[h]
                assert e is not None
                self._inflight[h] = None
                # All but the last were used completely (§2.7.9).
                self._ready.append((e.token, written if h == head else e.in_capacity, e))
            result = self._collect(*self._ready.popleft())
        self.last_used_idx = (last + len(batch)) & 0xFFFF
        if self.event_idx and not self._avail_flags & S.VRING_AVAIL_F_NO_INTERRUPT:
            # Interrupt us when the next entry is used (Linux does the same).
            self._u16.pack_into(self._avail, self._used_event_off, self.last_used_idx)
        return result

    def _collect(self, token: object, written: int, entry: _InFlight) -> tuple[object, int]:
        self._give_back(entry.descs)
        if entry.indirect_addr is not None and self.allocator is not None:
            self.allocator.free(entry.indirect_addr)
        return token, written

    def detach_unused(self) -> list[object]:
        """After a device reset: take back every buffer still in flight, returning tokens."""
        tokens = [self._collect(*r)[0] for r in self._ready]
        self._ready.clear()
        self._order.clear()
        for head, entry in enumerate(self._inflight):
            if entry is not None:
                tokens.append(entry.token)
                self._inflight[head] = None
                self._give_back(entry.descs)
                if entry.indirect_addr is not None and self.allocator is not None:
                    self.allocator.free(entry.indirect_addr)
        if self.in_order:
            self._free = deque(range(self.size))  # a reset ring starts again at 0
        return tokens

    # ---- interrupt suppression (the paper's callback control) ---------------------------

    def disable_cb(self) -> None:
        """Ask the device not to interrupt (we will poll)."""
        if self._avail_flags & S.VRING_AVAIL_F_NO_INTERRUPT:
            return
        self._avail_flags |= S.VRING_AVAIL_F_NO_INTERRUPT
        if self.event_idx:
            # An event index the device will not cross for another 65535 buffers.
            self._u16.pack_into(self._avail, self._used_event_off,
                                (self.last_used_idx - 1) & 0xFFFF)
        else:
            self._u16.pack_into(self._avail, 0, self._avail_flags)

    def enable_cb_prepare(self) -> int:
        """Re-enable interrupts; returns the opaque index to pass to :meth:`poll`."""
        if self._avail_flags & S.VRING_AVAIL_F_NO_INTERRUPT:
            self._avail_flags &= ~S.VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._u16.pack_into(self._avail, 0, self._avail_flags)
        self._u16.pack_into(self._avail, self._used_event_off, self.last_used_idx)
        return self.last_used_idx

    def poll(self, last_used_idx: int) -> bool:
        """Whether buffers were used since :meth:`enable_cb_prepare` returned ``last_used_idx``."""
        full_barrier()
        return self.used_idx != last_used_idx

    def enable_cb(self) -> bool:
        """Re-enable interrupts. Returns False if buffers were used in the meantime (the
        paper's §3.1 race): the caller must call get_buf again rather than wait."""
        opaque = self.enable_cb_prepare()
        return not self._ready and not self.poll(opaque)

    def enable_cb_delayed(self) -> bool:
        """Re-enable interrupts but ask for one only after ~3/4 of the outstanding buffers
        are used (transmit completion batching). Returns False if that many already are."""
        if self._avail_flags & S.VRING_AVAIL_F_NO_INTERRUPT:
            self._avail_flags &= ~S.VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._u16.pack_into(self._avail, 0, self._avail_flags)
        bufs = ((self.avail_idx - self.last_used_idx) & 0xFFFF) * 3 // 4
        self._u16.pack_into(self._avail, self._used_event_off,
                            (self.last_used_idx + bufs) & 0xFFFF)
        full_barrier()
        if self._ready:
            return False
        return (self.used_idx - self.last_used_idx) & 0xFFFF <= bufs

    @property
    def avail_event(self) -> int:
        idx: int = self._u16.unpack_from(self._used, self._avail_event_off)[0]
        return idx


def _implements_the_queue_interface(device: DeviceQueue, driver: DriverQueue
                                    ) -> tuple[DeviceRing, DriverRing]:
    return device, driver  # mypy checks that the split ring implements ring.queue
