"""Inflight I/O tracking (vhost-user ``INFLIGHT_SHMFD``) for split and packed rings, sans-I/O.

Why: a back-end that dies (SIGKILL, crash) takes with it the knowledge of which requests it
had popped from the avail ring but not yet returned. QEMU's ``vhost-user-blk`` front-end,
started with ``-chardev socket,...,reconnect=N``, reconnects to a restarted back-end and
restarts the rings, but it cannot say what was in flight. With ``INFLIGHT_SHMFD`` the
back-end keeps that record in shared memory the *front-end* owns: ``GET_INFLIGHT_FD`` asks
the back-end for a zeroed region (a memfd), ``SET_INFLIGHT_FD`` hands it (back) to the
back-end, also after a reconnection. The restarted back-end reads it, resubmits what was in
flight, and resumes the avail ring where its predecessor really stopped.

The layouts are the ones QEMU's ``docs/interop/vhost-user.rst`` ("Inflight I/O tracking")
describes, so a region is portable between back-end implementations. For split rings, one
region per queue, each :func:`queue_region_size` bytes (64-byte aligned), in queue order::

    u64 features   u16 version (1; 0 = never used)   u16 desc_num (the queue size)
    u16 last_batch_head   u16 used_idx (used->idx as of the last completed batch)
    desc[desc_num]: u8 inflight, 5 bytes padding, u16 next, u64 counter

What the back-end does (:class:`QueueInflight`), per the document:

* pop head ``i``: ``desc[i].counter`` = a running counter, then ``desc[i].inflight`` = 1;
* complete a batch: link the heads into the "last batch" list (``desc[i].next`` =
  ``last_batch_head``, ``last_batch_head`` = ``i``), store used->idx, clear the heads'
  ``inflight``, then ``used_idx`` = used->idx;
* on start (:meth:`QueueInflight.recover`): if ``used_idx`` differs from the ring's
  used->idx the back-end died between storing used->idx and finishing the batch: the
  difference is the batch size, and that many heads of the last-batch list are cleared.
  What is still marked in flight is resubmitted, oldest counter first, and the ring's
  ``last_avail_idx`` is used->idx plus their number (every avail entry before that was
  popped: either completed, or in flight).

The region is shared with the front-end, so everything read from it is checked like ring
memory: head indices beyond the queue size are ignored with a problem recorded, the batch
walk is bounded, and the chains of resubmitted heads are read by the ring itself
(:meth:`~pyvirtio.ring.split.DeviceQueue.resume`), which breaks the queue on a bad one.

Packed rings (:class:`PackedQueueInflight`) keep a copy of every popped descriptor (a buffer
id names no ring slot, and the slots are overwritten by used descriptors) and the used
position with its wrap counter, committed per published batch; the packed ring publishes a
batch atomically (the first used descriptor's flags last), so a successor can tell from the
ring whether a half-recorded batch reached the driver. The restarted back-end takes the
ring's positions from the region, not from SET_VRING_BASE (QEMU 7.2 sends a fresh ring's
base after a reconnection: docs/peers.md). Rings with IN_ORDER are not tracked.

:class:`InflightExtension` is the :class:`BackendExtension` that adds the two requests for
any device: the serving engine reports every queue's heads
(:meth:`~pyvirtio.device.base.VirtioDevice.track_requests`, :mod:`pyvirtio.device.engine`).
It needs an ``allocate(size) -> fd`` function from the I/O layer for new regions
(:func:`pyvirtio.io.inflight.inflight_extensions` wires it).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence

from pyvirtio.device.base import VirtioDevice
from pyvirtio.errors import PeerError
from pyvirtio.memory import GuestMemoryError, Region
from pyvirtio.ring import DeviceRing, QueueUsageError, RingError
from pyvirtio.ring.packed import PackedDeviceQueue
from pyvirtio.spec import packed as P
from pyvirtio.spec import split as SP
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user.codec import Message, MessageError, RequestRule
from pyvirtio.transport.vhost_user.extension import BackendExtension, Handler

log = logging.getLogger("pyvirtio.vhost_user.inflight")

#: the region layout version this implementation writes and reads
VERSION = 1
ALIGNMENT = 64
#: per-queue header: features (u64), version, desc_num, last_batch_head, used_idx (u16)
QUEUE_HEADER = struct.Struct("=QHHHH")
#: per-descriptor state: inflight (u8), 5 bytes padding, next (u16), counter (u64)
DESC_STATE = struct.Struct("=B5xHQ")
_OFF_VERSION = 8
_OFF_DESC_NUM = 10
_OFF_LAST_BATCH_HEAD = 12
_OFF_USED_IDX = 14
_DESC_OFF_NEXT = 6
_DESC_OFF_COUNTER = 8
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region: header plus one state per descriptor, 64-byte aligned."""
    raw = QUEUE_HEADER.size + DESC_STATE.size * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def region_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole inflight region for ``num_queues`` queues of ``queue_size``: room
    for either layout (the front-end asks for it before it says whether the rings are split
    or packed), each queue's part :func:`queue_region_size` (split) or
    :func:`packed_queue_region_size` (packed) bytes, in queue order."""
    return num_queues * max(queue_region_size(queue_size),
                            packed_queue_region_size(queue_size))


class QueueInflight:
    """One queue's part of the region: records pops and completions, and recovers.

    ``view`` is the queue's :func:`queue_region_size` bytes of the shared region. Used as
    the device's request tracker (``popped``/``completing``/``completed``).
    """

    def __init__(self, view: memoryview, queue_size: int, name: str = "queue") -> None:
        if len(view) < queue_region_size(queue_size):
            raise ValueError(f"{name}: inflight region of {len(view)} bytes is too small for "
                             f"{queue_size} descriptors")
        self.view = view
        self.queue_size = queue_size
        self.name = name
        self.counter = 0
        self.problems: list[str] = []

    # ---- the header -------------------------------------------------------------------------

    @property
    def version(self) -> int:
        value: int = _U16.unpack_from(self.view, _OFF_VERSION)[0]
        return value

    @property
    def desc_num(self) -> int:
        value: int = _U16.unpack_from(self.view, _OFF_DESC_NUM)[0]
        return value

    @property
    def used_idx(self) -> int:
        value: int = _U16.unpack_from(self.view, _OFF_USED_IDX)[0]
        return value

    @property
    def last_batch_head(self) -> int:
        value: int = _U16.unpack_from(self.view, _OFF_LAST_BATCH_HEAD)[0]
        return value

    def _desc_off(self, head: int) -> int:
        return QUEUE_HEADER.size + DESC_STATE.size * head

    def in_flight(self) -> list[int]:
        """Heads marked in flight, oldest counter first."""
        view = self.view
        marked = []
        for head in range(self.queue_size):
            off = self._desc_off(head)
            if view[off]:
                marked.append((_U64.unpack_from(view, off + _DESC_OFF_COUNTER)[0], head))
        marked.sort()
        return [head for _, head in marked]

    # ---- RequestTracker ---------------------------------------------------------------------

    def popped(self, head: int) -> None:
        """Head ``head`` was taken from the avail ring: counter first, then the mark."""
        off = QUEUE_HEADER.size + 16 * head
        _U64.pack_into(self.view, off + _DESC_OFF_COUNTER, self.counter)
        self.counter += 1
        self.view[off] = 1

    def completing(self, heads: Sequence[int]) -> None:
        """Link ``heads`` into the last-batch list, before used->idx is stored."""
        view = self.view
        last = _U16.unpack_from(view, _OFF_LAST_BATCH_HEAD)[0]
        for head in heads:
            _U16.pack_into(view, QUEUE_HEADER.size + 16 * head + _DESC_OFF_NEXT, last)
            last = head
        _U16.pack_into(view, _OFF_LAST_BATCH_HEAD, last)

    def completed(self, heads: Sequence[int], used_idx: int) -> None:
        """used->idx is ``used_idx`` now: the heads are no longer in flight."""
        view = self.view
        base = QUEUE_HEADER.size
        for head in heads:
            view[base + 16 * head] = 0
        _U16.pack_into(view, _OFF_USED_IDX, used_idx)

    # ---- starting ---------------------------------------------------------------------------

    def initialise(self, used_idx: int) -> None:
        """A fresh region (or one for another ring size): nothing in flight."""
        view = self.view
        view[: queue_region_size(self.queue_size)] = bytes(queue_region_size(self.queue_size))
        QUEUE_HEADER.pack_into(view, 0, 0, VERSION, self.queue_size, 0, used_idx)
        self.counter = 0

    def recover(self, used_idx: int) -> list[int]:
        """Called when the ring (re)starts with the ring's used->idx: finish the interrupted
        batch, and return the heads still in flight, oldest first (to resubmit)."""
        version = self.version
        if version == 0:
            self.initialise(used_idx)
            return []
        if version != VERSION or self.desc_num != self.queue_size:
            self._problem(f"region has version {version} and {self.desc_num} descriptors, "
                          f"expected version {VERSION} and {self.queue_size}: starting afresh")
            self.initialise(used_idx)
            return []
        recorded = self.used_idx
        if recorded != used_idx:
            # Died between storing used->idx and clearing the batch's marks.
            batch = (used_idx - recorded) & 0xFFFF
            if batch > self.queue_size:
                self._problem(f"used->idx {used_idx} is {batch} entries past the recorded "
                              f"{recorded}, more than the queue size: marks left as they are")
            else:
                head = self.last_batch_head
                for _ in range(batch):
                    if head >= self.queue_size:
                        self._problem(f"last-batch list reaches head {head}, beyond the "
                                      f"queue size {self.queue_size}")
                        break
                    off = self._desc_off(head)
                    self.view[off] = 0
                    head = _U16.unpack_from(self.view, off + _DESC_OFF_NEXT)[0]
            _U16.pack_into(self.view, _OFF_USED_IDX, used_idx)
        heads = self.in_flight()
        counters = [_U64.unpack_from(self.view, self._desc_off(h) + _DESC_OFF_COUNTER)[0]
                    for h in heads]
        self.counter = (max(counters) + 1) if counters else 0
        return heads

    def _problem(self, text: str) -> None:
        message = f"{self.name}: inflight {text}"
        self.problems.append(message)
        log.warning("%s", message)


# ---- the packed layout -----------------------------------------------------------------------

#: per-queue header: features (u64), version, desc_num, free_head, old_free_head, used_idx,
#: old_used_idx (u16), used_wrap_counter, old_used_wrap_counter (u8), padding to 32 bytes
PACKED_HEADER = struct.Struct("=QHHHHHHBB7x")
PACKED_HEADER_SIZE = 32
#: per-descriptor state: inflight (u8), padding, next, last, num (u16), counter (u64),
#: then the descriptor as read from the ring: id, flags (u16), len (u32), addr (u64)
PACKED_DESC = struct.Struct("=BxHHHQHHIQ")
_P_FREE_HEAD = 12
_P_OLD_FREE_HEAD = 14
_P_USED_IDX = 16
_P_OLD_USED_IDX = 18
_P_USED_WRAP = 20
_P_OLD_USED_WRAP = 21
_PD_NEXT = 2
_PD_LAST = 4
_PD_NUM = 6
_PD_COUNTER = 8
_PD_DESC = 16  # id, flags, len, addr
_PD_DESC_STRUCT = struct.Struct("=HHIQ")
_F_AVAIL = 1 << P.VRING_PACKED_DESC_F_AVAIL
_F_USED = 1 << P.VRING_PACKED_DESC_F_USED


def packed_queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region in the packed layout, 64-byte aligned."""
    raw = PACKED_HEADER_SIZE + PACKED_DESC.size * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class InflightRegionError(PeerError):
    """The front-end's inflight region is inconsistent (said in the message)."""


