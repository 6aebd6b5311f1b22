"""Inflight I/O tracking (vhost-user ``INFLIGHT_SHMFD``) for split rings, sans-I/O.

Why: a back-end that dies (SIGKILL, crash) takes with it the knowledge of which requests it
had popped from the avail ring but not yet returned. QEMU's ``vhost-user-blk`` front-end,
started with ``-chardev socket,...,reconnect=N``, reconnects to a restarted back-end and
restarts the rings, but it cannot say what was in flight. With ``INFLIGHT_SHMFD`` the
back-end keeps that record in shared memory the *front-end* owns: ``GET_INFLIGHT_FD`` asks
the back-end for a zeroed region (a memfd), ``SET_INFLIGHT_FD`` hands it (back) to the
back-end, also after a reconnection. The restarted back-end reads it, resubmits what was in
flight, and resumes the avail ring where its predecessor really stopped.

The layout is the one QEMU's ``docs/interop/vhost-user.rst`` ("Inflight I/O tracking")
describes for split rings, so a region is portable between back-end implementations. One
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
from pyvirtio.memory import GuestMemoryError, Region
from pyvirtio.ring import DeviceRing, is_packed
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
    """Bytes of the whole inflight region for ``num_queues`` queues of ``queue_size``."""
    return num_queues * queue_region_size(queue_size)


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
        self.queues: list[QueueInflight] = []
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
        if mmap_size < need:
            raise MessageError(f"inflight region of {mmap_size} bytes is too small for "
                               f"{num_queues} queues of {queue_size} ({need} bytes)")
        try:
            region = self.protocol.host.map_memory(msg.fds[0], 0, mmap_size, mmap_offset, None)
        except GuestMemoryError as exc:
            raise MessageError(f"inflight region cannot be mapped: {exc}") from exc
        msg.take_fd(0)
        self._release()
        self.region = region
        stride = queue_region_size(queue_size)
        name = self.protocol.name
        self.queues = [
            QueueInflight(region.buf[i * stride : (i + 1) * stride], queue_size,
                          f"{name} vring {i}")
            for i in range(num_queues)
        ]
        log.info("%s: inflight region set: %d queues of %d", name, num_queues, queue_size)

    # ---- hooks ----------------------------------------------------------------------------

    def on_ring_started(self, index: int, ring: DeviceRing) -> None:
        if index >= len(self.queues):
            return  # no region (the front-end did not negotiate or send one)
        q = self.queues[index]
        device = self.device
        if is_packed(self.device.driver_features):
            # The packed inflight layout (descriptor copies per buffer id) is not
            # implemented: the ring runs, without resubmission after a crash.
            # Our limitation, not the peer's fault: a warning, not a problem.
            log.warning("%s: vring %d is a packed ring: not tracked, so not crash-safe "
                        "(inflight tracking covers split rings only)", self.protocol.name,
                        index)
            device.track_requests(index, None)
            return
        if q.queue_size != ring.size:
            self._problem(f"vring {index} runs {ring.size} descriptors but its inflight "
                          f"region tracks {q.queue_size}: not tracked")
            device.track_requests(index, None)
            return
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
        if self.region is not None:
            self.region.close()
            self.region = None

    def close(self) -> None:
        self._release()
