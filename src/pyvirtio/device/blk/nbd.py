"""An NBD export as virtio-blk storage, through libnbd's Python bindings, on the event loop.

Targets are libnbd URIs: ``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``
(and the TLS forms ``nbds://``, ``nbds+unix://``). libnbd (Debian ``python3-libnbd``; not on
PyPI) runs the protocol; this module only drives it without blocking: every connection's
socket is watched by the :class:`~pyvirtio.core.reactor.Reactor` in the direction libnbd
asks for (``aio_get_direction``), and ``aio_notify_read`` / ``aio_notify_write`` let libnbd
run when the socket is ready. Requests are started with ``aio_pread`` / ``aio_pwrite`` /
``aio_flush`` / ``aio_trim`` / ``aio_zero`` straight on guest memory (no copy: libnbd takes
the memoryviews) and complete through their completion callbacks, any number in flight.

What the export can do decides what the guest is offered (see :class:`NbdBackend`): FLUSH
only if the server flushes, DISCARD only if it trims, WRITE_ZEROES only if it zeroes, RO if
the export is read-only; the capacity is the export's size. Writethrough writes use FUA
where the server has it, else a flush after the write. With ``connections`` > 1 and a server
that allows multi-conn (so a flush on one connection covers writes on all), queue ``i``
uses connection ``i % connections``; otherwise one connection serves every queue.

Failures, and whose they are:

* The server answers a command with an error: that request alone completes with IOERR.
* The connection is lost (the server died or restarted, the network broke): every command
  in flight on it, and every new one, waits; libnbd is asked to reconnect with a growing
  delay (``RETRY_DELAYS``). When it is back, the waiting commands are issued again (reads
  and writes are idempotent: a write the old server may or may not have done is simply
  done again with the same bytes, which the guest cannot have changed: the request was not
  completed). A request is completed only after the server acknowledged all of it, so
  nothing unacknowledged is ever reported done. If the connection is not back within
  ``reconnect_timeout`` seconds, the waiting requests fail with IOERR (and so do new ones,
  at once, until it is back); reconnecting goes on in the background.
* A write the server acknowledged but had not yet made stable (no FUA, no flush since) is
  the server's to keep: a server that loses such writes when it restarts (a volatile write
  cache) loses them as a disk with a volatile cache loses them in a power cut; the guest's
  own flushes are what it can rely on. nbdkit's file plugin keeps them (the host's page
  cache outlives the nbdkit process).
"""

from __future__ import annotations

import errno
import functools
import importlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from pyvirtio.core.reactor import Reactor, TimerHandle
from pyvirtio.device.blk.backend import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR_SIZE,
    T_DISCARD,
    T_FLUSH,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkBackend,
    BlkRequest,
    Completion,
)
from pyvirtio.errors import LocalError
from pyvirtio.ring.chain import gather, scatter

nbd: Any
try:  # Debian's python3-libnbd (untyped; make deps links it into the project's environment)
    nbd = importlib.import_module("nbd")
except ImportError:  # pragma: no cover - depends on the machine
    nbd = None

log = logging.getLogger("pyvirtio.device.blk.nbd")

#: URI schemes this back-end serves (libnbd parses the rest)
SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")
#: seconds between reconnection attempts: the first ones quick, then every 2 s
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
DEFAULT_RECONNECT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_DRAIN_TIMEOUT = 10.0
#: the largest read or write sent as one command (libnbd refuses more than 64 MiB)
MAX_DATA_REQUEST = 32 << 20
#: the largest trim or zero sent as one command (the wire's length is 32 bits)
MAX_RANGE_REQUEST = 1 << 31

# errors that mean "the connection went away", not "the server refused this command"
_LOST = frozenset({errno.ENOTCONN, errno.ESHUTDOWN})

_READ, _WRITE, _FLUSH, _TRIM, _ZERO = range(5)
_KIND_NAMES = ("read", "write", "flush", "trim", "zero")

# connection states
_CONNECTING, _READY, _DOWN, _CLOSED = range(4)


def is_nbd_target(target: str) -> bool:
    """Whether ``target`` names an NBD export (a URI this back-end serves)."""
    return target.startswith(SCHEMES)


def available() -> bool:
    """Whether libnbd's Python bindings can be imported."""
    return nbd is not None


class NbdUnavailableError(LocalError):
    """libnbd's Python bindings are missing."""


