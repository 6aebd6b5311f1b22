"""A small single-threaded event loop over epoll.

It implements :class:`pyvirtio.core.reactor.Reactor` for devices, and runs vhost-user
servers. Callbacks run one at a time; an exception escaping a callback is logged and the loop
keeps serving (one misbehaving connection must not stop the others). SIGINT/SIGTERM stop
``run()`` cleanly when installed with :meth:`EventLoop.stop_on_signals`.

File descriptors epoll refuses (EPERM: regular files and /dev/null, say a console's stdin
redirected from a file) are handled here, once for every user of the loop. A caller that
watches a host file of its own passes ``allow_files=True``: such an fd is then reported
always ready, as poll(2) and select(2) do, so its callback runs at every turn of the loop
(which then does not sleep) until it is removed; a reader finds its data or end of file at
once. Without it (fds a peer sent, which must be eventfds, pipes or sockets) registering
such an fd raises PermissionError, as epoll does.

Two things spare the data path system calls:

* **coalescing** (:meth:`EventLoop.coalesce`): while the loop dispatches an epoll wake-up
  that found several fds ready, an action asked for several times under the same key (a
  vring's call eventfd written after each of several drains) runs once, at the end of that
  dispatch. Outside such a dispatch (one ready fd, a timer, a poller) nothing is deferred.
* **adaptive polling** (:meth:`EventLoop.arm_poller`): a device queue that has just
  completed a request may ask to be looked at for a short window before the loop sleeps;
  the loop then checks it (a read of shared memory, no system call) until work arrives or
  the window passes (:class:`pyvirtio.core.reactor.Poller`). The loop does not block while
  a poller is armed; other fds are looked at (without sleeping) between windows.

:attr:`EventLoop.waits` counts the epoll waits (system calls) the loop made, so a
benchmark can tell system calls per request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable

from pyvirtio.core.reactor import Poller

log = logging.getLogger("pyvirtio.io.loop")

Callback = Callable[[], None]


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


_CLOCK_MONOTONIC = 1
_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK | TFD_CLOEXEC have these values


def _load_timerfd() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """libc's timerfd_create and timerfd_settime (Python has them only from 3.13), or None
    where they are missing (the loop then falls back to re-armed one-shot timers)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError, TypeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                        ctypes.c_void_p]
    return create, settime


_timerfd = _load_timerfd()


class PeriodicTimer:
    """A callback run every ``interval`` seconds until cancelled (:meth:`EventLoop.call_every`).

    Backed by a timerfd the kernel re-arms itself: a loop woken thousands of times a second
    (a vhost-user server at queue depth 1) then sleeps in epoll_wait without a timeout and
    pays nothing per wake-up for a watchdog that fires four times a second. (A one-shot
    timer makes every sleep arm and cancel a kernel timer, measured at ~5 us of system time
    per request here.)
    """

    __slots__ = ("_fallback", "_loop", "callback", "cancelled", "fd", "interval")

    def __init__(self, loop: EventLoop, interval: float, callback: Callback) -> None:
        self._loop = loop
        self.interval = interval
        self.callback = callback
        self.cancelled = False
        self.fd = -1
        self._fallback: Timer | None = None
        if _timerfd is not None:
            create, settime = _timerfd
            fd = create(_CLOCK_MONOTONIC, _TFD_FLAGS)
            if fd >= 0:
                sec, frac = divmod(interval, 1.0)
                ts = _Timespec(int(sec), int(frac * 1e9))
                if settime(fd, 0, ctypes.byref(_Itimerspec(ts, ts)), None) == 0:
                    self.fd = fd
                    loop.add_reader(fd, self._expired)
                    return
                os.close(fd)
        self._fallback = loop.call_later(interval, self._again)

    def _expired(self) -> None:
        try:
            os.read(self.fd, 8)  # the expiry count: what it says is not needed
        except BlockingIOError:
            return
        self.callback()

    def _again(self) -> None:
        if not self.cancelled:
            self._fallback = self._loop.call_later(self.interval, self._again)
            self.callback()

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if self._fallback is not None:
            self._fallback.cancel()


_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EPOLLET = select.EPOLLET


