"""The virtio-blk data path for the requests Linux sends all day, with nothing in between.

A Linux guest's 4 KiB read or write is one chain of exactly three descriptors: the 16-byte
request header (readable), the data (writable for a read, readable for a write) and the
one-byte status (writable), usually as an indirect table of three. :class:`BlkFastLane`
serves such chains straight from the ring memory: one ``struct`` unpack for the three
descriptors, bounds checks against the guest memory region at hand, one ``os.preadv`` /
``os.pwritev`` between the image and guest memory, the status byte and the used element
written in place, one used->idx store per batch. No chain, request or list object per
request; on a vhost-user back-end at queue depth 1 this roughly halves the Python work per
request, which is what the benchmark against qemu-storage-daemon measures.

Anything else is handed, unchanged, to the general path: the ring's own
:meth:`~pyvirtio.ring.split.DeviceQueue.pop` (which applies every ring rule and breaks the
queue with a reason) and :meth:`BlkDevice.handle` (every blk rule, errors, other request
types). The lane never decides that something is *wrong*; it only decides that something
is *ordinary*, checking everything it relies on: the head index, that the head is not
already in flight, the exact descriptor flags and links, every address against the guest
memory region, and the request's range, alignment and type. A chain that fails any check
takes the general path, which gives the verdict. So the lane adds speed, not rules.

It keeps the ring's state consistent (``last_avail_idx``, ``used_idx``, the in-flight
marks) and publishes its pending completions before it hands over, so that the general
path always sees a ring exactly as if it had done everything itself.

Batch mode (:attr:`BlkDevice.batch_interval`): a guest that submits one request at a time
(User-Mode Linux's fio, even at queue depth 32) costs two notifications and two wake-ups
per request, kick and interrupt, and on a virtual machine those wake-ups, not the I/O, are
most of the work of both sides. When requests keep coming at a high rate, the lane tries
leaving kicks off after a drain and looking at the ring again on a timer instead: every
tick serves what arrived meanwhile with one wake-up and at most one interrupt. It stays in
that mode only while the ticks serve requests at least about as fast as kicks did (a
driver that waits for each completion, as at queue depth 1, submits one request per tick
and sends the lane straight back); leaving goes through the usual enable-and-look-again
step, and completions are signalled at the end of every drain as always, so no request and
no interrupt is ever left waiting for a kick that will not come.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from pyvirtio.errors import PeerError
from pyvirtio.ring import DeviceRing, RingError
from pyvirtio.spec import blk as B

if TYPE_CHECKING:
    from pyvirtio.device.blk import BlkDevice, RequestTracker

_T_IN = B.VIRTIO_BLK_T_IN
_T_OUT = B.VIRTIO_BLK_T_OUT
_HDR = B.outhdr_struct("<")
_monotonic = time.monotonic
_preadv = os.preadv
_pwritev = os.pwritev
_hdr = _HDR.unpack_from

#: what :meth:`BlkDevice.lane_config` gives a lane at each kick: the per-queue trackers,
#: the back-end's fast fd, its mapped image, the capacity in bytes, the block and sector
#: alignment masks, whether writes may complete without a sync, and the back-end
LaneConfig = tuple[list[Any], int, "memoryview | None", int, int, int, bool, Any]

# Batch mode (see the module doc). Kick-driven serving is measured over windows of
# _WINDOW seconds; a window at _MIN_RATE requests/s or more (several per tick) may start a
# trial. A tick that finds at most _IDLE_TICK requests ends batch mode at once (the driver
# waits for us, or went quiet); otherwise the tick rate is judged over _JUDGE seconds and
# must reach _KEEP times the kick-driven rate. A failed trial is retried after a back-off
# that doubles from _MIN_BACKOFF up to _MAX_BACKOFF; a kept one resets it.
_WINDOW = 0.05
_MIN_RATE = 3000.0
_IDLE_TICK = 1
_JUDGE = 0.01
_KEEP = 0.9
_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 5.0


class BlkFastLane:
    """The fast path of one running queue of a :class:`BlkDevice` (see the module doc).

    Made per ring (a restarted queue gets a new lane) by :meth:`BlkDevice.process_queue`,
    only for little-endian rings and synchronous back-ends.
    """

    __slots__ = ("_b_count", "_b_start", "_backoff", "_batching", "_drained", "_interval",
                 "_kick_rate", "_tick", "_trial_after", "_w_count", "_w_start", "device",
                 "index", "queue", "ring")

    def __init__(self, device: BlkDevice, index: int, ring: DeviceRing) -> None:
        self.device = device
        self.index = index
        self.ring = ring
        self.queue = device.queues[index]
        # Batch mode: off unless the device asks for it and has a reactor for the ticks.
        interval = device.batch_interval
        self._interval = interval if interval and device.reactor is not None else 0.0
        self._batching = False  # kicks left off, a tick armed
        self._tick: Any = None
        self._kick_rate = 0.0  # requests/s served on kicks, last full window
        self._w_start = _monotonic()  # the current kick-driven window
        self._w_count = 0
        self._b_start = 0.0  # the current judging span in batch mode
        self._b_count = 0
        self._trial_after = 0.0
        self._backoff = _MIN_BACKOFF
        self._drained = False  # run() got past its checks (set for the tick to see)

    @property
    def batching(self) -> bool:
        """Whether the lane is in batch mode (kicks off, the ring looked at on a timer)."""
        return self._batching

    def _account(self, served: int) -> None:
        """After a drain that served ``served`` requests: keep the kick-driven rate, and
        start a batch-mode trial when it is high enough (kicks are still on for the next
        request: its kick runs the first drain in batch mode, which leaves them off)."""
        if self._batching:
            self._b_count += served
            return
        self._w_count += served
        now = _monotonic()
        elapsed = now - self._w_start
        if elapsed < _WINDOW:
            return
        rate = self._kick_rate = self._w_count / elapsed
        self._w_start = now
        self._w_count = 0
        if rate >= _MIN_RATE and now >= self._trial_after:
            self._batching = True
            self._b_start = now
            self._b_count = 0

    def _on_tick(self) -> None:
        """The batch-mode timer: judge the mode, then drain (which re-arms the tick while
        batch mode lasts, or turns kicks back on and looks again when it ends)."""
        self._tick = None
        device = self.device
        ring = self.ring
        index = self.index
        if (device._lanes[index] is not self or device.queues[index].ring is not ring
                or ring.broken is not None):
            self._batching = False  # a stale lane: the queue stopped or restarted
            return
        now = _monotonic()
        arrived = ring.pending()
        elapsed = now - self._b_start
        if arrived <= _IDLE_TICK:
            self._end_batching(now, failed=True)
        elif elapsed >= _JUDGE:
            if self._b_count + arrived < _KEEP * self._kick_rate * elapsed:
                self._end_batching(now, failed=True)
            else:  # kept: judge the next span from here
                self._backoff = _MIN_BACKOFF
                self._b_start = now
                self._b_count = -arrived  # the drain below counts them again
        self._drained = False
        device.stats.batch_ticks += 1
        device.poll_queue(index)
        if not self._drained and device.queues[index].ring is ring and ring.broken is None:
            # The transport did not let the drain run (a disabled vhost-user vring): leave
            # batch mode with kicks on; re-enabling the vring looks at the ring anyway.
            if self._batching:
                self._end_batching(now, failed=True)
            ring.enable_notifications()

    def _end_batching(self, now: float, *, failed: bool) -> None:
        self._batching = False
        if failed:
            self._trial_after = now + self._backoff
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF)
        self._w_start = now
        self._w_count = 0


    def run(self) -> None:
        """Drain the ring, like :meth:`VirtioDevice.process_queue`: the short chains the
        ring hands out in batches (:meth:`~pyvirtio.ring.split.DeviceQueue.pop_short`)
        are served here; anything else goes through :meth:`BlkDevice.handle`."""
        ring = self.ring
        queue = self.queue
        if queue.ring is not ring or ring.broken is not None:
            return
        self._drained = True
        device = self.device
        index = self.index
        (trackers, fd, image, size, lbs_mask, sector_mask, fast_write,
         backend) = device._lane_config or device.lane_config()
        tracker = trackers[index]
        first = ring.last_avail_idx
        done: list[tuple[int, int]] = []  # (head, bytes written), not yet published
        reads = writes = bytes_read = bytes_written = 0
        published = False
        pop_short = ring.pop_short
        try:
            ring.disable_notifications()
            while True:
                batch = pop_short()
                for i, (head, buf, o0, l0, o1, l1, w1, o2, l2) in enumerate(batch):
                    if tracker is not None:
                        tracker.popped(head)
                    # ---- the request: a read or write inside the disk --------------------
                    if l0 == 16 and l2 == 1:
                        rtype, _ioprio, sector = _hdr(buf, o0)
                        offset = sector << 9
                        if l1 & lbs_mask or sector & sector_mask or offset + l1 > size:
                            pass  # handle() answers IOERR
                        elif w1:
                            if rtype == _T_IN:
                                if image is not None:
                                    # size <= len(image): offset + l1 is inside it
                                    buf[o1 : o1 + l1] = image[offset : offset + l1]
                                    n = l1
                                else:
                                    try:
                                        n = (_preadv(fd, (buf[o1 : o1 + l1],), offset)
                                             if fd >= 0 else
                                             _readv(backend, offset, buf[o1 : o1 + l1], l1))
                                    except OSError:
                                        n = -1  # handle() retries and reports it
                                if n == l1:
                                    buf[o2] = 0
                                    done.append((head, l1 + 1))
                                    reads += 1
                                    bytes_read += l1
                                    continue
                        elif rtype == _T_OUT and fast_write:
                            try:
                                n = (_pwritev(fd, (buf[o1 : o1 + l1],), offset) if fd >= 0
                                     else _writev(backend, offset, buf[o1 : o1 + l1], l1))
                            except OSError:
                                n = -1
                            if n == l1:
                                buf[o2] = 0
                                done.append((head, 1))
                                writes += 1
                                bytes_written += l1
                                continue
                    # ---- anything else: the general path, on a consistent ring -----------
                    ring.rewind(len(batch) - i - 1)  # the rest is offered again
                    if done:
                        _publish(ring, done, tracker)
                        published = True
                    result = device.handle(index, ring.chain(head))
                    if queue.ring is not ring:
                        return  # the handler reset the device or stopped this queue
                    if result is not None:
                        done.append((head, result))
                    break
                else:
                    if ring.pending():  # not a short chain: the general path gives the verdict
                        if done:
                            _publish(ring, done, tracker)
                            published = True
                        chain = ring.pop()  # raises RingError for a malformed chain
                        if chain is not None:
                            if tracker is not None:
                                tracker.popped(chain.head)
                            result = device.handle(index, chain)
                            if queue.ring is not ring:
                                return  # the handler reset the device or stopped this queue
                            if result is not None:
                                done.append((chain.head, result))
                            continue
                    if done:
                        _publish(ring, done, tracker)
                        published = True
                    if self._batching:
                        break  # kicks stay off: the next tick looks again
                    # kick us for what comes next, then look again (a buffer made available
                    # meanwhile sent no kick)
                    if not ring.enable_notifications():
                        break
                    ring.disable_notifications()
            if self._interval:
                self._account((ring.last_avail_idx - first) & 0xFFFF)
        except (RingError, PeerError) as exc:
            # A malformed request (handle() refused to answer it) still lets what came
            # before it be returned, as the framework's loop does; a broken ring does not.
            if done and ring.broken is None and queue.ring is ring:
                _publish(ring, done, tracker)
                published = True
            device.queue_failed(index, ring, exc)
        finally:
            if reads or writes:
                stats = device.stats
                stats.reads += reads
                stats.writes += writes
                stats.bytes_read += bytes_read
                stats.bytes_written += bytes_written
            if published and queue.ring is ring and ring.needs_notification():
                device.notify_queue(index)
            if self._batching and self._tick is None:
                if queue.ring is ring and ring.broken is None:
                    self._tick = device.reactor.call_later(  # type: ignore[union-attr]
                        self._interval, self._on_tick)
                else:
                    self._batching = False


def _publish(ring: DeviceRing, done: list[tuple[int, int]],
             tracker: RequestTracker | None) -> None:
    """Return the completed requests to the driver with one used->idx store, telling the
    request tracker before and after."""
    if tracker is None:
        ring.push_many(done)
    else:
        heads = [head for head, _ in done]
        tracker.completing(heads)
        ring.push_many(done)
        tracker.completed(heads, ring.used_idx)
    done.clear()


def _readv(backend: object, offset: int, view: memoryview, length: int) -> int:
    backend.readv(offset, (view,), length)  # type: ignore[attr-defined]
    return length


def _writev(backend: object, offset: int, view: memoryview, length: int) -> int:
    backend.writev(offset, (view,), length)  # type: ignore[attr-defined]
    return length
