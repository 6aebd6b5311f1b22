"""A vhost-user front-end: pyvirtio drivers driving any vhost-user back-end.

:class:`VhostUserClient` implements :class:`pyvirtio.driver.base.ConfigOps` over a vhost-user
socket, the way QEMU or UML would for a guest: guest memory is a sealed memfd shared with
SET_MEM_TABLE (or ADD_MEM_REG when CONFIGURE_MEM_SLOTS is negotiated), each queue is
described with SET_VRING_NUM/BASE/ADDR and gets a kick and a call eventfd, config space goes
through GET/SET_CONFIG, and :meth:`VhostUserClient.wait` sleeps on the call fds (and on the
back-end channel for CONFIG_CHANGE_MSG)::

    with VhostUserClient("/tmp/rng.sock", ids.RNG) as client:
        rng = probe(client)            # pyvirtio.driver.base.probe
        data = rng.read(64)

vhost-user does not tell the front-end the device type, so ``device_id`` is given (as UML's
``SOCKET:ID``). Ring addresses are sent as front-end "user addresses": guest-physical address
plus :data:`USER_ADDR_OFFSET`, a deliberately different space so a back-end that confuses the
two is caught.

The protocol (what to send in which order, and checking every reply) is
:class:`pyvirtio.transport.vhost_user.frontend.FrontendProtocol`; this module does the I/O:
the socket, guest memory, eventfds and the back-end channel.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

from pyvirtio.driver.base import ConfigOps, Virtqueue
from pyvirtio.errors import PeerError
from pyvirtio.io import unixsock
from pyvirtio.io.eventfd import EventFd
from pyvirtio.memory import GuestMemory, Region, region_from_fd
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverRing
from pyvirtio.spec import vhost_user as V
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user import frontend as FE
from pyvirtio.transport.vhost_user.codec import Message
from pyvirtio.transport.vhost_user.frontend import (
    PROTOCOL_FEATURES_BIT,
    USER_ADDR_OFFSET,
    FrontendProtocol,
)

log = logging.getLogger("pyvirtio.io.vhost_user_client")

DEFAULT_QUEUE_SIZE = 256
T = TypeVar("T")

__all__ = ["DEFAULT_QUEUE_SIZE", "PROTOCOL_FEATURES_BIT", "USER_ADDR_OFFSET",
           "VhostUserClient", "sealed_memory"]


def sealed_memory(size: int, name: str = "pyvirtio-vhost-user") -> Region:
    """A zeroed memfd region at gpa 0 that can neither shrink nor grow, so a back-end that
    mapped it can never fault on a truncated page."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return region_from_fd(fd, 0, size, 0, user_addr=USER_ADDR_OFFSET)
    except BaseException:
        os.close(fd)
        raise


class _QueueFds:
    def __init__(self) -> None:
        self.kick = EventFd()
        self.call = EventFd()

    def close(self) -> None:
        self.kick.close()
        self.call.close()