class _Op:
    """One virtio-blk request in progress: its NBD commands (parts) and its outcome.
    ``done(req, status)`` is called once, when every part is answered."""

    __slots__ = ("bounce", "done", "flush_after", "pending", "req", "status")

    def __init__(self, req: Any, done: Callable[[Any, int], None]) -> None:
        self.req = req
        self.done = done
        self.pending = 0
        self.status = S_OK
        self.flush_after = False
        self.bounce: bytearray | None = None  # the data, when the segments cannot be sent


class _Part:
    """One NBD command of a request (re-issued as it is after a reconnection)."""

    __slots__ = ("flags", "kind", "length", "offset", "op", "view")

    def __init__(self, op: _Op, kind: int, offset: int, length: int,
                 view: memoryview | None = None, flags: int = 0) -> None:
        self.op = op
        self.kind = kind
        self.offset = offset
        self.length = length
        self.view = view
        self.flags = flags

    def __repr__(self) -> str:
        return f"{_KIND_NAMES[self.kind]} of {self.length} bytes at offset {self.offset}"


class _Connection:
    """One libnbd handle, its socket on the reactor, and the commands it owes answers to."""

    def __init__(self, backend: NbdBackend, index: int) -> None:
        self.backend = backend
        self.index = index
        self.h: Any = None
        self.fd = -1
        self.direction = 0
        self.state = _DOWN
        self.in_flight: set[_Part] = set()
        self.waiting: deque[_Part] = deque()  # to issue once connected
        self.finished: list[tuple[_Part, int]] = []  # from libnbd's callbacks
        self.down_since: float | None = None
        self.failing = False  # down longer than the bound: new commands fail at once
        self.attempts = 0
        self.timer: TimerHandle | None = None
        self.expiry: TimerHandle | None = None
        self.name = f"{backend.uri} [connection {index}]"
        self.last_error: str | None = None

    # ---- connecting ---------------------------------------------------------------------

    def start_connect(self) -> None:
        """Begin connecting (without blocking); the reactor drives it from here."""
        self.timer = None
        if self.state == _CLOSED:
            return
        self.attempts += 1
        h = self.backend.new_handle(self.index)
        self.h = h
        self.state = _CONNECTING
        try:
            h.aio_connect_uri(self.backend.uri)
        except nbd.Error as exc:
            self._attempt_failed(exc.string)
            return
        self.after()

    def connect_now(self, timeout: float) -> None:
        """Connect, blocking up to ``timeout`` seconds (at start-up, before any request)."""
        self.start_connect()
        deadline = time.monotonic() + timeout
        while self.state == _CONNECTING:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise LocalError(f"{self.backend.uri}: no NBD connection within {timeout} s")
            self.poll(min(left, 1.0))
        if self.state != _READY:
            reason = self.last_error or "connection failed"
            self.close()
            raise LocalError(f"cannot connect to {self.backend.uri}: {reason}")

    def _attempt_failed(self, reason: str | None) -> None:
        self.last_error = reason
        if self.state != _CLOSED:
            self.state = _DOWN
        self._drop_handle()
        if self.state != _CLOSED and self.backend.started:
            self._schedule_retry(reason)

    def _schedule_retry(self, reason: str | None) -> None:
        delay = RETRY_DELAYS[min(self.attempts, len(RETRY_DELAYS) - 1)]
        if self.attempts == 0:
            log.info("%s: reconnecting in %.2f s", self.name, delay)
        elif self.attempts <= 2 or self.attempts % 30 == 0:
            log.info("%s: reconnecting in %.2f s (attempt %d failed: %s)", self.name, delay,
                     self.attempts, reason)
        self.timer = self.backend.reactor.call_later(delay, self.start_connect)

    def _connected(self) -> None:
        b = self.backend
        size = self.h.get_size()
        if b.started and size != b.export_size:
            log.warning("%s: the export is now %d bytes, was %d (the capacity stays)",
                        self.name, size, b.export_size)
        self.state = _READY
        if self.down_since is not None:
            waited = time.monotonic() - self.down_since
            log.warning("%s: reconnected after %.2f s (%d attempt(s)); issuing %d waiting "
                        "command(s) again", self.name, waited, self.attempts,
                        len(self.waiting))
            b.reconnects += 1
        self.down_since = None
        self.failing = False
        self.attempts = 0
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        waiting, self.waiting = self.waiting, deque()
        b.reissued += len(waiting)
        for part in waiting:
            self.issue(part)

    # ---- losing the connection ----------------------------------------------------------

    def lost(self, reason: str) -> None:
        """The connection broke: keep its commands for the next one and reconnect."""
        if self.state == _CLOSED:
            self._drop_handle()
            return
        self.state = _DOWN  # first: what completes meanwhile issues nothing on this handle
        self._drop_handle()
        # libnbd reported the aborted commands (ENOTCONN); any still here go back too.
        self.waiting.extend(self.in_flight)
        self.in_flight.clear()
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s: connection lost (%s); %d command(s) wait for the next one",
                        self.name, reason, len(self.waiting))
            self.expiry = self.backend.reactor.call_later(self.backend.reconnect_timeout,
                                                          self._expire)
        self.attempts = 0
        self._schedule_retry(reason)

    def _expire(self) -> None:
        """Down for longer than the bound: what waits fails, and new commands fail at once
        until the connection is back."""
        self.expiry = None
        if self.state == _READY:
            return
        self.failing = True
        waiting, self.waiting = self.waiting, deque()
        log.error("%s: not back after %.1f s: failing %d waiting command(s) (IOERR); "
                  "still reconnecting", self.name, self.backend.reconnect_timeout,
                  len(waiting))
        for part in waiting:
            self.backend.part_done(part, errno.ETIMEDOUT)

    def _drop_handle(self) -> None:
        """Stop watching the socket and close the handle (libnbd then calls no callback of
        the commands it still held: they stay in :attr:`in_flight`)."""
        self.unwatch()
        h, self.h = self.h, None
        if h is not None:
            self.flush_finished()
            close = getattr(h, "close", None)  # libnbd >= 1.16; before, dropping it closes
            if close is not None:
                close()
            del h

    def close(self) -> None:
        """For good: nothing is re-issued, no callback comes any more."""
        self.state = _CLOSED
        for t in (self.timer, self.expiry):
            if t is not None:
                t.cancel()
        self.timer = self.expiry = None
        self._drop_handle()

    # ---- the socket on the reactor ------------------------------------------------------

    def unwatch(self) -> None:
        if self.fd >= 0:
            reactor = self.backend.reactor
            reactor.remove_reader(self.fd)
            reactor.remove_writer(self.fd)
        self.fd = -1
        self.direction = 0

    def watch(self) -> None:
        """Watch the socket in the direction(s) libnbd wants now."""
        h = self.h
        try:
            fd = h.aio_get_fd()
        except nbd.Error:
            fd = -1  # no socket (dead, or between two addresses)
        direction = h.aio_get_direction() if fd >= 0 else 0
        if fd != self.fd or self.state == _CONNECTING:
            # While connecting libnbd may close the socket and open another, which can get
            # the same number: register afresh (epoll forgot the closed one).
            self.unwatch()
            self.fd = fd
        elif direction == self.direction:
            return
        reactor = self.backend.reactor
        if fd < 0:
            return
        if direction & nbd.AIO_DIRECTION_READ:
            reactor.add_reader(fd, self.on_readable)
        else:
            reactor.remove_reader(fd)
        if direction & nbd.AIO_DIRECTION_WRITE:
            reactor.add_writer(fd, self.on_writable)
        else:
            reactor.remove_writer(fd)
        self.direction = direction

    def on_readable(self) -> None:
        h = self.h
        if h is None:
            return
        try:
            h.aio_notify_read()
        except nbd.Error as exc:
            self.last_error = exc.string
        self.after()

    def on_writable(self) -> None:
        h = self.h
        if h is None:
            return
        try:
            h.aio_notify_write()
        except nbd.Error as exc:
            self.last_error = exc.string
        self.after()

    def poll(self, timeout: float) -> None:
        """Let libnbd wait for its socket itself (start-up, drain, flush at exit)."""
        h = self.h
        if h is None:
            return
        try:
            h.poll(max(int(timeout * 1000), 1))
        except nbd.Error as exc:
            self.last_error = exc.string
        self.after()

    # ---- commands -----------------------------------------------------------------------

    def on_complete(self, part: _Part, err: Any) -> int:
        """libnbd's completion callback: only note it (libnbd is inside a call); it is
        handled by :meth:`after` when that call returns. 1: retire the command."""
        self.finished.append((part, err.value))
        return 1

    def issue(self, part: _Part) -> None:
        """Send one command, or keep it until the connection is back."""
        if self.state != _READY or self.h is None:
            if self.failing:
                self.backend.part_done(part, errno.ETIMEDOUT)
            else:
                self.waiting.append(part)
            return
        h = self.h
        cb = functools.partial(self.on_complete, part)
        self.in_flight.add(part)
        try:
            kind = part.kind
            if kind == _READ:
                h.aio_pread(part.view, part.offset, completion=cb, flags=part.flags)
            elif kind == _WRITE:
                h.aio_pwrite(part.view, part.offset, completion=cb, flags=part.flags)
            elif kind == _FLUSH:
                h.aio_flush(completion=cb)
            elif kind == _TRIM:
                h.aio_trim(part.length, part.offset, completion=cb, flags=part.flags)
            else:
                h.aio_zero(part.length, part.offset, completion=cb, flags=part.flags)
        except nbd.Error as exc:
            # Not queued (libnbd calls no callback): the handle is dead, or it refused the
            # command itself (bounds, alignment, size).
            self.in_flight.discard(part)
            if h.aio_is_dead() or h.aio_is_closed():
                self.waiting.append(part)
                self.last_error = exc.string
            else:
                log.warning("%s: libnbd refused the %r: %s", self.name, part, exc.string)
                self.backend.part_done(part, exc.errnum or errno.EIO)
        self.after()

    def flush_finished(self) -> None:
        """Handle what libnbd's callbacks reported."""
        finished = self.finished
        while finished:
            batch = finished[:]
            finished.clear()
            backend = self.backend
            for part, error in batch:
                self.in_flight.discard(part)
                if error in _LOST and self.state != _CLOSED:
                    self.waiting.append(part)  # the connection went away: issue it again
                else:
                    backend.part_done(part, error)

    def after(self) -> None:
        """After every call into libnbd: handle completions, notice a lost connection or a
        finished connect, and watch the socket the way libnbd now wants."""
        h = self.h
        if h is None:
            self.flush_finished()
            return
        if self.state == _CONNECTING:
            if h.aio_is_connecting():
                self.watch()
                return
            if h.aio_is_ready() or h.aio_is_processing():
                self.watch()
                self._connected()
                return
            self._attempt_failed(self.last_error or "connection failed")
            return
        self.flush_finished()
        if self.state != _READY:
            return
        if h.aio_is_dead() or h.aio_is_closed():
            self.lost(self.last_error or "the server closed the connection")
            return
        if self.waiting:
            # ESHUTDOWN from a live connection: the server is going away; start afresh.
            self.lost("the server is shutting down")
            return
        self.watch()


