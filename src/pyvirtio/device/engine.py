"""The serving engine: how every device's queues are drained, completed and signalled.

One :class:`QueueEngine` runs per running queue (made by
:meth:`~pyvirtio.device.base.VirtioDevice.start_queue`). Whatever the device, serving a kick
is the same:

* **drain** with kicks suppressed: pop chains and hand each to the device's
  :meth:`~pyvirtio.device.base.VirtioDevice.handle`; close the enable-notification race by
  looking again after re-enabling kicks. A device with a fast path for its common chains
  (blk) plugs it in with :meth:`~pyvirtio.device.base.VirtioDevice.fast_lane`: it serves
  them in batches straight from the ring and leaves anything unusual to :meth:`handle`.
* **batch push**: completions are returned ``push_batch`` at a time with one used-index
  store (:meth:`QueueEngine.publish`), and the driver is interrupted at most once per
  drain, only if it asked to be (EVENT_IDX / NO_INTERRUPT).
* **backpressure and fairness**: ``handle`` may answer :data:`RETRY` (the device cannot take
  the chain now: it is put back and the queue waits for :meth:`QueueEngine.run` again, e.g.
  net's ``peer_ready``); a device with a ``drain_budget`` yields to the reactor after that
  many chains. A nested call (a handler whose peer calls back) makes the running drain look
  again instead of recursing.
* **buffers to fill**: ``handle`` may answer :data:`HOLD` for a buffer the device fills when
  the host has data; a device can also pop them on demand (:meth:`QueueEngine.buffer`) and
  wait for the driver to post more (:meth:`QueueEngine.out_of_buffers`). Held buffers are
  given back unused when the queue stops.
* **request tracking** for crash-safe reconnection: a :class:`RequestTracker` set with
  :meth:`~pyvirtio.device.base.VirtioDevice.track_requests` sees every head popped and
  completed (vhost-user INFLIGHT_SHMFD, :mod:`pyvirtio.transport.vhost_user.inflight`), and
  the heads a previous back-end left in flight are resubmitted before anything new.
* **adaptive batch mode** (``batch_interval`` on the device, with a reactor): a queue kept
  busy by a driver that submits one request at a time costs a kick and an interrupt per
  request; when requests keep coming fast, the engine tries leaving kicks off after a drain
  and looking at the ring on a timer instead, and stays in that mode only while the ticks
  serve requests at least about as fast as kicks did. Leaving goes through the usual
  enable-and-look-again step, and completions are signalled at the end of every drain, so
  nothing is ever left waiting for a kick that will not come.
* **adaptive polling** (``poll_max`` on the device, with a reactor that can poll,
  :class:`pyvirtio.core.reactor.PollingReactor`; off by default): a driver that waits for
  each completion before submitting again (queue depth 1) sends its next request a few
  microseconds after our interrupt, and then has to kick us and we have to wake up. With
  polling, a drain that completed something leaves kicks off and has the reactor look at
  the ring for a short window before it sleeps (as QEMU's iothreads do with
  ``poll-max-ns``): a request made available in the window is served without a kick or a
  wake-up; when the window passes, kicks go back on (and the ring is looked at again).
  The window tunes itself from the gap between a completion and the next request when the
  window missed it: a request that came within ``poll_max`` grows it (doubling from
  :data:`POLL_START`, up to ``poll_max``), a longer gap halves it (below
  :data:`POLL_START` it is 0: no polling until a short gap is seen again). An idle queue
  never polls: polling starts only after a completion.
* **lost notifications**: a transport to a real peer calls :meth:`QueueEngine.watch`
  every :data:`WATCH_INTERVAL` seconds. A kick that never arrived (buffers sat in a ring
  with kicks on for a whole interval) is served then, and a queue that has waited for
  buffers that long interrupts the driver again, in case it missed the interrupt that
  should have made it refill: either way the queue goes on, and the device counts it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from pyvirtio.core.reactor import PollingReactor
from pyvirtio.errors import PeerError
from pyvirtio.ring import DescriptorChain, DeviceRing, RingError

if TYPE_CHECKING:
    from pyvirtio.device.base import VirtioDevice

#: what :meth:`VirtioDevice.handle` returns for a chain the device cannot take now (the
#: chain is put back; the drain stops until :meth:`QueueEngine.run` is called again)
RETRY = -1

#: what :meth:`VirtioDevice.handle` returns for a buffer the device keeps to fill later,
#: when the host has data (:attr:`QueueEngine.held`; returned unused when the queue stops)
HOLD = -2

#: a completion waiting to be published: a chain (or a head) and the bytes written into it
Completion = tuple["DescriptorChain | int", int]
#: a device's fast path for one queue: serves what it can into the completion list; returns
#: True when it stopped at a chain it leaves to :meth:`VirtioDevice.handle` (un-popped, or
#: it saw nothing at all), False when it served everything it saw
FastLane = Callable[[DeviceRing, "list[Completion]", "RequestTracker | None"], bool]

# Batch mode. Kick-driven serving is measured over windows of _WINDOW seconds; a window at
# _MIN_RATE requests/s or more (several per tick) may start a trial. A tick that finds at
# most _IDLE_TICK requests ends batch mode at once (the driver waits for us, or went quiet);
# otherwise the tick rate is judged over _JUDGE seconds and must reach _KEEP times the
# kick-driven rate. A failed trial is retried after a back-off that doubles from
# _MIN_BACKOFF up to _MAX_BACKOFF; a kept one resets it.
_WINDOW = 0.05
_MIN_RATE = 3000.0
_IDLE_TICK = 1
_JUDGE = 0.01
_KEEP = 0.9
_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 5.0
_monotonic = time.monotonic

#: adaptive polling: the first window (seconds) after a short sleep; smaller ones are 0
POLL_START = 4e-6

#: seconds between a transport's calls of :meth:`QueueEngine.watch`
WATCH_INTERVAL = 0.25
#: a queue waiting for buffers interrupts the driver again after 1, 2, 4, ... watches
#: without them, at most this many apart
_MAX_RENOTIFY_WATCHES = 16


class RequestTracker(Protocol):
    """Follows the heads of a queue from pop to completion, so that what was in flight can
    be found again if this process dies (vhost-user INFLIGHT_SHMFD: the tracker writes a
    shared region the front-end keeps; see :mod:`pyvirtio.transport.vhost_user.inflight`)."""

    def popped(self, head: int) -> None:
        """``head`` was taken from the avail ring."""

    def completing(self, heads: Sequence[int]) -> None:
        """``heads`` are about to be published in the used ring (one used->idx store)."""

    def completed(self, heads: Sequence[int], used_idx: int) -> None:
        """``heads`` were published; used->idx is now ``used_idx``."""


class QueueEngine:
    """Serves one running queue of a device (see the module doc)."""

    __slots__ = ("_b_count", "_b_start", "_backoff", "_batching", "_drained", "_drains",
                 "_kick_rate", "_poll_window", "_polling", "_quiet", "_renotify_at",
                 "_seen_drains", "_seen_pending", "_slept_at", "_tick", "_trial_after",
                 "_w_count", "_w_start", "again", "blocked",
                 "device", "done", "fast", "held", "index", "queue", "ring",
                 "running", "waiting", "yielded")

    def __init__(self, device: VirtioDevice, index: int, ring: DeviceRing) -> None:
        self.device = device
        self.index = index
        self.ring = ring
        self.queue = device.queues[index]
        self.done: list[Completion] = []  # completions not yet published
        self.held: deque[DescriptorChain] = deque()  # popped buffers the device will fill
        self.waiting = False  # out of buffers: the device asked for a kick
        self.fast = device.fast_lane(index, ring)  # the device's fast path, or None
        self.running = False  # a drain is on the stack
        self.again = False  # someone asked for a drain while one ran: look again
        self.blocked = False  # handle() answered RETRY: wait for run()
        self.yielded = False  # out of budget: a drain is scheduled on the reactor
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
        self._drains = 0  # drains that got past their checks (for watch())
        self._seen_drains = 0  # ... at the previous watch()
        self._seen_pending = False  # buffers were available at the previous watch()
        self._quiet = 0  # watches spent waiting for buffers since the last interrupt
        self._renotify_at = 1
        self._polling = False  # armed on the reactor: kicks left off, the ring polled
        self._poll_window = 0.0  # seconds the next poll lasts (0: sleep at once)
        self._slept_at = 0.0  # when kicks went back on after a completion (0: not timed)

    @property
    def poll_window(self) -> float:
        """The current adaptive polling window, seconds (0: the queue sleeps at once)."""
        return self._poll_window

    @property
    def polling(self) -> bool:
        """Whether the reactor is polling the ring (kicks off) right now."""
        return self._polling

    @property
    def batching(self) -> bool:
        """Whether the queue is in batch mode (kicks off, the ring looked at on a timer)."""
        return self._batching

    def current(self) -> bool:
        """Whether this engine still serves a running, unbroken queue."""
        return self.queue.engine is self and self.ring.broken is None

    # ---- completing ---------------------------------------------------------------------

    def publish(self) -> None:
        """Return the waiting completions with one used->idx store, telling the request
        tracker before and after. Raises RingError if the ring refuses them."""
        done = self.done
        tracker = self.queue.tracker
        ring = self.ring
        chaos = self.device.chaos
        if tracker is None:
            if chaos is None:
                ring.push_many(done)
            else:
                chaos.push_many(self, done)
        else:
            heads = [c if type(c) is int else c.head for c, _ in done]  # type: ignore[union-attr]
            tracker.completing(heads)
            if chaos is None:
                ring.push_many(done)
            else:
                chaos.push_many(self, done)
            tracker.completed(heads, ring.used_idx)
        done.clear()

    def signal(self) -> None:
        """Completions were published: interrupt the driver if it asked for one (a hostile
        device, :mod:`pyvirtio.device.chaos`, may decide otherwise)."""
        wanted = self.ring.needs_notification()
        chaos = self.device.chaos
        if chaos is not None:
            wanted = chaos.signal(self, wanted)
        if wanted:
            self.device.notify_queue(self.index)

    def complete(self, completions: Iterable[Completion], notify: bool = True) -> None:
        """Return chains handled outside a drain (asynchronous back-ends, buffers a device
        held); interrupt the driver if it wants one."""
        if not self.current():
            return  # the queue was reset meanwhile: the chains belong to a dead ring
        if self.running:
            self.done.extend(completions)  # the running drain publishes them
            return
        self.done.extend(completions)
        if not self.done:
            return
        try:
            self.publish()
        except (RingError, PeerError) as exc:  # the ring, or the request tracker's region
            self.done.clear()
            self.device.queue_failed(self.index, self.ring, exc)
            return
        if notify:
            self.signal()

    # ---- buffers the device fills when the host has data (net and console receive) -------

    def buffer(self, pos: int) -> DescriptorChain | None:
        """The ``pos``-th buffer held for filling, popping more from the ring as needed; None
        if the driver has not posted that many. Raises RingError for a malformed chain."""
        held = self.held
        while len(held) <= pos:
            chain = self.ring.pop()
            if chain is None:
                return None
            held.append(chain)
        return held[pos]

    def out_of_buffers(self) -> bool:
        """No buffer for what the host has: publish what was filled (the driver refills on
        that interrupt) and ask for a kick. True if buffers arrived meanwhile (try again
        now); False: wait, :meth:`buffers_posted` tells at the kick."""
        self.complete(())
        ring = self.ring
        if not self.current():
            return False
        if ring.enable_notifications():
            ring.disable_notifications()
            return True
        if not self.waiting:
            self.waiting = True
            self._quiet, self._renotify_at = 0, 1
        return False

    def buffers_posted(self) -> bool:
        """The driver kicked a queue the device fills (we asked only when we ran out):
        True if the device was waiting for buffers."""
        self.ring.disable_notifications()
        waiting, self.waiting = self.waiting, False
        return waiting

    def give_back(self) -> None:
        """The queue stops: publish what was filled and un-pop the buffers held unused, so
        last_avail_idx (vhost-user GET_VRING_BASE) counts only buffers really consumed."""
        try:
            if self.done:
                self.ring.push_many(self.done)
            if self.held:
                self.ring.rewind(len(self.held))
        except RingError as exc:
            self.device.problem(str(exc))
        self.done.clear()
        self.held.clear()

    # ---- draining -----------------------------------------------------------------------

    def run(self) -> None:
        """Drain the queue (see the module doc); at most one interrupt."""
        ring = self.ring
        queue = self.queue
        if queue.engine is not self or ring.broken is not None:
            return
        if self.running:
            self.again = True
            return
        self.running = True
        self._drained = True
        self._drains += 1
        device = self.device
        poll_max = device.poll_max
        if poll_max:
            if not hasattr(device.reactor, "arm_poller"):
                poll_max = 0.0  # the reactor cannot poll (or there is none)
            elif self._slept_at and not self._polling:
                self._tune(_monotonic() - self._slept_at, poll_max)
        index = self.index
        done = self.done
        tracker = queue.tracker
        fast = self.fast
        if device.reactor is None:
            budget, interval = -1, None
        else:
            budget, interval = device.drain_budget, device.batch_interval
        first = ring.last_avail_idx
        published = False
        self.blocked = False
        try:
            if queue.resubmit:
                heads, queue.resubmit = queue.resubmit, []
                for head in heads:
                    resumed = ring.resume(head)
                    written = device.handle(index, resumed)
                    if queue.engine is not self:
                        return  # the handler reset the device or stopped this queue
                    if written is not None:
                        done.append((resumed, written))
                if done:
                    self.publish()
                    published = True
            while True:
                self.again = False
                ring.disable_notifications()
                while True:
                    if fast is not None:
                        if not fast(ring, done, tracker):
                            break  # the lane found nothing it leaves to handle()
                        if done:
                            self.publish()  # handle() sees the ring as if it did it all
                            published = True
                    if budget == 0:
                        self._yield()
                        break
                    chain = ring.pop()  # raises RingError for a malformed chain
                    if chain is None:
                        break
                    if tracker is not None:
                        tracker.popped(chain.head)
                    written = device.handle(index, chain)
                    if queue.engine is not self:
                        return  # the handler reset the device or stopped this queue
                    budget -= 1
                    if written is None:
                        continue  # completed later (asynchronous)
                    if written < 0:
                        if written == HOLD:
                            self.held.append(chain)
                            continue
                        ring.rewind(1)  # RETRY
                        self.blocked = True
                        break
                    done.append((chain, written))
                    if len(done) >= device.push_batch:
                        self.publish()
                        published = True
                if done:
                    self.publish()
                    published = True
                if self.blocked:
                    if self.again:
                        self.blocked = False
                        continue  # unblocked while we were busy
                    break  # kicks stay off: run() comes when the device can go on
                if self.yielded or self._batching:
                    break  # kicks stay off: the scheduled drain or the tick looks again
                if poll_max and published and not self.again:
                    self._slept_at = _monotonic()  # the gap to the next request tunes
                    if self._poll_window:
                        # kicks stay off: the reactor polls the ring (see the module doc)
                        if not self._polling:  # (armed already: a kick came meanwhile)
                            self._polling = True
                            cast(PollingReactor, device.reactor).arm_poller(
                                self, self._poll_window)
                        break
                # kick us for what comes next, then look again (a buffer made available
                # meanwhile sent no kick)
                if not ring.enable_notifications() and not self.again:
                    break
            if interval:
                self._account((ring.last_avail_idx - first) & 0xFFFF)
        except (RingError, PeerError) as exc:
            # A malformed request (handle() refused to answer it) still lets what came
            # before it be returned; a broken ring does not.
            if done and ring.broken is None and queue.engine is self:
                try:
                    self.publish()
                    published = True
                except RingError:
                    pass
            done.clear()
            device.queue_failed(index, ring, exc)
        finally:
            self.running = False
            if published and queue.engine is self:
                self.signal()
            if self._batching and self._tick is None:
                if interval and self.current():
                    self._tick = device.reactor.call_later(  # type: ignore[union-attr]
                        interval, self._on_tick)
                else:
                    self._batching = False

    # ---- lost notifications -------------------------------------------------------------

    def watch(self) -> str | None:
        """Look for a lost notification (see the module doc); a transport to a real peer
        calls this every :data:`WATCH_INTERVAL` seconds. Returns what was done, or None.

        Acting on a kick still queued in the event loop would be harmless but would count
        a loss that was not one, so a ring counts as missing its kick only when it held
        buffers at two watches in a row with no drain between them.
        """
        if (not self.current() or self.running or self.yielded or self.blocked
                or self._batching or self._polling):
            self._seen_pending = False  # kicks are off on purpose, or a drain is coming
            return None
        device, index = self.device, self.index
        if self.waiting:  # out of buffers to fill: the driver's next kick ends the wait
            if self.ring.pending():
                if not self._seen_pending:
                    self._seen_pending = True
                    return None
                self._seen_pending = False
                device.poll_queue(index)
                if self.waiting:
                    return None  # the transport holds the queue (a disabled vring)
                device.lost_kicks += 1
                return "buffers were posted without a kick: served"
            self._seen_pending = False
            self._quiet += 1
            if self._quiet < self._renotify_at:
                return None
            self._quiet = 0
            self._renotify_at = min(2 * self._renotify_at, _MAX_RENOTIFY_WATCHES)
            device.renotified += 1
            device.notify_queue(index)
            return "no buffers: the driver was interrupted again"
        if not self._drains:
            return None  # buffers the device fills on demand wait in the ring by design
        pending = self.ring.pending() > 0
        lost = pending and self._seen_pending and self._seen_drains == self._drains
        self._seen_pending, self._seen_drains = pending and not lost, self._drains
        if not lost:
            return None
        drains = self._drains
        device.poll_queue(index)
        self._seen_drains = self._drains
        if self._drains == drains:
            return None  # the transport holds the queue (a disabled vring)
        device.lost_kicks += 1
        return "buffers were made available without a kick: served"

    def _yield(self) -> None:
        """Out of budget: go on at the next loop iteration, so other queues get a turn."""
        if self.yielded:
            return
        self.yielded = True

        def resume() -> None:
            self.yielded = False
            if self.current():
                self.device.poll_queue(self.index)

        self.device.reactor.call_later(0.0, resume)  # type: ignore[union-attr]

    # ---- adaptive polling (the reactor's Poller) ----------------------------------------

    def ready(self) -> bool:
        """A request is in the ring (the reactor polls this; no system call). A stale
        engine (the queue stopped, its memory may be gone) answers True without reading
        the ring, so :meth:`serve` drops it at once."""
        if self.queue.engine is not self or self.ring.broken is not None:
            return True
        return self.ring.pending() != 0

    def serve(self) -> None:
        """The poll found a request: serve it without a kick (the drain polls again)."""
        self._polling = False
        if not self.current():
            return
        self.device.poll_hits += 1
        self._slept_at = 0.0  # the window covered the gap: keep it
        self._drained = False
        self.device.poll_queue(self.index)
        if not self._drained and self.current():
            self.ring.enable_notifications()  # the transport holds the queue: kicks back on

    def expire(self) -> None:
        """The window passed without a request: kicks back on, and look once more (a
        request made available just now sent no kick). The next drain measures the whole
        gap since the completion and tunes the window."""
        self._polling = False
        if not self.current():
            return
        self.device.poll_misses += 1
        if self.ring.enable_notifications():
            self.device.poll_queue(self.index)

    def _tune(self, gap: float, poll_max: float) -> None:
        """The next request came ``gap`` seconds after the last completion, past the
        window: a gap that polling up to ``poll_max`` would have covered grows the window,
        a longer one shrinks it (see the module doc)."""
        self._slept_at = 0.0
        window = self._poll_window
        if gap > poll_max:
            window /= 2
            self._poll_window = window if window >= POLL_START else 0.0
        elif window < poll_max:
            self._poll_window = min(poll_max, max(POLL_START, 2 * window))

    # ---- batch mode ---------------------------------------------------------------------

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
        ring = self.ring
        if not self.current():
            self._batching = False  # a stale engine: the queue stopped or restarted
            return
        now = _monotonic()
        arrived = ring.pending()
        elapsed = now - self._b_start
        if arrived <= _IDLE_TICK:
            self._end_batching(now)
        elif elapsed >= _JUDGE:
            if self._b_count + arrived < _KEEP * self._kick_rate * elapsed:
                self._end_batching(now)
            else:  # kept: judge the next span from here
                self._backoff = _MIN_BACKOFF
                self._b_start = now
                self._b_count = -arrived  # the drain below counts them again
        self._drained = False
        self.device.batch_ticks += 1
        self.device.poll_queue(self.index)
        if not self._drained and self.current():
            # The transport did not let the drain run (a disabled vhost-user vring): leave
            # batch mode with kicks on; re-enabling the vring looks at the ring anyway.
            if self._batching:
                self._end_batching(now)
            ring.enable_notifications()

    def _end_batching(self, now: float) -> None:
        self._batching = False
        self._trial_after = now + self._backoff
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF)
        self._w_start = now
        self._w_count = 0
