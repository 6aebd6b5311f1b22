"""Packed virtqueues (VIRTIO 1.1+ §2.8), both ends, sans-I/O.

The same API as :mod:`pyvirtio.ring.split`: :class:`PackedDriverQueue` offers what
:class:`~pyvirtio.ring.split.DriverQueue` offers (add_buf, kick_prepare, get_buf,
disable_cb, enable_cb, enable_cb_delayed, poll, detach_unused) and
:class:`PackedDeviceQueue` what :class:`~pyvirtio.ring.split.DeviceQueue` offers (pop,
push, push_many, needs_notification, disable/enable_notifications, in_flight, rewind), so a
device or driver runs on either format unchanged. The constructors take the same three
addresses: the descriptor ring, the *driver area* (the driver's event suppression
structure, where split has its avail ring) and the *device area* (the device's event
suppression structure, where split has its used ring).

How the packed ring works, in the terms used below:

* One ring of ``size`` 16-byte descriptors (addr, len, id, flags) written by both sides.
  Each side walks it with a *position* (0..size-1) and a one-bit *wrap counter* that
  starts at 1 and flips each time the position wraps. Positions are published as
  ``position | wrap << 15`` (the vhost-user encoding of GET/SET_VRING_BASE).
* The driver makes a descriptor available by setting its AVAIL flag to its wrap counter and
  USED to the inverse; the device marks one used with AVAIL = USED = its wrap counter.
* A buffer is a chain of consecutive descriptors (NEXT on all but the last), or one
  descriptor pointing at an indirect table. The driver writes the head's flags last, so a
  device never sees half a chain. The buffer's *id* (carried by the last descriptor) is not
  a ring position: the device reports completion by writing one used descriptor with that
  id at its next used position, then skips as many positions as the buffer occupied.
  Buffers may complete in any order; with IN_ORDER one used descriptor may stand for a run
  of buffers (the id of the last; the others count as completely used).
* Notification suppression lives in two 4-byte structures (off_wrap, flags): ENABLE,
  DISABLE, or (with EVENT_IDX) DESC: notify only when the other side passes the ring
  position ``off_wrap`` names.

Everything read from shared memory is untrusted, as in the split ring: a violation breaks
the queue with a reason naming the ring slot, the buffer id and the address.
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
from pyvirtio.ring.queue import ShortChain, WritableBuffer
from pyvirtio.ring.split import MAX_INDIRECT_DESCRIPTORS, U64_LIMIT, RegionSpans, _map_area
from pyvirtio.spec import LE, Endian
from pyvirtio.spec import packed as P

_NEXT = P.VRING_DESC_F_NEXT
_WRITE = P.VRING_DESC_F_WRITE
_INDIRECT = P.VRING_DESC_F_INDIRECT
_AVAIL = 1 << P.VRING_PACKED_DESC_F_AVAIL
_USED = 1 << P.VRING_PACKED_DESC_F_USED
_AVAIL_USED = _AVAIL | _USED
_ENABLE = P.VRING_PACKED_EVENT_FLAG_ENABLE
_DISABLE = P.VRING_PACKED_EVENT_FLAG_DISABLE
_DESC = P.VRING_PACKED_EVENT_FLAG_DESC
_WRAP_BIT = 1 << P.VRING_PACKED_EVENT_F_WRAP_CTR

#: A fresh ring: position 0, wrap counter 1 (the encoding of GET/SET_VRING_BASE).
FRESH = _WRAP_BIT


def encode(pos: int, wrap: int) -> int:
    """``position | wrap << 15``: how a ring position travels (vhost-user, off_wrap)."""
    return pos | wrap << 15


def decode(value: int) -> tuple[int, int]:
    return value & 0x7FFF, value >> 15 & 1


def base_of_zero(memory: GuestMemory, desc_addr: int, endian: Endian = LE) -> int:
    """Where a packed ring told to start at 0 (position 0, wrap counter 0) really starts.

    Position 0 with wrap counter 0 means "exactly one lap done". Then slot 0 holds the
    first used descriptor of that lap (the device writes used descriptors from position 0
    with wrap counter 1: AVAIL = USED = 1), since the whole lap was made available and
    consumed. If it does not, the ring never completed a lap: it is a fresh ring whose
    front-end sent 0 without encoding the wrap counter (User-Mode Linux's virtio_uml sends
    SET_VRING_BASE 0 for every ring), so it starts at :data:`FRESH`. A slot outside guest
    memory is left for the ring itself to refuse.
    """
    try:
        raw = memory.read(desc_addr + 14, 2)
    except GuestMemoryError:
        return 0
    flags = struct.unpack(endian + "H", raw)[0]
    return 0 if flags & _AVAIL_USED == _AVAIL_USED else FRESH


def _check_size(size: int) -> None:
    if not P.is_valid_queue_size(size):
        raise QueueUsageError(f"packed queue size {size} is not in 1..32768")


def _crossed(event: int, new: int, old: int, modulus: int) -> bool:
    """Whether moving from linear position ``old`` to ``new`` (``new - old`` < modulus
    steps, both taken mod ``modulus``) passed ``event``: the EVENT_IDX rule on a ring of
    ``modulus`` = 2 * size linear positions (position plus a lap of the wrap counter)."""
    return (new - event - 1) % modulus < (new - old) % modulus


class _PackedRing:
    """What both ends share: the descriptor ring and the two suppression structures mapped
    once as views of guest memory, the structs for the byte order, the broken state."""

    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, event_idx: bool, indirect: bool, in_order: bool,
                 endian: Endian, name: str) -> None:
        _check_size(size)
        self.memory = memory
        self.size = size
        self.name = name
        self.event_idx = event_idx
        self.indirect = indirect
        self.in_order = in_order
        # The split names, so code that reports addresses works on both formats.
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self._desc = _map_area(memory, desc_addr, P.ring_size(size), "descriptor ring")
        self._driver_evt = _map_area(memory, avail_addr, P.EVENT_SUPPRESS_SIZE,
                                     "driver event suppression")
        self._device_evt = _map_area(memory, used_addr, P.EVENT_SUPPRESS_SIZE,
                                     "device event suppression")
        self._desc_struct = P.desc_struct(endian)
        self._evt = P.event_suppress_struct(endian)
        self._u16 = struct.Struct(endian + "H")
        self._len_id = struct.Struct(endian + "IH")
        self.broken: str | None = None

    @property
    def driver_addr(self) -> int:
        return self.avail_addr

    @property
    def device_addr(self) -> int:
        return self.used_addr

    def _break(self, reason: str) -> RingError:
        if self.broken is None:
            self.broken = f"{self.name}: {reason}"
        return RingError(self.broken)

    def _slot_addr(self, pos: int) -> int:
        return self.desc_addr + 16 * pos


class PackedDeviceQueue(_PackedRing, RegionSpans):
    """The device side of a packed virtqueue.

    ``last_avail_idx`` (the next position to pop) and ``used_idx`` (the next position to
    write a used descriptor) are ``position | wrap << 15``; both default to a fresh ring
    (:data:`FRESH`: position 0, wrap counter 1) and are restored from outside for
    vhost-user (SET_VRING_BASE) and reconnection. Unlike the split ring the used position
    cannot be read back from memory: by default it equals ``last_avail_idx`` (nothing in
    flight).
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
        last_avail_idx: int = FRESH,
        used_idx: int | None = None,
        name: str = "queue",
    ) -> None:
        super().__init__(memory, size, desc_addr, avail_addr, used_addr, event_idx, indirect,
                         in_order, endian, name)
        self._avail_pos, self._avail_wrap = 0, 1
        self._used_pos, self._used_wrap = 0, 1
        self.last_avail_idx = last_avail_idx
        self.used_idx = last_avail_idx if used_idx is None else used_idx
        self._kicks_enabled = True
        # Per buffer id: ring descriptors it occupies (0: not in flight) and writable bytes.
        self._ndescs = [0] * size
        self._capacity = [0] * size
        self._start = [0] * size  # the ring position of its first descriptor, as popped
        # Buffers a previous back-end left in flight, with their descriptors as saved
        # outside the ring (vhost-user's packed inflight region): taken by resume().
        self._saved: dict[int, list[tuple[int, int, int, int]]] = {}
        # in flight, in pop order (rewind): the chain, or the tuple pop_short handed out
        self._popped: dict[int, DescriptorChain | ShortChain | WritableBuffer] = {}
        self._init_spans()
        self._order = InOrderCompletions() if in_order else None
        self._used_total = 0  # descriptors used since start (for notification windows)
        self._signalled_total = 0
        self._signalled_valid = False
        self.max_indirect = MAX_INDIRECT_DESCRIPTORS

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else "ok"
        return (f"PackedDeviceQueue({self.name}, size={self.size}, "
                f"last_avail=0x{self.last_avail_idx:04x}, used=0x{self.used_idx:04x}, {state})")

    # ---- positions -------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        return encode(self._avail_pos, self._avail_wrap)

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        pos, wrap = decode(value)
        if pos >= self.size:
            raise self._break(f"avail position {pos} (0x{value:04x}) is beyond the ring size "
                              f"{self.size}")
        self._avail_pos, self._avail_wrap = pos, wrap

    @property
    def used_idx(self) -> int:
        return encode(self._used_pos, self._used_wrap)

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        pos, wrap = decode(value)
        if pos >= self.size:
            raise self._break(f"used position {pos} (0x{value:04x}) is beyond the ring size "
                              f"{self.size}")
        self._used_pos, self._used_wrap = pos, wrap

    def _descs_in_flight(self) -> int:
        """Ring descriptors between the used and the avail position."""
        used = self._used_pos + (0 if self._used_wrap == self._avail_wrap else -self.size)
        return self._avail_pos - used

    # ---- consuming available buffers ----------------------------------------------------

    def _is_avail(self, pos: int, wrap: int) -> bool:
        flags: int = self._u16.unpack_from(self._desc, 16 * pos + 14)[0]
        return bool(flags & _AVAIL) == bool(wrap) and bool(flags & _USED) != bool(wrap)

    def pending(self) -> int:
        """1 if a buffer is available at the next position, else 0 (a packed ring does not
        say how many are pending without walking them)."""
        return 1 if self._is_avail(self._avail_pos, self._avail_wrap) else 0

    def pop(self) -> DescriptorChain | None:
        """The next available buffer, or None when none is available.

        ``chain.head`` is the buffer id. Raises :class:`RingError` (the queue stays
        broken) on any malformed input.
        """
        if self.broken is not None:
            raise RingError(self.broken)
        pos, wrap = self._avail_pos, self._avail_wrap
        flags = self._u16.unpack_from(self._desc, 16 * pos + 14)[0]
        if bool(flags & _AVAIL) != bool(wrap):
            return None
        if bool(flags & _USED) == bool(wrap):
            raise self._break(
                f"ring slot {pos} (0x{self._slot_addr(pos):x}) has AVAIL and USED both equal "
                f"to the wrap counter {wrap}: a used descriptor where the device has not "
                "written one (wrap counter inconsistency)"
            )
        chain, ndescs = self._read_chain(pos, wrap, flags)
        buf_id = chain.head
        self._ndescs[buf_id] = ndescs
        self._start[buf_id] = pos
        self._capacity[buf_id] = chain.writable_len
        self._popped[buf_id] = chain
        if self._order is not None:
            self._order.popped(buf_id, ndescs, chain.writable_len)
        pos += ndescs
        if pos >= self.size:
            pos -= self.size
            wrap ^= 1
        self._avail_pos, self._avail_wrap = pos, wrap
        if self.event_idx and self._kicks_enabled:
            # Ask for a kick only for descriptors beyond what we have seen.
            self._evt.pack_into(self._device_evt, 0, encode(pos, wrap), _DESC)
        return chain

    def _read_chain(self, pos: int, wrap: int, flags: int) -> tuple[DescriptorChain, int]:
        """Read the buffer whose first descriptor is at ``pos`` (available, flags read).
        Returns the chain (head = buffer id) and how many ring descriptors it occupies."""
        size = self.size
        ring = self._desc
        unpack = self._desc_struct.unpack_from
        memory = self.memory
        addr, length, buf_id, flags = unpack(ring, 16 * pos)
        if not flags & (_NEXT | _INDIRECT) and addr + length <= U64_LIMIT and buf_id < size \
                and not self._ndescs[buf_id] and self._descs_in_flight() < size:
            try:
                views = memory.views(addr, length) if length else []
            except GuestMemoryError:
                pass
            else:
                if flags & _WRITE:
                    return DescriptorChain(buf_id, [], views, 0, length), 1
                return DescriptorChain(buf_id, views, [], length, 0), 1
        room = size - self._descs_in_flight()
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        count = 0
        first = pos
        p, w = pos, wrap
        while True:
            where = f"ring slot {p} (0x{self._slot_addr(p):x})"
            count += 1
            if count > size:
                raise self._break(
                    f"chain at slot {first}: {where} makes the chain longer than the ring "
                    f"({size} descriptors)"
                )
            if count > room:
                raise self._break(
                    f"chain at slot {first}: {where} would be descriptor {count} of the chain, "
                    f"but only {room} ring slots are not in flight (the chain overruns "
                    "buffers the device has not used yet)"
                )
            addr, length, buf_id, flags = unpack(ring, 16 * p)
            if count > 1 and (bool(flags & _AVAIL) != bool(w) or bool(flags & _USED) == bool(w)):
                raise self._break(
                    f"chain at slot {first}: {where} continues the chain but is not marked "
                    f"available for wrap counter {w} (flags 0x{flags:04x}): wrap counter "
                    "inconsistency"
                )
            rl, wl = self._segment(f"chain at slot {first}", where, count, addr, length,
                                   flags, readable, writable)
            rlen += rl
            wlen += wl
            if not flags & _NEXT:
                break
            p += 1
            if p == size:
                p, w = 0, w ^ 1
        # The buffer id is carried by the last descriptor.
        if buf_id >= size:
            raise self._break(
                f"chain at slot {first}: {where} carries buffer id {buf_id}, beyond the "
                f"queue size {size}"
            )
        if self._ndescs[buf_id]:
            raise self._break(
                f"chain at slot {first}: {where} carries buffer id {buf_id}, which is "
                "already in flight"
            )
        return DescriptorChain(buf_id, readable, writable, rlen, wlen), count

    def _segment(self, chain: str, where: str, count: int, addr: int, length: int,
                 flags: int, readable: list[memoryview], writable: list[memoryview]
                 ) -> tuple[int, int]:
        """Add descriptor ``count`` (1-based) of a buffer to the chain being built
        (``chain`` names it in errors): its memory, or its indirect table's. Returns the
        readable and writable bytes it adds; breaks the queue on anything malformed."""
        memory = self.memory
        if flags & _INDIRECT:
            if not self.indirect:
                raise self._break(
                    f"{chain}: {where} is INDIRECT but "
                    "VIRTIO_F_INDIRECT_DESC was not negotiated"
                )
            if flags & _NEXT:
                raise self._break(f"{chain}: {where} has both INDIRECT and NEXT")
            if count > 1:
                raise self._break(
                    f"{chain}: {where} is INDIRECT in the middle of a chain "
                    "(a packed buffer is either direct or one indirect descriptor)"
                )
            return self._read_indirect(chain, where, addr, length, readable, writable)
        if length:
            if addr + length > U64_LIMIT:
                raise self._break(
                    f"{chain}: {where} range 0x{addr:x} +{length} overflows "
                    "64 bits"
                )
            try:
                views = memory.views(addr, length)
            except GuestMemoryError as exc:
                raise self._break(
                    f"{chain}: {where} points outside guest memory: "
                    f"0x{addr:x} +{length}"
                ) from exc
            if flags & _WRITE:
                writable += views
                return 0, length
            if writable:
                raise self._break(
                    f"{chain}: {where} is readable but follows a "
                    "writable descriptor"
                )
            readable += views
            return length, 0
        if not flags & _WRITE and writable:
            raise self._break(
                f"{chain}: {where} is readable but follows a writable "
                "descriptor"
            )
        return 0, 0

    def _read_indirect(self, chain: str, where: str, addr: int, length: int,
                       readable: list[memoryview], writable: list[memoryview]
                       ) -> tuple[int, int]:
        if length == 0 or length % P.PACKED_DESC_SIZE:
            raise self._break(
                f"{chain}: {where} has an indirect table of {length} bytes, not "
                "a positive multiple of 16"
            )
        n = length // P.PACKED_DESC_SIZE
        if n > self.max_indirect:
            raise self._break(
                f"{chain}: {where} has an indirect table of {n} descriptors, "
                f"over the limit of {self.max_indirect}"
            )
        if addr + length > U64_LIMIT:
            raise self._break(
                f"{chain}: {where} indirect table 0x{addr:x} +{length} "
                "overflows 64 bits"
            )
        try:
            table = self.memory.view(addr, length)
        except GuestMemoryError as exc:
            raise self._break(
                f"{chain}: {where} points its indirect table outside guest "
                f"memory: 0x{addr:x} +{length} ({exc})"
            ) from exc
        unpack = self._desc_struct.unpack_from
        rlen = wlen = 0
        for i in range(n):
            d_addr, d_len, _, d_flags = unpack(table, 16 * i)
            at = f"indirect descriptor {i} (table of {where} at 0x{addr:x})"
            if d_flags & _INDIRECT:
                raise self._break(f"{chain}: {at} is INDIRECT inside an "
                                  "indirect table")
            if d_len:
                if d_addr + d_len > U64_LIMIT:
                    raise self._break(
                        f"{chain}: {at} range 0x{d_addr:x} +{d_len} overflows "
                        "64 bits"
                    )
                try:
                    views = self.memory.views(d_addr, d_len)
                except GuestMemoryError as exc:
                    raise self._break(
                        f"{chain}: {at} points outside guest memory: "
                        f"0x{d_addr:x} +{d_len}"
                    ) from exc
                if d_flags & _WRITE:
                    writable += views
                    wlen += d_len
                    continue
                readable += views
                rlen += d_len
            elif d_flags & _WRITE:
                continue
            if writable:
                raise self._break(f"{chain}: {at} is readable but follows a "
                                  "writable descriptor")
        return rlen, wlen

    # ---- returning used buffers ---------------------------------------------------------

    def _take(self, chain: DescriptorChain | int, written: int) -> int:
        if isinstance(chain, DescriptorChain):
            buf_id = chain.head
            if written > chain.writable_len:
                raise QueueUsageError(
                    f"{self.name}: used length {written} for buffer {buf_id} exceeds its "
                    f"{chain.writable_len} writable bytes"
                )
        else:
            buf_id = chain
        if written < 0:
            raise QueueUsageError(f"{self.name}: negative used length {written}")
        if not 0 <= buf_id < self.size or not self._ndescs[buf_id] \
                or buf_id not in self._popped:
            raise QueueUsageError(f"{self.name}: buffer {buf_id} is not in flight")
        if written > self._capacity[buf_id]:
            raise QueueUsageError(
                f"{self.name}: used length {written} for buffer {buf_id} exceeds its "
                f"{self._capacity[buf_id]} writable bytes"
            )
        del self._popped[buf_id]
        return buf_id

    def _write_used(self, buf_id: int, written: int, ndescs: int, publish: bool = True
                    ) -> tuple[int, int]:
        """Write a used descriptor at the used position and move past the buffer. With
        ``publish`` False the flags that make it visible are not stored: returned as
        ``(offset, flags)`` for the caller to store last."""
        pos = self._used_pos
        off = 16 * pos
        self._len_id.pack_into(self._desc, off + 8, written, buf_id)
        flags = (_AVAIL_USED if self._used_wrap else 0) | (_WRITE if written else 0)
        # len and id are stored before the flags that publish them (stores stay ordered).
        if publish:
            self._u16.pack_into(self._desc, off + 14, flags)
        pos += ndescs
        if pos >= self.size:
            pos -= self.size
            self._used_wrap ^= 1
        self._used_pos = pos
        self._used_total += ndescs
        return off + 14, flags

    def _complete(self, buf_id: int, written: int, publish: bool = True
                  ) -> tuple[int, int] | None:
        """Use ``buf_id`` (IN_ORDER: record its completion). Without ``publish``, returns
        the deferred flags store of its used descriptor (see :meth:`_write_used`)."""
        order = self._order
        if order is None:
            ndescs = self._ndescs[buf_id]
            self._ndescs[buf_id] = 0
            return self._write_used(buf_id, written, ndescs, publish)
        order.complete(buf_id, written)
        return None

    def _publish_in_order(self) -> None:
        """IN_ORDER: write each run now complete in pop order as one used descriptor."""
        order = self._order
        assert order is not None
        # Ids stay in flight (for pop's reuse check) until their run is published.
        first: tuple[int, int] | None = None
        for keys, weight, last_written in order.batches():
            for key in keys:
                self._ndescs[key] = 0
            deferred = self._write_used(keys[-1], last_written, weight, first is not None)
            if first is None:
                first = deferred
        if first is not None:
            self._u16.pack_into(self._desc, first[0], first[1])

    def push(self, chain: DescriptorChain | int, written: int) -> None:
        """Return a buffer to the driver with the number of bytes written into it."""
        if self.broken is not None:
            raise RingError(self.broken)
        self._complete(self._take(chain, written), written)
        if self._order is not None:
            self._publish_in_order()

    def push_many(self, completions: Iterable[tuple[DescriptorChain | int, int]]) -> int:
        """Return several buffers; returns how many. With IN_ORDER, a run of completely
        filled buffers is published as one used descriptor."""
        if self.broken is not None:
            raise RingError(self.broken)
        # The batch becomes visible at once: every used descriptor is written, then the
        # flags of the first (the driver reads nothing past an unpublished one). A back-end
        # that dies mid-batch has then published all or nothing, which is what the packed
        # inflight region's recovery relies on (transport/vhost_user/inflight.py).
        n = 0
        first: tuple[int, int] | None = None
        for chain, written in completions:
            deferred = self._complete(self._take(chain, written), written, n != 0)
            if n == 0:
                first = deferred
            n += 1
        if first is not None:
            self._u16.pack_into(self._desc, first[0], first[1])
        if self._order is not None:
            self._publish_in_order()  # one pass: runs span the whole call
        return n

    def forge_used(self, buf_id: int, written: int, *, skip: int = 0,
                   wrong_wrap: bool = False, retire: bool = False) -> None:
        """Hostile-device testing only (:mod:`pyvirtio.device.chaos`): write the used
        descriptor ``(buf_id, written)`` unchecked at the used position, its flags carrying
        the opposite wrap counter if ``wrong_wrap``, and move past it (the descriptors of
        ``buf_id`` if ``retire`` and it is in flight, which the device then stops
        tracking; one otherwise). ``skip`` is for the split ring (a packed ring has no used
        index to jump)."""
        if self.broken is not None:
            raise RingError(self.broken)
        ndescs = 1
        if retire and 0 <= buf_id < self.size and self._ndescs[buf_id]:
            ndescs = self._ndescs[buf_id]
            self._ndescs[buf_id] = 0
            self._popped.pop(buf_id, None)
        off, flags = self._write_used(buf_id & 0xFFFF, written & 0xFFFFFFFF, ndescs,
                                      publish=False)
        if wrong_wrap:
            flags ^= _AVAIL_USED
        self._u16.pack_into(self._desc, off, flags)

    def in_flight(self) -> list[int]:
        """Buffer ids popped and not yet pushed."""
        return sorted(self._popped)

    def slot_flags(self, pos: int) -> int:
        """The flags of ring slot ``pos`` as they are in memory now."""
        if not 0 <= pos < self.size:
            raise QueueUsageError(f"{self.name}: slot {pos} is beyond the ring size {self.size}")
        flags: int = self._u16.unpack_from(self._desc, 16 * pos + 14)[0]
        return flags

    def descriptors(self, buf_id: int) -> list[tuple[int, int, int, int]]:
        """The ring descriptors ``(addr, len, id, flags)`` of in-flight buffer ``buf_id``, as
        in the ring now (read right after :meth:`pop`, what was popped): what a request
        tracker saves outside the ring so that the buffer can be resubmitted after a crash
        (:meth:`restore`)."""
        ndescs = self._ndescs[buf_id] if 0 <= buf_id < self.size else 0
        if not ndescs or buf_id not in self._popped:
            raise QueueUsageError(f"{self.name}: buffer {buf_id} is not in flight")
        pos = self._start[buf_id]
        unpack = self._desc_struct.unpack_from
        out = []
        for _ in range(ndescs):
            out.append(unpack(self._desc, 16 * pos))
            pos += 1
            if pos == self.size:
                pos = 0
        return out

    def restore(self, used_idx: int,
                buffers: Sequence[tuple[int, Sequence[tuple[int, int, int, int]]]]) -> None:
        """Start where a back-end that died left the ring: its used position ``used_idx``
        (``position | wrap << 15``) and the buffers it had popped and not used, each as
        ``(buffer id, its descriptors)`` saved outside the ring (:meth:`descriptors`), in
        pop order. The avail position follows: the buffers occupied the ring right after the
        used position (whatever order they complete in, each used descriptor moves the used
        position by its buffer's descriptor count). :meth:`resume` then takes them.

        The buffers come from shared memory: ids beyond the ring or given twice, or more
        descriptors than the ring holds, break the queue (:class:`RingError`)."""
        if self.broken is not None:
            raise RingError(self.broken)
        if self._popped or self._saved:
            raise QueueUsageError(f"{self.name}: restore() on a queue already in use")
        self.used_idx = used_idx
        total = 0
        saved: dict[int, list[tuple[int, int, int, int]]] = {}
        for buf_id, descs in buffers:
            if not 0 <= buf_id < self.size:
                raise self._break(f"resubmitted buffer id {buf_id} is beyond the queue size "
                                  f"{self.size}")
            if buf_id in saved:
                raise self._break(f"buffer id {buf_id} is resubmitted twice")
            if not descs:
                raise self._break(f"resubmitted buffer {buf_id} has no descriptors")
            total += len(descs)
            if total > self.size:
                raise self._break(f"resubmitted buffers occupy {total} descriptors, more than "
                                  f"the ring's {self.size} (at buffer {buf_id})")
            saved[buf_id] = list(descs)
        pos = self._used_pos + total
        wrap = self._used_wrap
        if pos >= self.size:
            pos -= self.size
            wrap ^= 1
        self._avail_pos, self._avail_wrap = pos, wrap
        self._saved = saved

    def resume(self, head: int) -> DescriptorChain:
        """The queue interface's resubmission after a back-end restart: buffer ``head``, one
        of those given to :meth:`restore`, popped again from its saved descriptors (a packed
        buffer id names no ring slot, and its slots may hold used descriptors by now). The
        descriptors are checked like the ring's; a bad one breaks the queue."""
        if self.broken is not None:
            raise RingError(self.broken)
        descs = self._saved.pop(head, None)
        if descs is None:
            raise QueueUsageError(f"{self.name}: buffer {head} was not saved for resubmission "
                                  "(restore())")
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        label = f"resubmitted buffer {head}"
        last = len(descs) - 1
        for i, (addr, length, _, flags) in enumerate(descs):
            where = f"saved descriptor {i} of buffer {head}"
            if bool(flags & _NEXT) != (i < last):
                raise self._break(f"{label}: {where} has flags 0x{flags:04x}: "
                                  f"NEXT must be set on all but the last of {len(descs)}")
            rl, wl = self._segment(label, where, i + 1, addr, length, flags, readable,
                                   writable)
            rlen += rl
            wlen += wl
        buf_id = descs[-1][2]
        if buf_id != head:
            raise self._break(f"{label}: its last saved descriptor carries "
                              f"buffer id {buf_id}, not {head}")
        chain = DescriptorChain(head, readable, writable, rlen, wlen)
        self._ndescs[head] = len(descs)
        self._capacity[head] = wlen
        self._popped[head] = chain
        if self._order is not None:
            self._order.popped(head, len(descs), wlen)
        return chain

    def pop_short(self, limit: int = 0xFFFF) -> list[ShortChain]:
        """Batch pop: the next available buffers that are *short*, as plain tuples (see
        :meth:`pyvirtio.ring.split.DeviceQueue.pop_short`): three descriptors, in the ring
        (not across its end) or as an indirect table of three, readable, then readable or
        writable, then writable, none empty, all inside one guest memory region. Stops at
        ``limit`` or at the first buffer that is not short, leaving it for :meth:`pop`,
        which gives every verdict (this method never breaks the queue)."""
        out: list[ShortChain] = []
        if self.broken is not None or self._order is not None:
            return out  # broken, or IN_ORDER's bookkeeping: every buffer goes through pop()
        ring = self._desc
        unpack = self._desc_struct.unpack_from
        size = self.size
        ndescs = self._ndescs
        room = size - self._descs_in_flight()
        pos, wrap = self._avail_pos, self._avail_wrap
        hb, he, hbuf = self._hot_span()
        indirect = self.indirect
        append = out.append
        flags_at = self._u16.unpack_from
        while len(out) < limit:
            mark = _AVAIL if wrap else _USED  # this lap's available marking
            # The flags first, the descriptor after them: the driver stores the head's
            # flags last, so a descriptor read in one go with its flags may be older than
            # the flags that say it is available.
            if flags_at(ring, 16 * pos + 14)[0] & _AVAIL_USED != mark:
                break
            a0, l0, buf_id, f0 = unpack(ring, 16 * pos)
            if f0 & _AVAIL_USED != mark:
                break
            f0 ^= mark
            if f0 == _INDIRECT:
                if not indirect or l0 != 48 or room < 1:
                    break
                if not hb <= a0 <= he - 48:
                    span = self._find(a0, 48)
                    if span is None:
                        break
                    hb, he, hbuf = span
                t = a0 - hb
                a0, l0, _, f0 = unpack(hbuf, t)
                a1, l1, _, f1 = unpack(hbuf, t + 16)
                a2, l2, _, f2 = unpack(hbuf, t + 32)
                used = 1
            elif f0 == _NEXT and pos + 2 < size and room >= 3:
                a1, l1, _, f1 = unpack(ring, 16 * pos + 16)
                a2, l2, buf_id, f2 = unpack(ring, 16 * pos + 32)
                if f1 & _AVAIL_USED != mark or f2 & _AVAIL_USED != mark:
                    break
                f0, f1, f2 = 0, f1 ^ mark ^ _NEXT, f2 ^ mark
                used = 3
            else:
                break
            if (f0 or f2 != _WRITE or (f1 != _WRITE and f1) or not (l0 and l1 and l2)
                    or buf_id >= size or ndescs[buf_id]):
                break
            if not hb <= a0 <= he - l0:
                span = self._find(a0, l0)
                if span is None:
                    break
                hb, he, hbuf = span
            if not (hb <= a1 and a1 + l1 <= he and hb <= a2 and a2 + l2 <= he):
                break
            tup = (buf_id, hbuf, a0 - hb, l0, a1 - hb, l1, f1 == _WRITE, a2 - hb, l2)
            ndescs[buf_id] = used
            self._start[buf_id] = pos
            self._capacity[buf_id] = l2 + (l1 if f1 else 0)
            self._popped[buf_id] = tup
            append(tup)
            room -= used
            pos += used
            if pos >= size:
                pos -= size
                wrap ^= 1
        self._hot = (hb, he, hbuf)
        if out:
            self._avail_pos, self._avail_wrap = pos, wrap
            if self.event_idx and self._kicks_enabled:
                self._evt.pack_into(self._device_evt, 0, encode(pos, wrap), _DESC)
        return out

    def pop_writable(self, need: int) -> list[WritableBuffer]:
        """Batch pop, all or nothing, of the next buffers that are each one device-writable
        descriptor (not empty, in one guest memory region), just enough of them for
        ``need`` bytes (see :meth:`pyvirtio.ring.split.DeviceQueue.pop_writable`); pops
        nothing if the buffers before the first other one hold less."""
        out: list[WritableBuffer] = []
        if self.broken is not None or self._order is not None:
            return out
        ring = self._desc
        unpack = self._desc_struct.unpack_from
        flags_at = self._u16.unpack_from
        size = self.size
        ndescs = self._ndescs
        room = size - self._descs_in_flight()
        pos, wrap = self._avail_pos, self._avail_wrap
        hb, he, hbuf = self._hot_span()
        starts = []
        while need > 0 and room > 0:
            mark = _AVAIL if wrap else _USED
            if flags_at(ring, 16 * pos + 14)[0] & _AVAIL_USED != mark:
                break  # (the flags first: see pop_short)
            addr, length, buf_id, flags = unpack(ring, 16 * pos)
            if flags ^ mark != _WRITE or not length or buf_id >= size or ndescs[buf_id]:
                break
            if not hb <= addr <= he - length:
                span = self._find(addr, length)
                if span is None:
                    break
                hb, he, hbuf = span
            ndescs[buf_id] = 1  # in flight now: a buffer id listed twice stops the batch
            out.append((buf_id, hbuf, addr - hb, length))
            starts.append(pos)
            need -= length
            room -= 1
            pos += 1
            if pos == size:
                pos, wrap = 0, wrap ^ 1
        self._hot = (hb, he, hbuf)
        if need > 0:
            for buf_id, *_ in out:  # too few: nothing consumed
                ndescs[buf_id] = 0
            return []
        for tup, start in zip(out, starts, strict=True):
            buf_id = tup[0]
            self._start[buf_id] = start
            self._capacity[buf_id] = tup[3]
            self._popped[buf_id] = tup
        self._avail_pos, self._avail_wrap = pos, wrap
        if self.event_idx and self._kicks_enabled:
            self._evt.pack_into(self._device_evt, 0, encode(pos, wrap), _DESC)
        return out

    def chain(self, head: int) -> DescriptorChain:
        """The chain of an in-flight buffer id, as :meth:`pop` returned it (or built from
        what :meth:`pop_short` handed out: the ring itself may already hold used
        descriptors where the buffer's were)."""
        found = self._popped.get(head)
        if found is None:
            raise QueueUsageError(f"{self.name}: buffer {head} is not in flight")
        if isinstance(found, DescriptorChain):
            return found
        if len(found) == 4:  # from pop_writable
            _, buf, off, length = found
            chain = DescriptorChain(head, [], [buf[off : off + length]], 0, length)
            self._popped[head] = chain
            return chain
        _, buf, o0, l0, o1, l1, w1, o2, l2 = found
        middle = [buf[o1 : o1 + l1]]
        chain = DescriptorChain(head, [buf[o0 : o0 + l0], *([] if w1 else middle)],
                                [*(middle if w1 else []), buf[o2 : o2 + l2]],
                                l0 + (0 if w1 else l1), l2 + (l1 if w1 else 0))
        self._popped[head] = chain
        return chain

    def fail(self, reason: str) -> RingError:
        """Mark the queue broken (the device refused a request); returns the error."""
        return self._break(reason)

    def rewind(self, count: int) -> None:
        """Un-pop the last ``count`` buffers (they are offered again by the next pops).

        Only valid for buffers not yet pushed; used when a back-end must give up mid-batch.
        """
        if count > len(self._popped):
            raise QueueUsageError(f"{self.name}: cannot rewind {count} buffers, "
                                  f"{len(self._popped)} in flight")
        pos, wrap = self._avail_pos, self._avail_wrap
        for _ in range(count):
            buf_id, _ = self._popped.popitem()
            pos -= self._ndescs[buf_id]
            if pos < 0:
                pos += self.size
                wrap ^= 1
            self._ndescs[buf_id] = 0
            if self._order is not None:
                self._order.unpop(buf_id)
        self._avail_pos, self._avail_wrap = pos, wrap

    # ---- notification suppression -------------------------------------------------------

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call.

        Reads the driver's event suppression: DISABLE never, ENABLE always, DESC (with
        EVENT_IDX) iff the used position passed the one it names.
        """
        new = self._used_total
        old = self._signalled_total
        if new == old:
            return False
        valid = self._signalled_valid
        self._signalled_total = new
        self._signalled_valid = True
        full_barrier()  # our used descriptors must be visible before we read the event
        off_wrap, flags = self._evt.unpack_from(self._driver_evt, 0)
        if flags == _DISABLE:
            return False
        if flags != _DESC or not self.event_idx:
            return True
        if not valid:
            return True  # no reference point yet (fresh or restored queue): be safe
        modulus = 2 * self.size
        if new - old >= modulus:
            return True
        pos, wrap = decode(off_wrap)
        event = pos + (0 if wrap else self.size)
        now = self._used_pos + (0 if self._used_wrap else self.size)
        return _crossed(event, now, now - (new - old), modulus)

    def disable_notifications(self) -> None:
        """Tell the driver not to kick (we are polling)."""
        self._kicks_enabled = False
        self._evt.pack_into(self._device_evt, 0, encode(self._avail_pos, self._avail_wrap),
                            _DISABLE)

    def enable_notifications(self) -> bool:
        """Ask for kicks again. Returns True if a buffer arrived meanwhile (the caller must
        pop again instead of sleeping)."""
        self._kicks_enabled = True
        self._evt.pack_into(self._device_evt, 0, encode(self._avail_pos, self._avail_wrap),
                            _DESC if self.event_idx else _ENABLE)
        full_barrier()
        return self._is_avail(self._avail_pos, self._avail_wrap)

    @property
    def driver_event(self) -> tuple[int, int]:
        """The driver's event suppression as it is in memory: (off_wrap, flags)."""
        off_wrap, flags = self._evt.unpack_from(self._driver_evt, 0)
        return off_wrap, flags