class PackedQueueInflight:
    """One packed queue's part of the region (QEMU's ``docs/interop/vhost-user.rst``,
    "Inflight I/O tracking", packed layout), used as the device's request tracker.

    Descriptor states are not tied to buffer ids or ring slots: they come from a free list
    (``next`` links). A popped buffer takes one state per ring descriptor, copied from the
    ring, linked in order; the first (the *head*) carries ``inflight``, ``counter`` (pop
    order), ``num`` (descriptor count) and ``last``. ``free_head`` / ``used_idx`` /
    ``used_wrap_counter`` change as we go; their ``old_`` copies are committed once a batch
    of completions is published, so that a successor can tell whether the batch it finds
    half-recorded reached the driver (:meth:`recover`).

    ``ring`` is the packed device queue: pops are recorded from its descriptors
    (:meth:`~pyvirtio.ring.packed.PackedDeviceQueue.descriptors`), recovery looks at its
    descriptor ring.
    """

    def __init__(self, view: memoryview, queue_size: int, ring: PackedDeviceQueue,
                 name: str = "queue") -> None:
        if len(view) < packed_queue_region_size(queue_size):
            raise ValueError(f"{name}: inflight region of {len(view)} bytes is too small for "
                             f"{queue_size} packed descriptors")
        self.view = view
        self.queue_size = queue_size
        self.ring = ring
        self.name = name
        self.counter = 0
        self.problems: list[str] = []
        self._heads: dict[int, int] = {}  # buffer id -> its head state
        self._pending: list[int] = []  # head states of the batch being completed
        self._num_in_flight = 0  # descriptor states taken by buffers in flight

    # ---- fields ---------------------------------------------------------------------------

    def _u16(self, off: int) -> int:
        value: int = _U16.unpack_from(self.view, off)[0]
        return value

    def _set16(self, off: int, value: int) -> None:
        _U16.pack_into(self.view, off, value)

    def _d(self, i: int) -> int:
        return PACKED_HEADER_SIZE + PACKED_DESC.size * i

    @property
    def version(self) -> int:
        return self._u16(_OFF_VERSION)

    @property
    def desc_num(self) -> int:
        return self._u16(_OFF_DESC_NUM)

    @property
    def used_idx(self) -> int:
        """The committed used position as ``position | wrap << 15``."""
        return self._u16(_P_OLD_USED_IDX) | (self.view[_P_OLD_USED_WRAP] & 1) << 15

    def in_flight(self) -> list[int]:
        """Buffer ids recorded in flight, in pop order."""
        return [buf for _, buf in sorted((self._counter(h), b) for b, h in self._heads.items())]

    def _counter(self, head: int) -> int:
        value: int = _U64.unpack_from(self.view, self._d(head) + _PD_COUNTER)[0]
        return value

    # ---- RequestTracker -------------------------------------------------------------------

    def popped(self, head: int) -> None:
        """Buffer ``head`` (an id) was popped: copy its descriptors into free states."""
        if head in self._heads:
            self._forget(head)  # popped again after a rewind (RETRY)
        descs = self.ring.descriptors(head)
        view = self.view
        n = self.queue_size
        if self._num_in_flight + len(descs) > n:
            raise InflightRegionError(f"{self.name}: more descriptors in flight than the "
                                      f"queue size {n}")
        first = self._u16(_P_OLD_FREE_HEAD)
        last = len(descs) - 1
        for i, (addr, length, buf_id, flags) in enumerate(descs):
            free = self._u16(_P_FREE_HEAD)
            if free >= n or first >= n:
                raise InflightRegionError(f"{self.name}: inflight free list reaches state "
                                          f"{max(free, first)}, beyond the queue size {n}")
            h = self._d(first)
            if i == 0:
                self._set16(h + _PD_NUM, 0)
                _U64.pack_into(view, h + _PD_COUNTER, self.counter)
                self.counter += 1
                view[h] = 1
            if i == last:
                self._set16(h + _PD_LAST, free)
            self._set16(h + _PD_NUM, self._u16(h + _PD_NUM) + 1)
            d = self._d(free)
            _PD_DESC_STRUCT.pack_into(view, d + _PD_DESC, buf_id, flags, length, addr)
            self._set16(_P_FREE_HEAD, self._u16(d + _PD_NEXT))
            if i == last:
                self._set16(_P_OLD_FREE_HEAD, self._u16(_P_FREE_HEAD))
        self._heads[head] = first
        self._num_in_flight += len(descs)

    def _last(self, h: int) -> int:
        """Head state ``h``'s last state, checked: the front-end shares the region."""
        last = self._u16(self._d(h) + _PD_LAST)
        if last >= self.queue_size:
            raise InflightRegionError(f"{self.name}: inflight state {h} says its last state "
                                      f"is {last}, beyond the queue size {self.queue_size} "
                                      "(the region was changed under us)")
        return last

    def _forget(self, buf_id: int) -> None:
        """Give a recorded buffer's states back without a completion (it was un-popped)."""
        h = self._heads.pop(buf_id)
        off = self._d(h)
        self.view[off] = 0
        self._num_in_flight -= self._u16(off + _PD_NUM)
        self._set16(self._d(self._last(h)) + _PD_NEXT, self._u16(_P_FREE_HEAD))
        self._set16(_P_FREE_HEAD, h)
        self._set16(_P_OLD_FREE_HEAD, h)

    def completing(self, heads: Sequence[int]) -> None:
        """``heads`` (buffer ids) are about to be published: give their states to the free
        list and advance the used position, the ``old_`` copies staying as they were."""
        free = self._u16(_P_FREE_HEAD)
        used = self._u16(_P_USED_IDX)
        wrap = self.view[_P_USED_WRAP]
        n = self.queue_size
        for buf_id in heads:
            h = self._heads.pop(buf_id, None)
            if h is None:
                continue  # not recorded (tracking began after its pop)
            off = self._d(h)
            num = self._u16(off + _PD_NUM)
            self._num_in_flight -= num
            self._set16(self._d(self._last(h)) + _PD_NEXT, free)
            free = h
            used += num
            if used >= n:
                used -= n
                wrap ^= 1
            self._pending.append(h)
        self._set16(_P_FREE_HEAD, free)
        self._set16(_P_USED_IDX, used)
        self.view[_P_USED_WRAP] = wrap

    def completed(self, heads: Sequence[int], used_idx: int) -> None:
        """The batch is published: clear its heads' marks, then commit the ``old_`` copies."""
        view = self.view
        for h in self._pending:
            view[self._d(h)] = 0
        self._pending.clear()
        self._set16(_P_OLD_FREE_HEAD, self._u16(_P_FREE_HEAD))
        self._set16(_P_OLD_USED_IDX, self._u16(_P_USED_IDX))
        view[_P_OLD_USED_WRAP] = view[_P_USED_WRAP]

    # ---- starting -------------------------------------------------------------------------

    def initialise(self, used_idx: int) -> None:
        """A fresh region: nothing in flight, every state free, the used position
        ``used_idx`` (``position | wrap << 15``)."""
        view = self.view
        n = self.queue_size
        view[: packed_queue_region_size(n)] = bytes(packed_queue_region_size(n))
        pos, wrap = used_idx & 0x7FFF, used_idx >> 15 & 1
        PACKED_HEADER.pack_into(view, 0, 0, VERSION, n, 0, 0, pos, pos, wrap, wrap)
        for i in range(n):
            self._set16(self._d(i) + _PD_NEXT, i + 1)
        self.counter = 0
        self._heads.clear()
        self._num_in_flight = 0

    def recover(self) -> tuple[int, list[tuple[int, list[tuple[int, int, int, int]]]]]:
        """Called when the ring (re)starts: settle the batch a predecessor may have died in,
        and return ``(used position, buffers)``: where the ring's used position really is,
        and the buffers still in flight, oldest first, each with its saved descriptors (for
        :meth:`~pyvirtio.ring.packed.PackedDeviceQueue.restore`). A fresh or unusable
        region starts afresh at the ring's own used position (the front-end's)."""
        ring_used = self.ring.used_idx
        if self.version == 0:
            self.initialise(ring_used)
            return ring_used, []
        try:
            return self._recover()
        except InflightRegionError as exc:
            self._problem(f"{exc}: starting afresh at the front-end's used position "
                          f"0x{ring_used:04x}, nothing resubmitted")
            self.initialise(ring_used)
            return ring_used, []

    def _recover(self) -> tuple[int, list[tuple[int, list[tuple[int, int, int, int]]]]]:
        view = self.view
        n = self.queue_size
        (_, version, desc_num, free, old_free, used, old_used, wrap,
         old_wrap) = PACKED_HEADER.unpack_from(view, 0)
        if version != VERSION or desc_num != n:
            raise InflightRegionError(f"region has version {version} and {desc_num} "
                                      f"descriptors, expected version {VERSION} and {n}")
        for what, value, limit in (("free_head", free, n), ("old_free_head", old_free, n),
                                   ("used_idx", used, n - 1), ("old_used_idx", old_used, n - 1),
                                   ("used_wrap_counter", wrap, 1),
                                   ("old_used_wrap_counter", old_wrap, 1)):
            if value > limit:
                raise InflightRegionError(f"{what} {value} is beyond {limit}")
        if (used, wrap) != (old_used, old_wrap):
            # Died while completing a batch. If the slot at the committed used position no
            # longer reads "available" for that lap, the batch was published: commit it.
            flags = self.ring.slot_flags(old_used)
            avail = bool(flags & _F_AVAIL) == bool(old_wrap) \
                and bool(flags & _F_USED) != bool(old_wrap)
            if not avail:
                old_free, old_used, old_wrap = free, used, wrap
        # Roll back whatever was not committed.
        free, used, wrap = old_free, old_used, old_wrap
        self._set16(_P_FREE_HEAD, free)
        self._set16(_P_USED_IDX, used)
        view[_P_USED_WRAP] = wrap
        # States on the free list are not in flight (a batch committed before its marks were
        # cleared, a buffer half recorded when the predecessor died).
        i, steps = free, 0
        while i < n:
            steps += 1
            if steps > n:
                raise InflightRegionError(f"the free list loops (through state {i})")
            view[self._d(i)] = 0
            i = self._u16(self._d(i) + _PD_NEXT)
        marked = []
        for h in range(n):
            if view[self._d(h)]:
                marked.append((self._counter(h), h))
        marked.sort()
        buffers: list[tuple[int, list[tuple[int, int, int, int]]]] = []
        ids: set[int] = set()
        total = 0
        for _, h in marked:
            num = self._u16(self._d(h) + _PD_NUM)
            last = self._u16(self._d(h) + _PD_LAST)
            if not 1 <= num <= n - total:
                raise InflightRegionError(f"state {h} is in flight with {num} descriptors "
                                          f"(with those before it over the queue size {n})")
            descs = []
            i = h
            for k in range(num):
                if i >= n:
                    raise InflightRegionError(f"state {h}'s descriptor list reaches state "
                                              f"{i}, beyond the queue size {n}")
                buf_id, flags, length, addr = _PD_DESC_STRUCT.unpack_from(
                    view, self._d(i) + _PD_DESC)
                descs.append((addr, length, buf_id, flags))
                if k < num - 1:
                    i = self._u16(self._d(i) + _PD_NEXT)
            if i != last:
                raise InflightRegionError(f"state {h}'s descriptor list of {num} ends at "
                                          f"state {i}, but its last is {last}")
            buf_id = descs[-1][2]
            if buf_id >= n or buf_id in ids:
                raise InflightRegionError(f"state {h} holds buffer id {buf_id}, "
                                          + ("beyond the queue size" if buf_id >= n
                                             else "in flight twice"))
            ids.add(buf_id)
            total += num
            buffers.append((buf_id, descs))
            self._heads[buf_id] = h
        self._num_in_flight = total
        self.counter = (marked[-1][0] + 1) if marked else 0
        self._set16(_P_OLD_FREE_HEAD, free)
        self._set16(_P_OLD_USED_IDX, used)
        view[_P_OLD_USED_WRAP] = wrap
        return used | wrap << 15, buffers

    def _problem(self, text: str) -> None:
        message = f"{self.name}: inflight {text}"
        self.problems.append(message)
        log.warning("%s", message)