class EventLoop:
    def __init__(self) -> None:
        # epoll directly rather than through ``selectors``: the vhost-user data path wakes
        # up once per request at queue depth 1, and the selector's per-event bookkeeping
        # was a measurable share of the back-end's CPU time per request.
        self._epoll = select.epoll()
        self._registered: dict[int, int] = {}  # fd -> epoll event mask
        self._edge: set[int] = set()  # readers watched edge-triggered
        self._unpollable: set[int] = set()  # registered fds epoll refused: always ready
        self._allow_files: set[int] = set()  # fds whose owner accepts always-ready files
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._drain_wake)
        self._old_handlers: dict[int, object] = {}
        self.stop_reason: str | None = None
        self._dispatching = False
        self._deferred: dict[int, Callable[[int], None]] = {}  # key -> action(key)
        self._pollers: list[tuple[Poller, float]] = []  # armed: (poller, deadline)
        #: epoll waits made (each one system call), for counting system calls per request
        self.waits = 0
        #: actions :meth:`coalesce` merged into one already pending
        self.coalesced = 0

    # ---- Reactor ------------------------------------------------------------------------

    def time(self) -> float:
        return time.monotonic()

    def _update(self, fd: int) -> None:
        events = (_EPOLLIN if fd in self._readers else 0) | (
            _EPOLLOUT if fd in self._writers else 0
        )
        if events & _EPOLLIN and fd in self._edge:
            events |= _EPOLLET
        current = self._registered.get(fd)
        if events == 0:
            if current is not None:
                del self._registered[fd]
                self._allow_files.discard(fd)
                if fd in self._unpollable:
                    self._unpollable.discard(fd)
                    return
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # already closed: the kernel dropped it from the epoll set
        elif current is None:
            try:
                self._epoll.register(fd, events)
            except PermissionError:
                # epoll refuses regular files and /dev/null: they never block, so they
                # are always ready (what poll(2) says of them).
                if fd not in self._allow_files:
                    # a peer's fd: refuse it, and leave nothing of it behind
                    self._readers.pop(fd, None)
                    self._writers.pop(fd, None)
                    self._edge.discard(fd)
                    raise
                log.info("fd %d cannot be watched by epoll (a regular file or /dev/null): "
                         "it counts as always ready", fd)
                self._unpollable.add(fd)
            self._registered[fd] = events
        elif current != events:
            if fd not in self._unpollable:
                self._epoll.modify(fd, events)
            self._registered[fd] = events

    def _poll(self) -> list[tuple[int, int]]:
        """epoll's ready list plus the always-ready fds epoll refused (no sleep then)."""
        self.waits += 1
        ready = self._epoll.poll(0)
        registered = self._registered
        ready += [(fd, registered[fd]) for fd in self._unpollable]
        return ready

    def add_reader(self, fd: int, callback: Callback, *, edge: bool = False,
                   allow_files: bool = False) -> None:
        """Call ``callback`` when ``fd`` is readable. ``edge``: only when it *becomes*
        readable (EPOLLET), so the callback need not drain it: for an eventfd every write is
        such an event, which spares the data path a read per notification. ``allow_files``:
        a regular file or /dev/null (which epoll refuses) counts as always readable."""
        if allow_files:
            self._allow_files.add(fd)
        self._readers[fd] = callback
        if edge:
            self._edge.add(fd)
        else:
            self._edge.discard(fd)
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._edge.discard(fd)
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback, *, allow_files: bool = False) -> None:
        """Call ``callback`` when ``fd`` is writable (``allow_files``: as for readers)."""
        if allow_files:
            self._allow_files.add(fd)
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(self.time() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_every(self, interval: float, callback: Callback) -> PeriodicTimer:
        """Call ``callback`` every ``interval`` seconds until the handle is cancelled
        (see :class:`PeriodicTimer`: free for the wake-ups in between)."""
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval}")
        return PeriodicTimer(self, interval, callback)

    def call_soon(self, callback: Callback) -> Timer:
        return self.call_later(0.0, callback)

    def coalesce(self, key: int, action: Callable[[int], None]) -> bool:
        """Run ``action(key)`` once at the end of the dispatch under way, however often it
        is asked for with this ``key`` meanwhile; True if deferred. False when the loop is
        not dispatching a wake-up of several ready fds (one ready fd, a timer, a poller, a
        caller outside the loop): nothing is deferred, the caller acts now."""
        if not self._dispatching:
            return False
        if key in self._deferred:
            self.coalesced += 1
        self._deferred[key] = action
        return True

    def forget_coalesced(self, key: int) -> None:
        """Drop the action deferred under ``key`` (its fd is being closed)."""
        self._deferred.pop(key, None)

    def arm_poller(self, poller: Poller, window: float) -> None:
        """Look at ``poller`` (see :class:`pyvirtio.core.reactor.Poller`) for up to
        ``window`` seconds before the loop next sleeps."""
        self._pollers.append((poller, time.monotonic() + window))

    def _spin(self) -> None:
        """Look at the armed pollers until each has work (served) or its window passed
        (expired). Pollers armed meanwhile (a served queue asking again) wait for the next
        turn of the loop, so other fds are looked at in between."""
        armed, self._pollers = self._pollers, []
        now = time.monotonic()
        while armed:
            if self._stopping:
                for poller, _ in armed:
                    self._run_callback(poller.expire)
                return
            for i in range(len(armed) - 1, -1, -1):
                poller, deadline = armed[i]
                if poller.ready():
                    del armed[i]
                    self._run_callback(poller.serve)
                elif now >= deadline:
                    del armed[i]
                    self._run_callback(poller.expire)
            now = time.monotonic()

    # ---- running ------------------------------------------------------------------------

    def stop(self, reason: str = "stopped") -> None:
        """Make ``run()`` return after the current callback (safe from signal handlers and
        other threads)."""
        self._stopping = True
        self.stop_reason = reason
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed (the loop is gone)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def stop_on_signals(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """Stop the loop on these signals (main thread only). Idempotent: a second call
        keeps the handlers :meth:`close` restores."""
        for sig in signals:
            if sig in self._old_handlers:
                continue
            self._old_handlers[sig] = signal.signal(
                sig, lambda s, _f: self.stop(f"signal {signal.Signals(s).name}")
            )

    def _run_callback(self, cb: Callback) -> None:
        try:
            cb()
        except Exception:
            log.exception("callback %r failed; the loop keeps running", cb)

    def run_once(self, timeout: float | None = None) -> None:
        """Wait for events or the next timer (at most ``timeout`` s) and dispatch them."""
        timers = self._timers
        if self._pollers:
            self._spin()
            if self._pollers:
                timeout = 0.0  # armed again: look at the fds without sleeping
        if timers:
            delay = max(0.0, timers[0][0] - self.time())
            timeout = delay if timeout is None else min(timeout, delay)
        if self._unpollable:
            self._dispatch(self._poll())
        else:
            self.waits += 1
            self._dispatch(self._epoll.poll(-1 if timeout is None else timeout))
        if timers:
            self._fire_due_timers()

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> None:
        """Serve until :meth:`stop`, until ``until()`` is true, or ``timeout`` seconds.

        A :meth:`stop` that came before ``run()`` (a signal between installing the handlers
        and starting the loop) is pending, not forgotten: ``run()`` returns at once. Each
        stop is consumed by the ``run()`` it ends, so the loop can be run again after it.
        """
        if until is None and timeout is None:
            self._run_forever()
        else:
            deadline = None if timeout is None else self.time() + timeout
            while not self._stopping:
                if until is not None and until():
                    return
                wait = None if deadline is None else deadline - self.time()
                if wait is not None and wait <= 0:
                    return
                self.run_once(1.0 if wait is None else min(wait, 1.0))
        # Consumed only here, after the loop saw it: clearing the flag on entry instead
        # wiped a stop requested just before run() (issue 9: a lost SIGTERM).
        self._stopping = False

    def _run_forever(self) -> None:
        # A busy vhost-user server goes round this loop once per wake-up, so what can be
        # hoisted out of it is.
        poll = self._epoll.poll
        dispatch = self._dispatch
        timers = self._timers
        unpollable = self._unpollable
        monotonic = time.monotonic
        while not self._stopping:
            # No timer: sleep without a timeout (stop() and signals wake the poll), which
            # spares arming and cancelling a kernel timer at every wake-up. A transport's
            # watchdog keeps a timer armed all the time, so the timer checks are written
            # inline: a wake-up per request must not pay for them in calls.
            timeout = -1.0
            if self._pollers:
                self._spin()
                if self._pollers:
                    timeout = 0.0  # armed again: look at the fds without sleeping
            if timers and timeout:
                timeout = timers[0][0] - monotonic()
                if timeout < 0.0:
                    timeout = 0.0
            if unpollable:
                dispatch(self._poll())
            else:
                self.waits += 1
                dispatch(poll(timeout))
            if timers and timers[0][0] <= monotonic():
                self._fire_due_timers()

    def _dispatch(self, ready: list[tuple[int, int]]) -> None:
        """Call the reader and/or writer of every ready fd; hang-ups and errors wake both
        directions, as ``selectors`` does."""
        readers = self._readers
        writers = self._writers
        if len(ready) < 2:
            # One ready fd (a kick at queue depth 1): nothing to merge its actions with, so
            # the deferral's bookkeeping is spared.
            self._dispatch_ready(ready, readers, writers)
            return
        self._dispatching = True
        try:
            self._dispatch_ready(ready, readers, writers)
        finally:
            self._dispatching = False
            deferred = self._deferred
            while deferred:
                key, action = deferred.popitem()
                try:
                    action(key)
                except Exception:
                    log.exception("deferred action %r failed; the loop keeps running", action)

    def _dispatch_ready(self, ready: list[tuple[int, int]], readers: dict[int, Callback],
                        writers: dict[int, Callback]) -> None:
        for fd, events in ready:
            if events & ~_EPOLLOUT:
                cb = readers.get(fd)
                if cb is not None:
                    try:
                        cb()
                    except Exception:
                        log.exception("callback %r failed; the loop keeps running", cb)
            if events & ~_EPOLLIN:
                cb = writers.get(fd)
                if cb is not None:
                    self._run_callback(cb)

    def _fire_due_timers(self) -> None:
        timers = self._timers
        now = self.time()
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                self._run_callback(timer.callback)

    def close(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()
        self._epoll.close()
        self._registered.clear()
        self._edge.clear()
        self._unpollable.clear()
        self._allow_files.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._readers.clear()
        self._writers.clear()
        self._timers.clear()
        self._pollers.clear()
        self._deferred.clear()