class _InFlight:
    __slots__ = ("in_capacity", "indirect_addr", "ndescs", "token")

    def __init__(self, token: object, ndescs: int, in_capacity: int,
                 indirect_addr: int | None) -> None:
        self.token = token
        self.ndescs = ndescs
        self.in_capacity = in_capacity
        self.indirect_addr = indirect_addr


class PackedDriverQueue(_PackedRing):
    """The driver side of a packed virtqueue (the paper's virtqueue ops, as on split).

    Buffers are scatter-gather lists of ``(guest_physical_address, length)`` pairs. What
    the driver has in flight (ids, descriptor counts, capacities) lives here in Python and
    is never re-read from shared memory, so a device scribbling over the ring cannot
    confuse it. ``allocator`` (needed for indirect descriptors) hands out guest memory for
    indirect tables. ``start_idx`` (``position | wrap << 15``) starts the ring elsewhere
    than a fresh one (position 0, wrap counter 1), e.g. to cross a wrap quickly in tests;
    start the device at the same value.
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
        start_idx: int = FRESH,
    ) -> None:
        if indirect and allocator is None:
            raise QueueUsageError("indirect descriptors need an allocator for their tables")
        super().__init__(memory, size, desc_addr, avail_addr, used_addr, event_idx, indirect,
                         in_order, endian, name)
        self.allocator = allocator
        pos, wrap = decode(start_idx)
        if pos >= size:
            raise QueueUsageError(f"start position {pos} is beyond the ring size {size}")
        # Nothing may look available to the device or used to the driver: slots the lap
        # starting at ``pos`` reaches with wrap counter W read "used in the lap before"
        # (AVAIL = USED = not W); slots before ``pos``, reached with not W, the same for
        # their lap. A fresh ring (0, 1) is all zeroes.
        self._desc[:] = bytes(len(self._desc))
        for p in range(size):
            self._u16.pack_into(self._desc, 16 * p + 14,
                                (_AVAIL_USED if not wrap else 0) if p >= pos
                                else (_AVAIL_USED if wrap else 0))
        self._evt.pack_into(self._driver_evt, 0, start_idx, _ENABLE)
        self._evt.pack_into(self._device_evt, 0, start_idx, _ENABLE)
        self._avail_pos, self._avail_wrap = pos, wrap  # next position to make available
        self._used_pos, self._used_wrap = pos, wrap  # next position to look for a used one
        self._free_ids: list[int] = list(range(size - 1, -1, -1))  # pop() gives 0 first
        self._inflight: list[_InFlight | None] = [None] * size
        self._order: deque[int] = deque()  # ids in the order they were made available
        # The rest of an in-order batch: (token, written, entry), each freed when returned.
        self._ready: deque[tuple[object, int, _InFlight]] = deque()
        self._num_free = size
        self._added_total = 0  # descriptors made available since start
        self._kicked_total = 0  # ... as of the last kick_prepare
        self._event_flags = _ENABLE  # shadow of the driver's event suppression flags

    def __repr__(self) -> str:
        return (f"PackedDriverQueue({self.name}, size={self.size}, free={self._num_free}, "
                f"avail=0x{self.avail_idx:04x}, last_used=0x{self.last_used_idx:04x})")

    @property
    def avail_idx(self) -> int:
        """The next position to make available, ``position | wrap << 15``."""
        return encode(self._avail_pos, self._avail_wrap)

    @property
    def last_used_idx(self) -> int:
        """The next position where a used descriptor is expected."""
        return encode(self._used_pos, self._used_wrap)

    @property
    def num_free(self) -> int:
        """Free descriptors in the ring."""
        return self._num_free

    @property
    def in_flight(self) -> int:
        """Buffers added and not yet returned by get_buf."""
        return self.size - len(self._free_ids) + len(self._ready)  # ready ids are free

    # ---- add ----------------------------------------------------------------------------

    def add_buf(
        self,
        out_sgs: Sequence[tuple[int, int]],
        in_sgs: Sequence[tuple[int, int]],
        token: object,
    ) -> int:
        """Expose a buffer: ``out_sgs`` the device reads, ``in_sgs`` it writes.

        ``token`` comes back from :meth:`get_buf` when the device is done. Returns the
        buffer id. Raises :class:`QueueFullError` without side effects if there is no room.
        """
        if self.broken is not None:
            raise RingError(self.broken)
        if token is None:
            raise QueueUsageError("token must not be None (None means 'nothing used')")
        total = len(out_sgs) + len(in_sgs)
        if total == 0:
            raise QueueUsageError("a buffer needs at least one scatter-gather entry")
        in_capacity = 0
        for _, length in in_sgs:
            in_capacity += length
        use_table = self.indirect and total > 1 and self.allocator is not None
        ndescs = 1 if use_table else total
        if self._num_free < ndescs or not self._free_ids:
            raise QueueFullError(
                f"{self.name}: {ndescs} descriptors needed, {self._num_free} free"
            )
        buf_id = self._free_ids.pop()
        pack = self._desc_struct.pack_into
        ring = self._desc
        indirect_addr: int | None = None
        head_pos, head_wrap = self._avail_pos, self._avail_wrap
        if use_table:
            assert self.allocator is not None
            indirect_addr = self.allocator.alloc(16 * total, 16)
            table = self.memory.view(indirect_addr, 16 * total)
            i = 0
            for addr, length in out_sgs:
                pack(table, 16 * i, addr, length, 0, 0)
                i += 1
            for addr, length in in_sgs:
                pack(table, 16 * i, addr, length, 0, _WRITE)
                i += 1
            pack(ring, 16 * head_pos, indirect_addr, 16 * total, buf_id, 0)
            head_flags = _INDIRECT
            pos, wrap = head_pos + 1, head_wrap
            if pos == self.size:
                pos, wrap = 0, wrap ^ 1
        else:
            # Everything but the head's flags first; the head's flags publish the chain.
            head_flags = 0
            pos, wrap = head_pos, head_wrap
            i = 0
            for sgs, kind in ((out_sgs, 0), (in_sgs, _WRITE)):
                for addr, length in sgs:
                    flags = kind | (_NEXT if i + 1 < total else 0)
                    if i == 0:
                        head_flags = flags
                        pack(ring, 16 * pos, addr, length, buf_id, 0)
                    else:
                        pack(ring, 16 * pos, addr, length, buf_id,
                             flags | (_AVAIL if wrap else _USED))
                    i += 1
                    pos += 1
                    if pos == self.size:
                        pos, wrap = 0, wrap ^ 1
        self._u16.pack_into(ring, 16 * head_pos + 14,
                            head_flags | (_AVAIL if head_wrap else _USED))
        self._avail_pos, self._avail_wrap = pos, wrap
        self._inflight[buf_id] = _InFlight(token, ndescs, in_capacity, indirect_addr)
        if self.in_order:
            self._order.append(buf_id)
        self._num_free -= ndescs
        self._added_total += ndescs
        return buf_id

    def kick_prepare(self) -> bool:
        """Whether the device must be notified about buffers added since the last call:
        the device's event suppression says ENABLE, or DESC (with EVENT_IDX) naming a
        position among those just made available."""
        full_barrier()  # our descriptors must be visible before we read the device's event
        new, old = self._added_total, self._kicked_total
        self._kicked_total = new
        off_wrap, flags = self._evt.unpack_from(self._device_evt, 0)
        if flags != _DESC or not self.event_idx:
            return flags != _DISABLE
        if new == old:
            return False
        modulus = 2 * self.size
        if new - old >= modulus:
            return True
        pos, wrap = decode(off_wrap)
        event = pos + (0 if wrap else self.size)
        now = self._avail_pos + (0 if self._avail_wrap else self.size)
        return _crossed(event, now, now - (new - old), modulus)

    # ---- collect used -------------------------------------------------------------------

    def _used_at(self, pos: int, wrap: int) -> bool:
        flags: int = self._u16.unpack_from(self._desc, 16 * pos + 14)[0]
        return bool(flags & _AVAIL) == bool(wrap) and bool(flags & _USED) == bool(wrap)

    def has_used(self) -> bool:
        """Whether get_buf would return something (virtqueue_poll), or raise: a used
        descriptor with the wrong wrap counter is news too."""
        pos, wrap = self._used_pos, self._used_wrap
        return (bool(self._ready) or self._used_at(pos, wrap)
                or self._wrong_wrap(self._u16.unpack_from(self._desc, 16 * pos + 14)[0], wrap))

    def _wrong_wrap(self, flags: int, wrap: int) -> bool:
        """Whether ``flags``, read at the used position, mark a descriptor used with the
        other wrap counter. While buffers are in flight the slot at the used position is one
        we made available in this lap (AVAIL = wrap, USED = not wrap): a device can only
        write it used (both = wrap); both = not wrap is a lap it never was in."""
        return (self._num_free < self.size
                and flags & _AVAIL_USED == (0 if wrap else _AVAIL_USED))

    def get_buf(self) -> tuple[object, int] | None:
        """The next used buffer as ``(token, bytes_written)``, or None.

        Buffers may come back in any order (with IN_ORDER, one used descriptor may return a
        run of them: all but the last count as completely written). Raises
        :class:`RingError` if the device returns an id that is not in flight or claims
        more bytes than the buffer could hold.
        """
        if self.broken is not None:
            raise RingError(self.broken)
        if self._ready:
            return self._collect(*self._ready.popleft())
        pos, wrap = self._used_pos, self._used_wrap
        flags = self._u16.unpack_from(self._desc, 16 * pos + 14)[0]
        if bool(flags & _AVAIL) != bool(wrap) or bool(flags & _USED) != bool(wrap):
            if self._wrong_wrap(flags, wrap):
                raise self._break(
                    f"used descriptor at slot {pos} (0x{self._slot_addr(pos):x}) has flags "
                    f"0x{flags:04x}: marked used with the wrong wrap counter ({wrap ^ 1}, the "
                    f"driver's is {wrap}) while buffers are in flight"
                )
            return None
        written, buf_id = self._len_id.unpack_from(self._desc, 16 * pos + 8)
        where = f"used slot {pos} (0x{self._slot_addr(pos):x})"
        entry = self._inflight[buf_id] if buf_id < self.size else None
        if entry is None:
            raise self._break(f"device returned id {buf_id} in {where}, which is not an "
                              "in-flight buffer")
        if not flags & _WRITE and not entry.in_capacity:
            # The spec reserves the length of a used descriptor without WRITE. Devices
            # write the length without setting WRITE (QEMU 7.2 never sets it; Linux's
            # driver reads the length whatever the flag): it counts when the buffer has
            # writable bytes, and is still checked against them below.
            written = 0
        if written > entry.in_capacity:
            raise self._break(
                f"device claims {written} bytes written into buffer {buf_id} ({where}), "
                f"which has only {entry.in_capacity} writable bytes"
            )
        if self.in_order:
            batch: list[int] = []
            for b in self._order:
                batch.append(b)
                if b == buf_id:
                    break
            for _ in batch:
                self._order.popleft()
        else:
            batch = [buf_id]
        if len(batch) == 1:
            self._inflight[buf_id] = None
            ndescs = entry.ndescs
            result = self._collect(entry.token, written, entry)
        else:
            ndescs = 0
            for b in batch:
                e = self._inflight[b]
                assert e is not None
                self._inflight[b] = None
                ndescs += e.ndescs
                # All but the last were used completely (§2.8.8).
                self._ready.append((e.token, written if b == buf_id else e.in_capacity, e))
            result = self._collect(*self._ready.popleft())
        self._free_ids.extend(batch)
        pos += ndescs
        if pos >= self.size:
            pos -= self.size
            wrap ^= 1
        self._used_pos, self._used_wrap = pos, wrap
        if self.event_idx and self._event_flags == _DESC:
            # Interrupt us when the next one is used (Linux does the same).
            self._u16.pack_into(self._driver_evt, 0, encode(pos, wrap))
        return result

    def _collect(self, token: object, written: int, entry: _InFlight) -> tuple[object, int]:
        """Give a returned buffer's descriptors (and indirect table) back."""
        self._num_free += entry.ndescs
        if entry.indirect_addr is not None and self.allocator is not None:
            self.allocator.free(entry.indirect_addr)
        return token, written

    def detach_unused(self) -> list[object]:
        """After a device reset: take back every buffer still in flight, returning tokens."""
        tokens = [self._collect(*r)[0] for r in self._ready]
        self._ready.clear()
        self._order.clear()
        for buf_id, entry in enumerate(self._inflight):
            if entry is not None:
                tokens.append(entry.token)
                self._inflight[buf_id] = None
                self._free_ids.append(buf_id)
                self._collect(entry.token, 0, entry)
        return tokens

    # ---- interrupt suppression (the paper's callback control) ---------------------------

    def _set_event(self, flags: int, pos: int | None = None, wrap: int = 0) -> None:
        if pos is not None:
            self._u16.pack_into(self._driver_evt, 0, encode(pos, wrap))
        if flags != self._event_flags:
            self._event_flags = flags
            self._u16.pack_into(self._driver_evt, 2, flags)

    def disable_cb(self) -> None:
        """Ask the device not to interrupt (we will poll)."""
        self._set_event(_DISABLE)

    def enable_cb_prepare(self) -> int:
        """Re-enable interrupts; returns the opaque position to pass to :meth:`poll`."""
        pos, wrap = self._used_pos, self._used_wrap
        if self.event_idx:
            self._set_event(_DESC, pos, wrap)  # off_wrap before the flags
        else:
            self._set_event(_ENABLE)
        return encode(pos, wrap)

    def poll(self, last_used_idx: int) -> bool:
        """Whether a buffer was used at the position :meth:`enable_cb_prepare` returned."""
        full_barrier()
        pos, wrap = decode(last_used_idx)
        return self._used_at(pos, wrap)

    def enable_cb(self) -> bool:
        """Re-enable interrupts. Returns False if buffers were used in the meantime (the
        paper's §3.1 race): the caller must call get_buf again rather than wait."""
        opaque = self.enable_cb_prepare()
        return not self._ready and not self.poll(opaque)

    def enable_cb_delayed(self) -> bool:
        """Re-enable interrupts but ask for one only after ~3/4 of the descriptors in
        flight are used (transmit completion batching). Returns False if that many already
        are."""
        pos, wrap = self._used_pos, self._used_wrap
        bufs = (self.size - self._num_free) * 3 // 4
        event = pos + bufs
        ewrap = wrap
        if event >= self.size:
            event -= self.size
            ewrap ^= 1
        if self.event_idx:
            self._set_event(_DESC, event, ewrap)
        else:
            self._set_event(_ENABLE)
        full_barrier()
        if self._ready:
            return False
        return self._used_descs_ahead(bufs + 1) <= bufs

    def _used_descs_ahead(self, limit: int) -> int:
        """How many ring descriptors the used descriptors waiting from our position cover
        (counting stops once ``limit`` is reached, or at anything not in flight: get_buf
        will judge that)."""
        pos, wrap = self._used_pos, self._used_wrap
        covered = 0
        order = list(self._order) if self.in_order else []
        k = 0
        seen: set[int] = set()
        while covered < limit and self._used_at(pos, wrap):
            buf_id = self._u16.unpack_from(self._desc, 16 * pos + 12)[0]
            entry = self._inflight[buf_id] if buf_id < self.size else None
            if entry is None or buf_id in seen:
                break
            seen.add(buf_id)
            if self.in_order:
                try:
                    end = order.index(buf_id, k)
                except ValueError:
                    break
                n = 0
                for b in order[k:end + 1]:
                    e = self._inflight[b]
                    n += e.ndescs if e is not None else 0
                k = end + 1
            else:
                n = entry.ndescs
            covered += n
            pos += n
            if pos >= self.size:
                pos -= self.size
                wrap ^= 1
        return covered
