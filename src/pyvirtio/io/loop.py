"""A small single-threaded event loop over epoll.

It implements :class:`pyvirtio.core.reactor.Reactor` for devices, and runs vhost-user
servers. Callbacks run one at a time; an exception escaping a callback is logged and the loop
keeps serving (one misbehaving connection must not stop the others). SIGINT/SIGTERM stop
``run()`` cleanly when installed with :meth:`EventLoop.stop_on_signals`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable

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
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wake_r, self._drain_wake)
        self._old_handlers: dict[int, object] = {}
        self.stop_reason: str | None = None

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
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # already closed: the kernel dropped it from the epoll set
        elif current is None:
            self._epoll.register(fd, events)
            self._registered[fd] = events
        elif current != events:
            self._epoll.modify(fd, events)
            self._registered[fd] = events

    def add_reader(self, fd: int, callback: Callback, *, edge: bool = False) -> None:
        """Call ``callback`` when ``fd`` is readable. ``edge``: only when it *becomes*
        readable (EPOLLET), so the callback need not drain it: for an eventfd every write is
        such an event, which spares the data path a read per notification."""
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

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(self.time() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon(self, callback: Callback) -> Timer:
        return self.call_later(0.0, callback)

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
        if timers:
            delay = max(0.0, timers[0][0] - self.time())
            timeout = delay if timeout is None else min(timeout, delay)
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
        while not self._stopping:
            # No timer: sleep without a timeout (stop() and signals wake the poll), which
            # spares arming and cancelling a kernel timer at every wake-up.
            timeout = -1.0
            if timers:
                timeout = max(0.0, timers[0][0] - self.time())
            dispatch(poll(timeout))
            if timers:
                self._fire_due_timers()

    def _dispatch(self, ready: list[tuple[int, int]]) -> None:
        """Call the reader and/or writer of every ready fd; hang-ups and errors wake both
        directions, as ``selectors`` does."""
        readers = self._readers
        writers = self._writers
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
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._readers.clear()
        self._writers.clear()
        self._timers.clear()
