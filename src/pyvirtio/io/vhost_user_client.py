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
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
from collections.abc import Callable, Sequence

from pyvirtio.driver.base import ConfigOps, Virtqueue
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.io import unixsock
from pyvirtio.io.eventfd import EventFd
from pyvirtio.memory import GuestMemory, Region, region_from_fd
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user import frontend as FE
from pyvirtio.transport.vhost_user.codec import Message, ReplyKind

log = logging.getLogger("pyvirtio.io.vhost_user_client")

PROTOCOL_FEATURES_BIT = F.bit(V.VHOST_USER_F_PROTOCOL_FEATURES)
#: user address = guest-physical address + this (any value works; it only has to be
#: consistent between SET_MEM_TABLE and SET_VRING_ADDR)
USER_ADDR_OFFSET = 0x7F00_0000_0000
DEFAULT_QUEUE_SIZE = 256


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
        self.started = False

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
        self.mem_slots = mem_slots
        self.trace: list[str] = []  # request names sent, in order (tests assert sequences)
        self.vqs: dict[int, Virtqueue] = {}
        self._queues: dict[int, _QueueFds] = {}
        self._status = 0
        self._features_refused = False
        self.acked_features = 0  # last SET_FEATURES value (PROTOCOL_FEATURES bit included)
        self._generation = 0
        self._memory_sent = False
        self._backend_sock: socket.socket | None = None
        self._backend_decoder = C.Decoder(backend=True)
        #: called (with no arguments) when the back-end reports a config change
        self.on_config_change: Callable[[], None] | None = None
        self.config_changes = 0
        self.sock = unixsock.connect(self.path, connect_timeout)
        self.sock.settimeout(timeout)
        self.memory = GuestMemory([sealed_memory(memory_size)])
        self.allocator = Allocator(0, memory_size)
        try:
            self._handshake(protocol_features, num_queues)
        except BaseException:
            self.close()
            raise

    # ---- messaging ----------------------------------------------------------------------------

    def _recv(self) -> Message:
        data, fds, truncated = unixsock.recv_exact(self.sock, V.HEADER_SIZE)
        decoder = C.Decoder()
        msgs = decoder.feed(data, fds, truncated)
        while not msgs:
            data, fds, truncated = unixsock.recv_exact(self.sock, decoder.wanted)
            msgs = decoder.feed(data, fds, truncated)
        return msgs[0]

    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                ack: bool | None = None) -> Message | None:
        """Send one request; return its reply (requests with a reply of their own) or None.

        With ``ack`` (default: when REPLY_ACK is negotiated and the request has no reply of
        its own) NEED_REPLY is set and a non-zero status raises :class:`BackendRefused`.
        """
        kind = FE.reply_kind(req)
        if ack is None:
            ack = FE.wants_ack(req, self.protocol_features)
        msg = C.request(req, payload, need_reply=ack, fds=fds)
        self.trace.append(msg.name)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %s", self.path, C.describe(msg))
        try:
            unixsock.send_all(self.sock, msg.encode(), list(fds))
            if kind is ReplyKind.NONE and not ack:
                return None
            rep = self._recv()
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"vhost-user {msg.name} to {self.path} failed: {exc}") from exc
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s", self.path, C.describe(rep))
        try:
            if kind is ReplyKind.NONE:
                FE.check_ack(msg, rep)
                return None
            FE.check_reply(msg, rep)
            return rep
        finally:
            rep.close_fds()

    def _u64(self, req: int) -> int:
        msg = C.request(req)
        rep = self.request(req)
        assert rep is not None
        return FE.parse_u64_reply(msg, rep)

    def _handshake(self, wanted: int | None, num_queues: int | None) -> None:
        self.protocol_features = 0
        self.request(R.SET_OWNER)
        self.backend_features = self._u64(R.GET_FEATURES)
        if wanted is None:
            self.backend_features &= ~PROTOCOL_FEATURES_BIT
        elif self.backend_features & PROTOCOL_FEATURES_BIT:
            offered = self._u64(R.GET_PROTOCOL_FEATURES)
            chosen = FE.negotiate_protocol(offered, wanted)
            # Not yet negotiated while this very message is in flight: no ack for it.
            self.request(R.SET_PROTOCOL_FEATURES, C.u64(chosen), ack=False)
            self.protocol_features = chosen
        self.num_queues = num_queues if num_queues is not None else 1
        if self.has_protocol(PF.MQ):
            self.num_queues = self._u64(R.GET_QUEUE_NUM)
        if self.has_protocol(PF.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self._u64(R.GET_MAX_MEM_SLOTS)
        if self.has_protocol(PF.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.request(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
            finally:
                theirs.close()
            ours.setblocking(False)
            self._backend_sock = ours
        log.info("%s: back-end features 0x%x, protocol features %s, %d queue(s)", self.path,
                 self.backend_features, V.describe_protocol_features(self.protocol_features),
                 self.num_queues)

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    # ---- ConfigOps: features and status ---------------------------------------------------------

    def get_features(self) -> int:
        return self.backend_features & ~PROTOCOL_FEATURES_BIT

    def set_features(self, features: int) -> None:
        value = features | (self.backend_features & PROTOCOL_FEATURES_BIT)
        self._features_refused = False
        try:
            self.request(R.SET_FEATURES, C.u64(value))
        except FE.BackendRefused as exc:
            log.warning("%s: %s", self.path, exc)
            self._features_refused = True
        self.acked_features = value

    def get_status(self) -> int:
        if self.has_protocol(PF.STATUS):
            return self._u64(R.GET_STATUS)
        return self._status

    def set_status(self, status: int) -> None:
        if status == 0:
            self._reset()
            return
        if self.has_protocol(PF.STATUS):
            self.request(R.SET_STATUS, C.u64(status))
            return
        if status & S.FEATURES_OK and self._features_refused:
            status &= ~S.FEATURES_OK
        self._status = status

    def _reset(self) -> None:
        for index, q in list(self._queues.items()):
            if q.started:
                self.get_vring_base(index)
        if self.has_protocol(PF.RESET_DEVICE):
            self.request(R.RESET_DEVICE)
        if self.has_protocol(PF.STATUS):
            self.request(R.SET_STATUS, C.u64(0))
        for q in self._queues.values():
            q.close()
        self._queues.clear()
        self.vqs.clear()
        self._status = 0

    def get_vring_base(self, index: int) -> int:
        """Stop queue ``index`` on the back-end; returns its last_avail_idx."""
        payload = C.vring_state(index, 0)
        rep = self.request(R.GET_VRING_BASE, payload)
        assert rep is not None
        state = FE.parse_vring_state_reply(C.request(R.GET_VRING_BASE, payload), rep)
        q = self._queues.get(index)
        if q is not None:
            q.started = False
        return state.num

    # ---- ConfigOps: config space ----------------------------------------------------------------

    def read_config(self, offset: int, length: int) -> bytes:
        if not self.has_protocol(PF.CONFIG):
            raise LocalError("the back-end does not offer config space access (no CONFIG "
                             "protocol feature)")
        payload = C.config(offset, size=length)
        rep = self.request(R.GET_CONFIG, payload)
        assert rep is not None
        return FE.parse_config_reply(C.request(R.GET_CONFIG, payload), rep)

    def write_config(self, offset: int, data: bytes) -> None:
        if not self.has_protocol(PF.CONFIG):
            raise LocalError("the back-end does not offer config space access")
        self.request(R.SET_CONFIG, C.config(offset, data, flags=V.CONFIG_TYPE_FRONTEND))

    def generation(self) -> int:
        return self._generation

    # ---- ConfigOps: queues ----------------------------------------------------------------------

    def queue_max_size(self, index: int) -> int:
        return self.queue_size if 0 <= index < self.num_queues else 0

    def bind_queue(self, index: int, vq: Virtqueue) -> None:
        self.vqs[index] = vq

    def _send_memory(self) -> None:
        descs = [C.MemoryRegionDesc(r.gpa, r.size, r.user_addr or 0, r.fd_offset)
                 for r in self.memory.regions]
        fds = [r.fd for r in self.memory.regions if r.fd is not None]
        if self.mem_slots and self.has_protocol(PF.CONFIGURE_MEM_SLOTS):
            for desc, fd in zip(descs, fds, strict=True):
                self.request(R.ADD_MEM_REG, C.mem_reg(desc), [fd])
        else:
            self.request(R.SET_MEM_TABLE, C.memory_table(descs), fds)
        self._memory_sent = True

    def setup_queue(self, index: int, ring: DriverQueue) -> None:
        if not self._memory_sent:
            self._send_memory()
        old = self._queues.pop(index, None)
        if old is not None:
            old.close()
        q = self._queues[index] = _QueueFds()
        self.request(R.SET_VRING_NUM, C.vring_state(index, ring.size))
        self.request(R.SET_VRING_BASE, C.vring_state(index, 0))
        self.request(R.SET_VRING_ADDR, C.vring_addr(
            index, desc=ring.desc_addr + USER_ADDR_OFFSET, used=ring.used_addr + USER_ADDR_OFFSET,
            avail=ring.avail_addr + USER_ADDR_OFFSET))
        self.request(R.SET_VRING_KICK, C.vring_fd(index), [q.kick.fd])
        self.request(R.SET_VRING_CALL, C.vring_fd(index), [q.call.fd])
        if self.acked_features & PROTOCOL_FEATURES_BIT:
            # Rings start disabled once PROTOCOL_FEATURES is negotiated.
            self.request(R.SET_VRING_ENABLE, C.vring_state(index, 1))
        q.started = True

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
        event = FE.handle_backend_request(msg, self.protocol_features)
        if event.kind == "config-change":
            self._generation += 1
            self.config_changes += 1
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
