"""A Ceph RBD image as virtio-blk storage, through librbd's Python bindings (Debian
``python3-rbd``), asynchronously: ``pyvirtio serve blk rbd:POOL/IMAGE[@CONF]``.

Every request becomes librbd asynchronous calls (``aio_read``, ``aio_write``, ``aio_flush``,
``aio_discard``, ``aio_write_zeroes``), many in flight at once. librbd completes them on its
own threads and offers no pollable descriptor, so the hand-over to the event loop is ours:

* On a librbd thread, the completion callback does exactly two things: append
  ``(operation, return value, data)`` to a :class:`collections.deque` (its ``append`` and
  ``popleft`` are atomic) and write 1 to an eventfd.
* The event loop watches the eventfd; on the loop's thread :meth:`RbdBackend._on_event`
  pops every completion, copies read data into guest memory, writes status bytes and
  pushes used entries (through the device's ``done`` callback).

Why guest memory and rings are never touched from another thread: librbd never sees guest
memory at all. A write's data is gathered into a private ``bytes`` object on the loop thread
before ``aio_write`` (a guest changing its buffer while the write runs cannot tear what
librbd stores, and librbd cannot write into the guest); a read lands in the ``bytes`` buffer
the binding allocates for it, copied into the guest's buffers on the loop thread when the
completion is processed. The cost is one copy per request, which librbd makes anyway
(``rbd_disable_zero_copy_writes`` is on by default). A completion that arrives after the
device gave up waiting for it (:meth:`drain`'s bound) is dropped on the loop thread without
touching anything: nothing outlives a reset except a private buffer.

Errors: a failed librbd call (at submission or in its completion) answers IOERR for that
request only, logged with the image, the operation, the range and the error, and counted
in :attr:`RbdBackend.errors`; the back-end keeps serving. A write in writethrough mode
(``req.sync``) is followed by ``aio_flush`` before it completes.
"""

from __future__ import annotations

import collections
import errno
import importlib
import logging
import os
import select
import time
from collections.abc import Callable
from typing import Any

from pyvirtio.core.reactor import Reactor
from pyvirtio.device.blk.backend import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkBackend,
    BlkRequest,
    Completion,
    _type_name,
)
from pyvirtio.errors import LocalError
from pyvirtio.ring.chain import gather, scatter

log = logging.getLogger("pyvirtio.device.blk.rbd")

PREFIX = "rbd:"
#: how long :meth:`RbdBackend.drain` waits for librbd before giving up on what is in flight
DRAIN_TIMEOUT = 60.0


def _bindings() -> tuple[Any, Any]:
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as exc:
        raise LocalError(f"librbd's Python bindings are missing ({exc}): install the Debian "
                         "package python3-rbd (make deps links it into the venv)") from exc


def parse_target(target: str) -> tuple[str, str | None, str, str | None]:
    """``rbd:POOL/IMAGE[@CONF]`` (or ``rbd:POOL/NAMESPACE/IMAGE[@CONF]``) as ``(pool,
    namespace, image, conf)``; LocalError for anything else."""
    if not target.startswith(PREFIX):
        raise LocalError(f"{target!r} is not an RBD target (rbd:POOL/IMAGE[@CONF])")
    spec, _, conf = target[len(PREFIX):].partition("@")
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise LocalError(f"{target!r}: expected rbd:POOL/IMAGE[@CONF] or "
                         "rbd:POOL/NAMESPACE/IMAGE[@CONF]")
    namespace = parts[1] if len(parts) == 3 else None
    return parts[0], namespace, parts[-1], conf or None


class _Op:
    """One guest request on its way through librbd (loop-thread state only, except that
    librbd threads hold a reference until their callback ran)."""

    __slots__ = ("abandoned", "done", "error", "flushing", "pending", "read_data", "req")

    def __init__(self, req: BlkRequest, done: Completion) -> None:
        self.req = req
        self.done = done
        self.pending = 0  # librbd calls not completed yet
        self.error: str | None = None  # the first failure, described
        self.read_data: bytes | None = None
        self.flushing = False  # the writethrough flush after a modification is running
        self.abandoned = False  # drain gave up on it: its completion only gets dropped


