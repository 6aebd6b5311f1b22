"""The vhost-user back-end server: serve a VirtioDevice to QEMU, UML or pyvirtio front-ends.

::

    loop = EventLoop()
    server = VhostUserServer("/tmp/rng.sock", RngDevice, loop)
    server.serve_forever()            # until loop.stop() / SIGTERM with stop_on_signals=True
    server.close()                    # closes connections, removes the socket file

Connections: ``device_factory()`` is called for each accepted front-end, so each connection
gets a fresh device (return the same instance to keep one device across front-ends: it is
reset between them). By default one front-end is served at a time (``max_connections=1``);
others wait in the listen backlog until it goes. When a front-end disconnects, however it
dies (clean close, SIGKILL, protocol violation), its rings are stopped, the device is reset,
the guest memory and every fd it sent are released, and the next connection is accepted.

Per connection the epoll loop watches the socket and every kick fd (a kick runs
``device.kick(i)``); the device's ``notify_queue`` writes the vring's call fd and its
``notify_config`` sends CONFIG_CHANGE_MSG on the back-end channel. Every message is traced
at DEBUG on logger ``pyvirtio.vhost_user.backend``; refusals are WARNINGs there; connection
events are logged on ``pyvirtio.io.vhost_user_server``.

What to put on a QEMU or UML command line to attach the socket is in :mod:`pyvirtio.guest`
(:func:`~pyvirtio.guest.qemu.qemu_args`, :func:`~pyvirtio.guest.uml.uml_args`); running a
server in a thread or a child process is in :mod:`pyvirtio.testing.server`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterable

from pyvirtio.device.base import VirtioDevice
from pyvirtio.errors import LocalError
from pyvirtio.io import memfd, unixsock
from pyvirtio.io.loop import EventLoop, Timer
from pyvirtio.memory import Region
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user.backend import (
    DEFAULT_MAX_MEM_SLOTS,
    DEFAULT_PROTOCOL_FEATURES,
    BackendProtocol,
    ConnectionFatal,
)
from pyvirtio.transport.vhost_user.extension import BackendExtension

log = logging.getLogger("pyvirtio.io.vhost_user_server")

DeviceFactory = Callable[[], VirtioDevice]
ExtensionsFactory = Callable[[VirtioDevice], Iterable[BackendExtension]]

_ONE = (1).to_bytes(8, sys.byteorder)
#: replies queued for a front-end that does not read them; beyond this it is disconnected
MAX_PENDING_OUTPUT = 1 << 20
#: messages handled per readiness event before the loop serves other fds
MESSAGES_PER_WAKEUP = 64
DEFAULT_POLL_INTERVAL = 0.005
#: finished connections remembered in closed_reasons / requests_seen
KEEP_HISTORY = 100

def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class _Connection:
    """One front-end: socket, decoder, protocol, and the BackendHost services."""

    def __init__(self, server: VhostUserServer, sock: socket.socket, number: int,
                 device: VirtioDevice) -> None:
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.number = number
        self.device = device
        self.name = f"vhost-user[{number}] {device.name}"
        self.decoder = C.Decoder()
        self._out: list[tuple[bytes, list[int]]] = []
        self._out_bytes = 0
        self._kicks: dict[int, int] = {}  # fd -> vring index
        self._polls: dict[int, Timer] = {}
        self._bad_signal_fds: set[int] = set()
        self._coalesce = server.loop.coalesce
        self.closed = False
        self.close_reason = ""
        extensions = list(server.extensions(device)) if server.extensions else []
        self.protocol = BackendProtocol(
            device, self, reactor=self.loop, protocol_features=server.protocol_features,
            extensions=extensions, max_mem_slots=server.max_mem_slots, name=self.name,
        )
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    # ---- socket -------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(MESSAGES_PER_WAKEUP):
            if self.closed or self._out:
                return
            try:
                data, fds, truncated = unixsock.recv_with_fds(self.sock, self.decoder.wanted)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(f"receive failed: {exc}", warn=True)
                return
            if not data:
                unixsock.close_fds(fds)
                if self.decoder.in_progress:
                    self.close(f"front-end hung up mid-message ({self.decoder.describe_partial()})",
                               warn=True)
                else:
                    self.close("front-end disconnected")
                return
            try:
                messages = self.decoder.feed(data, fds, truncated)
            except C.FramingError as exc:
                self.close(f"unusable message stream: {exc}", warn=True)
                return
            for msg in messages:
                if not self._handle(msg):
                    return

    def _handle(self, msg: C.Message) -> bool:
        try:
            replies = self.protocol.handle(msg)
        except ConnectionFatal as exc:
            self.close(str(exc), warn=True)
            return False
        except Exception as exc:  # a bug of ours: this connection dies, the server lives
            log.exception("%s: internal error handling %s", self.name, msg.name)
            self.close(f"internal error handling {msg.name}: {exc!r}", warn=True)
            return False
        for reply in replies:
            self._send(reply.encode(), reply.fds)
        return not self.closed

    def _send(self, data: bytes, fds: list[int]) -> None:
        if not self._out:
            try:
                sent = unixsock.send_with_fds(self.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                unixsock.close_fds(fds)
                self.close(f"send failed: {exc}", warn=True)
                return
            if sent:
                unixsock.close_fds(fds)  # our copies: the front-end has its own now
                fds = []
            if sent == len(data):
                return
            data = data[sent:]
        self._out.append((data, fds))
        self._out_bytes += len(data)
        if self._out_bytes > MAX_PENDING_OUTPUT:
            self.close(f"front-end does not read its replies ({self._out_bytes} bytes pending)",
                       warn=True)
            return
        # Backpressure: stop reading requests until the replies are gone.
        self.loop.remove_reader(self.sock.fileno())
        self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                sent = unixsock.send_with_fds(self.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(f"send failed: {exc}", warn=True)
                return
            if sent:
                unixsock.close_fds(fds)
            self._out_bytes -= sent
            if sent < len(data):
                self._out[0] = (data[sent:], [])
                return
            self._out.pop(0)
        self.loop.remove_writer(self.sock.fileno())
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    # ---- BackendHost ------------------------------------------------------------------------

    def watch_kick(self, index: int, fd: int) -> None:
        # The data path: one call per kick, so everything it needs is bound here.
        server = self.server
        on_kick = self.protocol.on_kick
        read = os.read
        if _is_eventfd(fd):
            # Edge-triggered: every write to an eventfd is a new event, so the count never
            # needs reading (it cannot realistically reach its 2^64 - 2 limit), which saves
            # a system call per kick.
            def kicked_edge() -> None:
                server.kicks += 1
                on_kick(index)

            try:
                self.loop.add_reader(fd, kicked_edge, edge=True)
            except (ValueError, KeyError, OSError) as exc:
                raise OSError(str(exc)) from exc
            self._kicks[fd] = index
            return

        def kicked() -> None:
            try:
                data = read(fd, 1024)  # an eventfd's 8-byte count, or a pipe's bytes
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._kick_failed(index, fd, exc)
                return
            if not data:
                self._kick_failed(index, fd, None)
                return
            server.kicks += 1
            on_kick(index)

        try:
            self.loop.add_reader(fd, kicked)
        except (ValueError, KeyError, OSError) as exc:
            raise OSError(str(exc)) from exc
        self._kicks[fd] = index

    def unwatch_kick(self, index: int, fd: int) -> None:
        if self._kicks.pop(fd, None) is not None:
            self.loop.remove_reader(fd)

    def _kick_failed(self, index: int, fd: int, exc: OSError | None) -> None:
        if exc is None:
            log.warning("%s: vring %d kick fd reached end of file; no longer watched",
                        self.name, index)
        else:
            log.warning("%s: reading vring %d kick fd failed (%s); no longer watched",
                        self.name, index, exc)
        self.unwatch_kick(index, fd)

    def start_polling(self, index: int) -> None:
        self.stop_polling(index)

        def tick() -> None:
            if index in self._polls and not self.closed:
                self.protocol.on_kick(index)
                self._polls[index] = self.loop.call_later(self.server.poll_interval, tick)

        self._polls[index] = self.loop.call_later(0.0, tick)

    def stop_polling(self, index: int) -> None:
        timer = self._polls.pop(index, None)
        if timer is not None:
            timer.cancel()

    def adopt_signal_fd(self, fd: int) -> None:
        # Ours alone in practice (UML closes its copy of the write end; QEMU's eventfds are
        # already non-blocking), and a blocked write would stall every connection.
        os.set_blocking(fd, False)
        self._bad_signal_fds.discard(fd)

    def signal(self, fd: int) -> None:
        # Inside one epoll wake-up the loop writes each fd once, after every ready fd was
        # served (several drains of a queue, several frames into a receive queue: one call).
        if not self._coalesce(fd, self._signal_now):
            self._signal_now(fd)

    def _signal_now(self, fd: int) -> None:
        if self.closed:
            return  # deferred past the connection's end: its fds are closed (or reused)
        self.server.calls += 1
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass  # eventfd counter saturated or pipe full: a wake-up is pending anyway
        except OSError as exc:
            if fd not in self._bad_signal_fds:
                self._bad_signal_fds.add(fd)
                log.warning("%s: writing notification fd %d failed: %s", self.name, fd, exc)

    def map_memory(self, fd: int, gpa: int, size: int, fd_offset: int,
                   user_addr: int | None) -> Region:
        return memfd.map_memory_fd(fd, gpa, size, fd_offset, user_addr)

    def close_fd(self, fd: int) -> None:
        # A call deferred to the end of this wake-up must not reach whatever gets the number
        # next (a memory region's fd, say).
        self.loop.forget_coalesced(fd)
        memfd.close_fd(fd)

    def send_backend(self, fd: int, data: bytes) -> None:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            log.warning("%s: back-end channel full; %d-byte request dropped", self.name,
                        len(data))
            return
        except OSError as exc:
            log.warning("%s: back-end channel write failed: %s", self.name, exc)
            return
        if n != len(data):
            log.warning("%s: back-end channel took %d of %d bytes", self.name, n, len(data))

    # ---- teardown -----------------------------------------------------------------------------

    def close(self, reason: str, warn: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        (log.warning if warn else log.info)("%s: connection closed: %s", self.name, reason)
        fileno = self.sock.fileno()
        self.loop.remove_reader(fileno)
        self.loop.remove_writer(fileno)
        for fd in list(self._kicks):
            self.loop.remove_reader(fd)
        self._kicks.clear()
        for timer in self._polls.values():
            timer.cancel()
        self._polls.clear()
        try:
            self.protocol.close()
        except Exception:
            log.exception("%s: releasing the connection failed", self.name)
        for _, fds in self._out:
            unixsock.close_fds(fds)
        self._out.clear()
        self.decoder.close()
        self.sock.close()
        self.server._connection_closed(self)


class VhostUserServer:
    """Listen on ``path`` and serve a device made by ``device_factory`` to each front-end.

    ``loop``: the EventLoop to run on (a new one if None). ``max_connections``: front-ends
    served at once. ``extensions(device)``: extra protocol extensions per connection.
    ``protocol_features``: the protocol feature offer. ``poll_interval``: seconds between
    polls of a vring whose front-end asked for polling instead of a kick fd.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device_factory: DeviceFactory,
        loop: EventLoop | None = None,
        *,
        max_connections: int = 1,
        extensions: ExtensionsFactory | None = None,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        backlog: int = 8,
    ) -> None:
        if max_connections < 1:
            raise LocalError(f"max_connections must be at least 1, not {max_connections}")
        self.path = os.fspath(path)
        self.device_factory = device_factory
        self._own_loop = loop is None
        self.loop = loop if loop is not None else EventLoop()
        self.max_connections = max_connections
        self.extensions = extensions
        self.protocol_features = protocol_features
        self.max_mem_slots = max_mem_slots
        self.poll_interval = poll_interval
        self.connections: list[_Connection] = []
        self.accepted = 0
        #: kick fd wake-ups handled and notifications (call/err fd writes) sent, over every
        #: connection (benchmarks count notifications per request)
        self.kicks = 0
        self.calls = 0
        #: the device of the most recent connection (tests inspect it)
        self.last_device: VirtioDevice | None = None
        #: why each finished connection ended, oldest first (the last KEEP_HISTORY)
        self.closed_reasons: list[str] = []
        #: the request names each finished connection sent (its last 1000), oldest first
        self.requests_seen: list[list[str]] = []
        self._listener: socket.socket | None = unixsock.listen(self.path, backlog)
        self._listening = False
        self._closed = False
        self._listen()
        log.info("vhost-user server listening on %s", self.path)

    # ---- accepting ------------------------------------------------------------------------------

    def _listen(self) -> None:
        if self._listener is not None and not self._listening:
            self.loop.add_reader(self._listener.fileno(), self._on_accept)
            self._listening = True

    def _unlisten(self) -> None:
        if self._listener is not None and self._listening:
            self.loop.remove_reader(self._listener.fileno())
            self._listening = False

    def _on_accept(self) -> None:
        assert self._listener is not None
        while len(self.connections) < self.max_connections:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", self.path, exc)
                return
            sock.set_inheritable(False)
            self.accepted += 1
            try:
                device = self.device_factory()
            except Exception:
                log.exception("device factory failed; refusing the front-end")
                sock.close()
                continue
            self.last_device = device
            conn = _Connection(self, sock, self.accepted, device)
            self.connections.append(conn)
            log.info("%s: front-end connected on %s", conn.name, self.path)
        self._unlisten()  # at capacity: the rest wait in the backlog

    def _connection_closed(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            self.closed_reasons.append(conn.close_reason)
            self.requests_seen.append(list(conn.protocol.requests))
            del self.closed_reasons[:-KEEP_HISTORY], self.requests_seen[:-KEEP_HISTORY]
        if not self._closed:
            self._listen()

    # ---- running --------------------------------------------------------------------------------

    def serve_forever(self, *, stop_on_signals: bool = False) -> None:
        """Run the loop until :meth:`stop` (or SIGINT/SIGTERM with ``stop_on_signals``)."""
        if stop_on_signals:
            self.loop.stop_on_signals()
        self.loop.run()

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (thread- and signal-safe)."""
        self.loop.stop("server stopped")

    def close(self) -> None:
        """Close every connection and the listener; remove the socket file."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self.connections):
            conn.close("server shutting down")
        self._unlisten()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        unixsock.unlink_socket(self.path)
        if self._own_loop:
            self.loop.close()
        log.info("vhost-user server on %s closed", self.path)

    def __enter__(self) -> VhostUserServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