#: makes a zero-filled shareable memory file of the given size; returns its fd
Allocate = Callable[[int], int]


class InflightExtension(BackendExtension):
    """``GET_INFLIGHT_FD`` / ``SET_INFLIGHT_FD`` and the resubmission on ring start.

    ``allocate`` comes from the I/O layer (:func:`pyvirtio.io.inflight.allocate_region`).
    """

    protocol_features = V.protocol_mask(PF.INFLIGHT_SHMFD)

    def __init__(self, device: VirtioDevice, allocate: Allocate) -> None:
        self.device = device
        self.allocate = allocate
        self.region: Region | None = None
        self.num_queues = self.queue_size = 0
        #: per queue of the region: its tracker once its ring started
        self.queues: list[QueueInflight | PackedQueueInflight | None] = []
        self.problems: list[str] = []
        #: per ring start: (vring index, heads resubmitted), for tests and logs
        self.resubmitted: list[tuple[int, list[int]]] = []

    def requests(self) -> dict[int, tuple[RequestRule, Handler]]:
        return {
            R.GET_INFLIGHT_FD: (C.REQUEST_RULES[R.GET_INFLIGHT_FD], self._get_inflight_fd),
            R.SET_INFLIGHT_FD: (C.REQUEST_RULES[R.SET_INFLIGHT_FD], self._set_inflight_fd),
        }

    def _check_geometry(self, num_queues: int, queue_size: int) -> None:
        have = self.device.num_queues
        if not 1 <= num_queues <= have:
            raise MessageError(f"inflight region for {num_queues} queues; the device has "
                               f"{have}")
        if not SP.is_valid_queue_size(queue_size):
            raise MessageError(f"inflight queue size {queue_size} is not a power of two in "
                               f"1..{SP.MAX_QUEUE_SIZE}")

    def _get_inflight_fd(self, msg: Message) -> Message:
        _, _, num_queues, queue_size = V.INFLIGHT.unpack(msg.payload)
        self._check_geometry(num_queues, queue_size)
        size = region_size(num_queues, queue_size)
        fd = self.allocate(size)
        log.info("%s: new inflight region: %d queues of %d, %d bytes",
                 self.protocol.name, num_queues, queue_size, size)
        # The fd is given away with the reply; the front-end sends it back (SET_INFLIGHT_FD).
        return self.protocol.reply_to(msg, V.INFLIGHT.pack(size, 0, num_queues, queue_size),
                                      [fd])

    def _set_inflight_fd(self, msg: Message) -> None:
        mmap_size, mmap_offset, num_queues, queue_size = V.INFLIGHT.unpack(msg.payload)
        self._check_geometry(num_queues, queue_size)
        need = region_size(num_queues, queue_size)
        if mmap_size < min(need, num_queues * queue_region_size(queue_size)):
            raise MessageError(f"inflight region of {mmap_size} bytes is too small for "
                               f"{num_queues} queues of {queue_size} ({need} bytes)")
        try:
            region = self.protocol.host.map_memory(msg.fds[0], 0, mmap_size, mmap_offset, None)
        except GuestMemoryError as exc:
            raise MessageError(f"inflight region cannot be mapped: {exc}") from exc
        msg.take_fd(0)
        self._release()
        self.region = region
        self.num_queues, self.queue_size = num_queues, queue_size
        self.queues = [None] * num_queues  # per layout, when each ring starts
        log.info("%s: inflight region set: %d queues of %d", self.protocol.name, num_queues,
                 queue_size)

    def _view(self, index: int, stride: int) -> memoryview | None:
        """Queue ``index``'s part of the region in a layout of ``stride`` bytes per queue."""
        assert self.region is not None
        if self.num_queues * stride > len(self.region.buf):
            return None
        return self.region.buf[index * stride : (index + 1) * stride]

    # ---- hooks ----------------------------------------------------------------------------

    def on_ring_started(self, index: int, ring: DeviceRing) -> None:
        if index >= len(self.queues):
            return  # no region (the front-end did not negotiate or send one)
        device = self.device
        if ring.size != self.queue_size:
            self._problem(f"vring {index} runs {ring.size} descriptors but its inflight "
                          f"region tracks {self.queue_size}: not tracked")
            device.track_requests(index, None)
            return
        if isinstance(ring, PackedDeviceQueue):
            self._start_packed(index, ring)
            return
        view = self._view(index, queue_region_size(self.queue_size))
        assert view is not None  # SET_INFLIGHT_FD checked the size for split
        q = QueueInflight(view, self.queue_size, f"{self.protocol.name} vring {index}")
        self.queues[index] = q
        heads = q.recover(ring.used_idx)
        self.problems += q.problems
        q.problems.clear()
        if heads or ring.last_avail_idx != ring.used_idx:
            log.info("%s: vring %d restarts at used idx %d with %d request(s) in flight "
                     "(front-end said last_avail_idx %d)", self.protocol.name, index,
                     ring.used_idx, len(heads), ring.last_avail_idx)
        # Every avail entry before used->idx + in-flight was popped by our predecessor.
        ring.last_avail_idx = (ring.used_idx + len(heads)) & 0xFFFF
        device.track_requests(index, q, resubmit=heads)
        self.resubmitted.append((index, heads))

    def _start_packed(self, index: int, ring: PackedDeviceQueue) -> None:
        """A packed ring: its positions come from the region, not from the front-end.

        QEMU 7.2 cannot ask a dead back-end for the ring's base, and for a packed ring it
        does not recover it from memory either: after a reconnection it sends
        SET_VRING_BASE for a fresh ring although its driver is far past position 0
        (docs/peers.md). The region knows where the ring stands: the committed used
        position, and what was in flight."""
        device = self.device
        name = self.protocol.name
        if ring.in_order:
            # IN_ORDER holds completions back until earlier ones are done, so a completed
            # batch is not what gets published; the layout has no room for that.
            log.warning("%s: vring %d is a packed ring with IN_ORDER: not tracked, so not "
                        "crash-safe", name, index)
            device.track_requests(index, None)
            return
        view = self._view(index, packed_queue_region_size(self.queue_size))
        if view is None:
            self._problem(f"vring {index}: the inflight region is too small for the packed "
                          "layout: not tracked")
            device.track_requests(index, None)
            return
        q = PackedQueueInflight(view, self.queue_size, ring, f"{name} vring {index}")
        self.queues[index] = q
        said = ring.used_idx, ring.last_avail_idx
        used, buffers = q.recover()
        self.problems += q.problems
        q.problems.clear()
        try:
            ring.restore(used, buffers)
        except (RingError, QueueUsageError) as exc:
            self._problem(f"vring {index}: cannot restore the packed ring from the inflight "
                          f"region: {exc}")
            device.track_requests(index, None)
            return
        if buffers or (ring.used_idx, ring.last_avail_idx) != said:
            log.info("%s: vring %d restarts at used idx %d with %d request(s) in flight "
                     "(packed: used 0x%04x avail 0x%04x from the inflight region; the "
                     "front-end said used 0x%04x avail 0x%04x)", name, index,
                     ring.used_idx, len(buffers), ring.used_idx, ring.last_avail_idx, *said)
        ids = [buf_id for buf_id, _ in buffers]
        device.track_requests(index, q, resubmit=ids)
        self.resubmitted.append((index, ids))

    def on_ring_stopped(self, index: int, last_avail_idx: int) -> None:
        if index < len(self.queues):
            device = self.device
            device.track_requests(index, None)

    def _problem(self, text: str) -> None:
        message = f"{self.protocol.name}: {text}"
        self.problems.append(message)
        log.warning("%s", message)

    def _release(self) -> None:
        self.queues = []
        self.num_queues = self.queue_size = 0
        if self.region is not None:
            self.region.close()
            self.region = None

    def close(self) -> None:
        self._release()