class RbdBackend(BlkBackend):
    """The RBD image ``image`` in ``pool`` (optionally in ``namespace``) of the cluster that
    ``conf`` describes (None: librados' default search, ``/etc/ceph/ceph.conf``...).

    Needs an event loop (``reactor``, or :meth:`attach` before the first request). The
    capacity is the image's size; a resize shows up through :meth:`refresh_size`. Open
    failures (no cluster, no pool, no image) raise LocalError naming the target."""

    asynchronous = True
    can_discard = True

    def __init__(self, pool: str, image: str, *, conf: str | None = None,
                 namespace: str | None = None, read_only: bool = False,
                 reactor: Reactor | None = None, connect_timeout: float = 30.0) -> None:
        rados, rbd = _bindings()
        self._rbd = rbd
        self.pool = pool
        self.namespace = namespace
        self.image_name = image
        self.name = f"{pool}/{namespace + '/' if namespace else ''}{image}"
        self.read_only = read_only
        self.can_discard = not read_only
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        self._efd = -1
        self._reactor: Reactor | None = None
        #: completions handed over by librbd threads: (op, return value, read data)
        self._completed: collections.deque[tuple[_Op, int, bytes | None]] = \
            collections.deque()
        self._in_flight: set[_Op] = set()
        #: every failure, described ("read of rbd:pool/disk at 4096+512 failed: ..."),
        #: the newest last (at most 100)
        self.errors: list[str] = []
        self.submitted = 0  # guest requests handed to librbd
        self.flushes = 0  # aio_flush calls (guest flushes and writethrough flushes)
        try:
            try:
                self._cluster = rados.Rados(conffile=conf or "")
                self._cluster.connect(timeout=int(connect_timeout))
            except rados.Error as exc:
                raise LocalError(f"rbd:{self.name}: cannot reach the Ceph cluster"
                                 f"{' of ' + conf if conf else ''}: {exc}") from exc
            try:
                self._ioctx = self._cluster.open_ioctx(pool)
                if namespace:
                    self._ioctx.set_namespace(namespace)
                self._image = rbd.Image(self._ioctx, image, read_only=read_only)
            except (rados.Error, rbd.Error) as exc:
                raise LocalError(f"rbd:{self.name}: cannot open the image: {exc}") from exc
            self._size = int(self._image.size())
            self._write_zeroes = getattr(self._image, "aio_write_zeroes", None)
            self._thick = int(getattr(rbd, "RBD_WRITE_ZEROES_FLAG_THICK_PROVISION", 0))
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            self.close()
            raise
        if reactor is not None:
            self.attach(reactor)

    @classmethod
    def from_target(cls, target: str, **kwargs: Any) -> RbdBackend:
        """The back-end for ``rbd:POOL/IMAGE[@CONF]`` (see :func:`parse_target`)."""
        pool, namespace, image, conf = parse_target(target)
        return cls(pool, image, conf=conf, namespace=namespace, **kwargs)

    def __repr__(self) -> str:
        return f"RbdBackend({self.name!r}, {'ro' if self.read_only else 'rw'})"

    # ---- the event loop -----------------------------------------------------------------

    def attach(self, reactor: Reactor) -> None:
        """Take completions on ``reactor``'s thread (the thread that owns the rings)."""
        if self._reactor is not None:
            self._reactor.remove_reader(self._efd)
        self._reactor = reactor
        reactor.add_reader(self._efd, self._on_event)

    def _callback(self, op: _Op) -> Callable[..., None]:
        completed = self._completed
        efd = self._efd

        # Runs on a librbd thread: hand over, nothing else (see the module docstring).
        def oncomplete(completion: Any, data: bytes | None = None) -> None:
            completed.append((op, completion.get_return_value(), data))
            try:
                os.eventfd_write(efd, 1)
            except OSError:
                pass  # saturated (a wake-up is pending) or closed (the back-end is gone)

        return oncomplete

    def _on_event(self) -> None:
        """On the loop thread: finish what librbd completed."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        completed = self._completed
        while completed:
            op, ret, data = completed.popleft()
            self._completion(op, ret, data)

    # ---- submission -----------------------------------------------------------------------

    def submit(self, req: BlkRequest, done: Completion) -> None:
        if self._reactor is None:
            raise LocalError(f"{self!r}: no event loop attached (pass reactor= or call "
                             "attach())")
        op = _Op(req, done)
        self._in_flight.add(op)
        self.submitted += 1
        rtype = req.type
        if rtype == T_IN:
            self._call(op, "read", req.offset, req.length,
                       self._image.aio_read, req.offset, req.length)
        elif rtype == T_OUT:
            data = gather(req.data)  # private copy: librbd never sees guest memory
            self._call(op, "write", req.offset, req.length,
                       self._image.aio_write, data, req.offset)
        elif rtype == T_FLUSH:
            self._call(op, "flush", 0, 0, self._image.aio_flush)
        elif rtype == T_DISCARD:
            for offset, length, _ in req.ranges or ():
                self._call(op, "discard", offset, length,
                           self._image.aio_discard, offset, length)
        elif rtype == T_WRITE_ZEROES:
            for offset, length, unmap in req.ranges or ():
                self._submit_write_zeroes(op, offset, length, unmap)
        else:
            self._finish(op, S_UNSUPP)
            return
        if op.pending == 0:
            self._settle(op)  # every call failed at submission, or nothing to do

    def _submit_write_zeroes(self, op: _Op, offset: int, length: int, unmap: bool) -> None:
        if self._write_zeroes is not None:
            flags = 0 if unmap else self._thick
            self._call(op, "write-zeroes", offset, length,
                       self._write_zeroes, offset, length, zero_flags=flags)
        else:  # librbd before 16: zeroes written as data
            self._call(op, "write-zeroes", offset, length,
                       self._image.aio_write, bytes(length), offset)

    def _call(self, op: _Op, what: str, offset: int, length: int,
              method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Start one librbd call for ``op``; a refusal at submission counts as its failure."""
        try:
            method(*args, self._callback(op), **kwargs)
        except self._rbd.Error as exc:
            self._failed(op, what, offset, length, _errno_of(exc), str(exc))
            return
        op.pending += 1
        if what == "flush":
            self.flushes += 1

    # ---- completion (loop thread) ------------------------------------------------------------

    def _completion(self, op: _Op, ret: int, data: bytes | None) -> None:
        op.pending -= 1
        if op.abandoned:
            if op.pending == 0:
                self._in_flight.discard(op)
            return
        req = op.req
        if ret < 0:
            if op.flushing:
                what = "flush"
            else:
                what = _type_name(req.type)
            self._failed(op, what, req.offset, req.length, -ret, os.strerror(-ret))
        elif req.type == T_IN and not op.flushing:
            if data is None or len(data) != req.length:
                got = -1 if data is None else len(data)
                self._failed(op, "read", req.offset, req.length, errno.EIO,
                             f"short read: {got} of {req.length} bytes")
            else:
                op.read_data = data
        elif ret > 0 and req.type == T_OUT and not op.flushing and ret != req.length:
            self._failed(op, "write", req.offset, req.length, errno.EIO,
                         f"short write: {ret} of {req.length} bytes")
        if op.pending == 0:
            self._settle(op)

    def _settle(self, op: _Op) -> None:
        """Every call of ``op`` is done: flush first if writethrough asks for it, else
        answer the guest."""
        req = op.req
        if op.error is not None:
            self._finish(op, S_IOERR)
            return
        if req.sync and not op.flushing and req.type in (T_OUT, T_DISCARD, T_WRITE_ZEROES):
            op.flushing = True
            self._call(op, "flush", 0, 0, self._image.aio_flush)
            if op.pending:
                return
            self._finish(op, S_IOERR)
            return
        if req.type == T_IN and op.read_data is not None:
            scatter(req.data, op.read_data)  # guest memory, on the loop thread
            op.read_data = None
        self._finish(op, S_OK)

    def _finish(self, op: _Op, status: int) -> None:
        self._in_flight.discard(op)
        op.done(op.req, status)

    def _failed(self, op: _Op, what: str, offset: int, length: int, err: int,
                detail: str) -> None:
        where = f" at {offset}+{length}" if what not in ("flush",) else ""
        message = (f"{what} of rbd:{self.name}{where} failed: {detail} "
                   f"({errno.errorcode.get(err, err)})")
        if op.error is None:
            op.error = message
        self.errors.append(message)
        del self.errors[:-100]
        log.warning("%s -> IOERR for %r", message, op.req)

    # ---- BlkBackend -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size - self._size % self.block_size

    def refresh_size(self) -> int:
        if self._image is not None:
            self._size = int(self._image.size())
        return self.size

    @property
    def in_flight(self) -> int:
        """Requests handed to librbd and not answered yet."""
        return len(self._in_flight)

    def flush(self) -> None:
        """Synchronous flush (at exit)."""
        if self._image is not None and not self.read_only:
            try:
                self._image.flush()
            except self._rbd.Error as exc:
                raise OSError(_errno_of(exc), f"flush of rbd:{self.name}: {exc}") from exc

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait (on this thread) until librbd completed everything in flight, answering
        each request as it completes. After ``timeout`` seconds the rest is abandoned:
        logged, never answered, and its late completion touches nothing."""
        deadline = time.monotonic() + timeout
        while self._in_flight:
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = [op for op in self._in_flight if not op.abandoned]
                log.error("rbd:%s: %d request(s) still in librbd after %.0f s; abandoned: %s",
                          self.name, len(stuck), timeout, [op.req for op in stuck][:8])
                for op in stuck:
                    op.abandoned = True
                return
            select.select([self._efd], [], [], min(left, 1.0))
            self._on_event()
            if all(op.abandoned for op in self._in_flight):
                return

    def close(self) -> None:
        if self._image is not None:
            self.drain()
        if self._reactor is not None and self._efd >= 0:
            self._reactor.remove_reader(self._efd)
        self._reactor = None
        for attr, method in (("_image", "close"), ("_ioctx", "close"),
                             ("_cluster", "shutdown")):
            obj = getattr(self, attr)
            if obj is not None:
                setattr(self, attr, None)
                try:
                    getattr(obj, method)()
                except Exception as exc:  # closing must not fail the shutdown
                    log.warning("rbd:%s: %s.%s failed: %s", self.name, attr[1:], method, exc)
        if self._efd >= 0 and not self._in_flight:
            # (with abandoned requests left, the eventfd stays open: a late librbd callback
            # must not write into a descriptor number reused by something else)
            os.close(self._efd)
            self._efd = -1


def _errno_of(exc: BaseException) -> int:
    err = getattr(exc, "errno", None)
    return abs(err) if isinstance(err, int) and err else errno.EIO