class VhostUserClient(ConfigOps):
    """Driver-side config ops over a vhost-user socket at ``path``.

    ``memory_size``: bytes of guest memory shared with the back-end. ``queue_size``: the
    ring size used (vhost-user has no per-queue maximum; the front-end chooses).
    ``num_queues``: how many queues exist when the back-end does not answer GET_QUEUE_NUM.
    ``protocol_features``: what we are willing to negotiate; None: act as a front-end that
    predates protocol features (never acks VHOST_USER_F_PROTOCOL_FEATURES). ``mem_slots``: use
    ADD_MEM_REG instead of SET_MEM_TABLE when CONFIGURE_MEM_SLOTS is negotiated.
    ``timeout``: seconds to wait for each reply.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device_id: int,
        *,
        memory_size: int = 16 << 20,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        num_queues: int | None = None,
        protocol_features: int | None = FE.FRONTEND_PROTOCOL_FEATURES,
        mem_slots: bool = True,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.path = os.fspath(path)
        self.device_id = device_id
        self.queue_size = queue_size
        self.timeout = timeout
        self.protocol = FrontendProtocol(mem_slots=mem_slots, name=self.path)
        self.vqs: dict[int, Virtqueue] = {}
        self._queues: dict[int, _QueueFds] = {}
        self._backend_sock: socket.socket | None = None
        self._backend_decoder = C.Decoder(backend=True)
        #: called (with no arguments) when the back-end reports a config change
        self.on_config_change: Callable[[], None] | None = None
        self.sock = unixsock.connect(self.path, connect_timeout)
        self.sock.settimeout(timeout)
        self.memory = GuestMemory([sealed_memory(memory_size)])
        self.allocator = Allocator(0, memory_size)
        try:
            self._handshake(protocol_features, num_queues)
        except BaseException:
            self.close()
            raise

    # ---- the protocol's state, for callers and tests ------------------------------------------

    @property
    def trace(self) -> list[str]:
        """Request names sent, in order (tests assert sequences)."""
        return self.protocol.trace

    @property
    def protocol_features(self) -> int:
        return self.protocol.protocol_features

    @property
    def backend_features(self) -> int:
        return self.protocol.backend_features

    @property
    def acked_features(self) -> int:
        """The last SET_FEATURES value (PROTOCOL_FEATURES bit included)."""
        return self.protocol.acked_features

    @property
    def num_queues(self) -> int:
        return self.protocol.num_queues

    @property
    def max_mem_slots(self) -> int:
        return self.protocol.max_mem_slots

    @property
    def config_changes(self) -> int:
        return self.protocol.config_changes

    def has_protocol(self, bit: int) -> bool:
        return self.protocol.has_protocol(bit)

    # ---- messaging ----------------------------------------------------------------------------

    def _recv(self) -> Message:
        data, fds, truncated = unixsock.recv_exact(self.sock, V.HEADER_SIZE)
        decoder = C.Decoder()
        msgs = decoder.feed(data, fds, truncated)
        while not msgs:
            data, fds, truncated = unixsock.recv_exact(self.sock, decoder.wanted)
            msgs = decoder.feed(data, fds, truncated)
        return msgs[0]

    def _transact(self, msg: Message) -> Message | None:
        """Send ``msg``; receive its reply when one comes."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %s", self.path, C.describe(msg))
        try:
            unixsock.send_all(self.sock, msg.encode(), list(msg.fds))
            if not FE.expects_reply(msg):
                return None
            rep = self._recv()
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"vhost-user {msg.name} to {self.path} failed: {exc}") from exc
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s", self.path, C.describe(rep))
        return rep

    def run(self, step: FE.Step[T]) -> T:
        """Run one protocol operation over the socket; returns its result."""
        try:
            msg = next(step)
            while True:
                rep = self._transact(msg)
                try:
                    msg = step.send(rep)
                finally:
                    if rep is not None:
                        rep.close_fds()
        except StopIteration as done:
            result: T = done.value
            return result

    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                ack: bool | None = None) -> Message | None:
        """Send one request; return its reply (requests with a reply of their own) or None.

        With ``ack`` (default: when REPLY_ACK is negotiated and the request has no reply of
        its own) NEED_REPLY is set and a non-zero status raises :class:`BackendRefused`.
        """
        return self.run(self.protocol.request(req, payload, fds, ack=ack))

    def _handshake(self, wanted: int | None, num_queues: int | None) -> None:
        self.run(self.protocol.handshake(wanted, num_queues))
        if self.protocol.wants_backend_channel:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.run(self.protocol.set_backend_channel(theirs.fileno()))
            finally:
                theirs.close()
            ours.setblocking(False)
            self._backend_sock = ours
        log.info("%s: back-end features 0x%x, protocol features %s, %d queue(s)", self.path,
                 self.backend_features, V.describe_protocol_features(self.protocol_features),
                 self.num_queues)

    # ---- ConfigOps: features and status ---------------------------------------------------------

    def get_features(self) -> int:
        return self.protocol.get_features()

    def set_features(self, features: int) -> None:
        self.run(self.protocol.set_features(features))

    def get_status(self) -> int:
        return self.run(self.protocol.get_status())

    def set_status(self, status: int) -> None:
        self.run(self.protocol.set_status(status))
        if status == 0:
            for q in self._queues.values():
                q.close()
            self._queues.clear()
            self.vqs.clear()

    def get_vring_base(self, index: int) -> int:
        """Stop queue ``index`` on the back-end; returns its last_avail_idx."""
        return self.run(self.protocol.get_vring_base(index))

    # ---- ConfigOps: config space ----------------------------------------------------------------

    def read_config(self, offset: int, length: int) -> bytes:
        return self.run(self.protocol.read_config(offset, length))

    def write_config(self, offset: int, data: bytes) -> None:
        self.run(self.protocol.write_config(offset, data))

    def generation(self) -> int:
        return self.protocol.generation

    # ---- ConfigOps: queues ----------------------------------------------------------------------

    def queue_max_size(self, index: int) -> int:
        return self.queue_size if 0 <= index < self.num_queues else 0

    def bind_queue(self, index: int, vq: Virtqueue) -> None:
        self.vqs[index] = vq

    def setup_queue(self, index: int, ring: DriverRing) -> None:
        old = self._queues.pop(index, None)
        if old is not None:
            old.close()
        q = self._queues[index] = _QueueFds()
        self.run(self.protocol.setup_queue(index, ring, q.kick.fd, q.call.fd, self.memory))

    def notify(self, index: int) -> None:
        self._queues[index].kick.signal()

    def wait(self, timeout: float) -> bool:
        fds: dict[int, int] = {q.call.fd: i for i, q in self._queues.items()}
        watch = list(fds)
        if self._backend_sock is not None:
            watch.append(self._backend_sock.fileno())
        if not watch:
            return False
        ready, _, _ = select.select(watch, [], [], timeout)
        for fd in ready:
            if self._backend_sock is not None and fd == self._backend_sock.fileno():
                self._read_backend_channel()
                continue
            index = fds[fd]
            if self._queues[index].call.drain():
                vq = self.vqs.get(index)
                if vq is not None:
                    vq.interrupt()
        return bool(ready)

    def _read_backend_channel(self) -> None:
        sock = self._backend_sock
        assert sock is not None
        while True:
            try:
                data, fds, truncated = unixsock.recv_with_fds(sock, self._backend_decoder.wanted)
            except BlockingIOError:
                return
            if not data:
                log.warning("%s: back-end closed its request channel", self.path)
                sock.close()
                self._backend_sock = None
                return
            try:
                msgs = self._backend_decoder.feed(data, fds, truncated)
            except C.FramingError as exc:
                log.warning("%s: back-end channel unusable: %s", self.path, exc)
                sock.close()
                self._backend_sock = None
                return
            for msg in msgs:
                self._backend_request(sock, msg)

    def _backend_request(self, sock: socket.socket, msg: Message) -> None:
        msg.close_fds()
        event = self.protocol.backend_request(msg)
        if event.kind == "config-change":
            log.info("%s: back-end reports a config change", self.path)
            if self.on_config_change is not None:
                self.on_config_change()
        else:
            log.warning("%s: back-end request %s: %s", self.path, msg.name, event.detail)
        if event.reply is not None:
            sock.setblocking(True)
            try:
                unixsock.send_all(sock, event.reply.encode())
            finally:
                sock.setblocking(False)

    # ---- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (the back-end resets the device) and free guest memory."""
        for q in self._queues.values():
            q.close()
        self._queues.clear()
        self.vqs.clear()
        if self._backend_sock is not None:
            self._backend_sock.close()
            self._backend_sock = None
        self._backend_decoder.close()
        self.sock.close()
        if getattr(self, "memory", None) is not None:
            self.memory.close()

    def __enter__(self) -> VhostUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