class NbdBackend(BlkBackend):
    """The NBD export at ``uri`` (see the module doc), driven on ``reactor``.

    Connects at once (blocking up to ``connect_timeout`` s; a server that cannot be reached
    raises :class:`~pyvirtio.errors.LocalError`) and learns the export's size and
    capabilities: :attr:`read_only`, :attr:`supports_flush`, :attr:`supports_discard`,
    :attr:`supports_write_zeroes`, FUA, multi-conn, block sizes. ``connections``: how many
    connections to open if the server allows multi-conn (one per queue is the useful
    number). ``reconnect_timeout``: how long requests wait for a lost connection.
    Counters: :attr:`reconnects`, :attr:`reissued` (commands issued again after a
    reconnection), :attr:`server_errors` (commands the server failed), :attr:`expired`
    (commands failed because the connection was not back in time).
    """

    asynchronous = True

    def __init__(self, uri: str, reactor: Reactor, *, connections: int = 1,
                 read_only: bool = False,
                 reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        if nbd is None:
            raise NbdUnavailableError(
                "libnbd's Python bindings are missing (Debian package python3-libnbd; "
                "make deps links them into the project's environment)")
        if not is_nbd_target(uri):
            raise LocalError(f"{uri!r} is not an NBD URI ({', '.join(SCHEMES)})")
        if connections < 1:
            raise LocalError(f"connections must be at least 1, not {connections}")
        self.uri = uri
        self.reactor = reactor
        self.reconnect_timeout = reconnect_timeout
        self.drain_timeout = drain_timeout
        self.started = False
        self.reconnects = 0
        self.reissued = 0
        self.server_errors = 0
        self.expired = 0
        first = _Connection(self, 0)
        self._conns = [first]
        first.connect_now(connect_timeout)
        try:
            h = first.h
            self.export_size = h.get_size()
            self.read_only = read_only or bool(h.is_read_only())
            self.supports_flush = bool(h.can_flush())
            self.supports_discard = self.can_discard = bool(h.can_trim()) and \
                not self.read_only
            self.supports_write_zeroes = bool(h.can_zero()) and not self.read_only
            self.can_fua = bool(h.can_fua())
            self.multi_conn = bool(h.can_multi_conn())
            minimum = h.get_block_size(nbd.SIZE_MINIMUM)
            #: what the server requires of every command's offset and length (1: nothing)
            self.block_minimum = max(minimum, 1)
            preferred = h.get_block_size(nbd.SIZE_PREFERRED)
            maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
            self.block_size = _power_of_two_at_least(max(minimum, SECTOR_SIZE), "minimum",
                                                     uri)
            self.physical_block_size = min(max(_floor_power_of_two(preferred),
                                               self.block_size), 64 << 10)
            self.max_data = MAX_DATA_REQUEST if maximum <= 0 else \
                max(min(maximum, MAX_DATA_REQUEST) // self.block_size, 1) * self.block_size
            want = connections if self.multi_conn else 1
            if connections > 1 and not self.multi_conn:
                log.info("%s: the server does not allow multi-conn: one connection serves "
                         "every queue", uri)
            for i in range(1, want):
                conn = _Connection(self, i)
                self._conns.append(conn)
                conn.connect_now(connect_timeout)
        except BaseException:
            self.close()
            raise
        self.started = True
        log.info("%s: %d bytes, %s, %d connection(s); flush %s, trim %s, zero %s, fua %s, "
                 "multi-conn %s", uri, self.export_size,
                 "read-only" if self.read_only else "read-write", len(self._conns),
                 *("yes" if x else "no" for x in (self.supports_flush, self.supports_discard,
                                                   self.supports_write_zeroes, self.can_fua,
                                                   self.multi_conn)))

    def new_handle(self, index: int) -> Any:
        h = nbd.NBD()
        h.set_handle_name(f"pyvirtio-{index}")
        # Guest buffers are filled by the server; libnbd need not zero them first.
        h.set_pread_initialize(False)
        return h

    def __repr__(self) -> str:
        return f"NbdBackend({self.uri!r}, {'ro' if self.read_only else 'rw'})"

    @property
    def connections(self) -> int:
        return len(self._conns)

    def counters(self) -> dict[str, int]:
        """For ``--stats-file``: reconnections, re-issued and failed commands."""
        return {"connections": len(self._conns), "reconnects": self.reconnects,
                "reissued": self.reissued, "server_errors": self.server_errors,
                "expired": self.expired}

    @property
    def size(self) -> int:
        return self.export_size - self.export_size % self.block_size

    # ---- requests -----------------------------------------------------------------------

    def submit(self, req: BlkRequest, done: Completion) -> None:
        op = _Op(req, done)
        parts: list[_Part] = []
        rtype = req.type
        sync = req.sync
        fua = nbd.CMD_FLAG_FUA if sync and self.can_fua else 0
        if rtype == T_IN or rtype == T_OUT:
            views = req.data
            align = self.block_minimum
            if align > 1 and any(len(v) % align for v in views):
                # A server with a minimum block size refuses the guest's odd segments as
                # commands of their own: the data goes through one buffer (one copy).
                op.bounce = bytearray(gather(views)) if rtype == T_OUT else \
                    bytearray(req.length)
                views = [memoryview(op.bounce)]
            if rtype == T_IN:
                self._split(op, _READ, req.offset, views, 0, parts)
            else:
                self._split(op, _WRITE, req.offset, views, fua, parts)
        elif rtype == T_FLUSH:
            if self.supports_flush:
                parts.append(_Part(op, _FLUSH, 0, 0))
            sync = False
        elif rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
            discard = rtype == T_DISCARD
            if not (self.supports_discard if discard else self.supports_write_zeroes):
                done(req, S_UNSUPP)
                return
            for offset, length, unmap in req.ranges or ():
                flags = fua if discard or unmap else fua | nbd.CMD_FLAG_NO_HOLE
                pos, end = offset, offset + length
                while pos < end:
                    n = min(end - pos, MAX_RANGE_REQUEST)
                    parts.append(_Part(op, _TRIM if discard else _ZERO, pos, n,
                                       flags=flags))
                    pos += n
        else:
            done(req, S_UNSUPP)
            return
        op.flush_after = sync and not fua and self.supports_flush
        if not parts:
            self._finish(op)
            return
        op.pending = len(parts)
        conns = self._conns
        conn = conns[req.queue % len(conns)]
        for part in parts:
            conn.issue(part)

    def _split(self, op: _Op, kind: int, offset: int, views: Sequence[memoryview],
               flags: int, parts: list[_Part]) -> None:
        """One command per data segment (no copy), none longer than the server takes."""
        limit = self.max_data
        for view in views:
            n = len(view)
            if n <= limit:
                parts.append(_Part(op, kind, offset, n, view, flags))
            else:
                for pos in range(0, n, limit):
                    piece = view[pos : pos + limit]
                    parts.append(_Part(op, kind, offset + pos, len(piece), piece, flags))
            offset += n

    def part_done(self, part: _Part, error: int) -> None:
        """A command finished (``error``: 0, an errno from the server, ETIMEDOUT: the
        connection was not back in time, ECANCELED: dropped at a device reset)."""
        op = part.op
        part.view = None
        if error:
            if error == errno.ETIMEDOUT:
                self.expired += 1
            elif error != errno.ECANCELED:
                self.server_errors += 1
                log.warning("%s: %r failed: %s", self.uri, part, os.strerror(error))
            op.status = S_IOERR
        op.pending -= 1
        if op.pending == 0:
            if op.flush_after and op.status == S_OK:
                op.flush_after = False
                op.pending = 1
                conns = self._conns
                conns[op.req.queue % len(conns)].issue(_Part(op, _FLUSH, 0, 0))
                return
            self._finish(op)

    def _finish(self, op: _Op) -> None:
        if op.bounce is not None:
            if op.status == S_OK and op.req.type == T_IN:
                scatter(op.req.data, op.bounce)
            op.bounce = None
        op.done(op.req, op.status)

    # ---- the synchronous interface ------------------------------------------------------

    def _wait(self, until: Callable[[], bool], timeout: float) -> bool:
        """Let libnbd run on the ready connections until ``until()`` or the time is out."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready = [c for c in self._conns if c.state == _READY and c.in_flight]
            if not ready:
                return until()
            for conn in ready:
                conn.poll(min(left, 0.05) if len(ready) > 1 else min(left, 1.0))
        return True

    def drain(self) -> None:
        """Device reset: wait (up to ``drain_timeout`` s) for the commands in flight; what
        is still waiting for a reconnection, or still in flight then, is dropped (its
        completion would go to a ring that no longer exists) and libnbd lets go of its guest
        memory."""
        conns = self._conns
        self._wait(lambda: not any(c.in_flight for c in conns if c.state == _READY),
                   self.drain_timeout)
        for conn in conns:
            dropped = list(conn.waiting) + list(conn.in_flight)
            if conn.in_flight and conn.state == _READY:
                log.warning("%s: %d command(s) still in flight at a device reset after "
                            "%.1f s: reconnecting without them", conn.name,
                            len(conn.in_flight), self.drain_timeout)
                conn.in_flight.clear()
                conn.lost("device reset")
            conn.waiting.clear()
            conn.in_flight.clear()
            for part in dropped:
                self.part_done(part, errno.ECANCELED)

    def flush(self) -> None:
        """Make every acknowledged write stable now (the CLI's flush at exit): a flush on
        every connection (one is enough with multi-conn), waited for."""
        if not self.supports_flush or self.read_only:
            return
        statuses: list[int] = []

        def note(_req: object, status: int) -> None:
            statuses.append(status)

        conns = self._conns[:1] if self.multi_conn else self._conns
        for conn in conns:
            if conn.state != _READY:
                raise OSError(errno.ENOTCONN, f"{conn.name}: not connected")
            op = _Op(None, note)
            op.pending = 1
            conn.issue(_Part(op, _FLUSH, 0, 0))
        if not self._wait(lambda: len(statuses) >= len(conns), self.drain_timeout):
            raise OSError(errno.ETIMEDOUT, f"{self.uri}: flush not answered")
        if any(status != S_OK for status in statuses):
            raise OSError(errno.EIO, f"{self.uri}: flush failed")

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


def _power_of_two_at_least(n: int, what: str, uri: str) -> int:
    p = 1 << (n - 1).bit_length()
    if p > 64 << 10:
        raise LocalError(f"{uri}: the server's {what} block size {n} is above 64 KiB")
    return p


def _floor_power_of_two(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0
