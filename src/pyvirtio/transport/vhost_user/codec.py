"""vhost-user messages, sans-I/O: framing, payload build/parse, per-request validation.

A :class:`Message` is the header fields, the payload bytes and the file descriptors that came
with it. :class:`Decoder` turns a byte stream (plus the fds each read delivered) into
messages, asking for exactly the bytes it still needs (:attr:`Decoder.wanted`): a reader that
never asks the socket for more than that never receives the next message's fds early, since
the kernel hands SCM_RIGHTS fds out with the bytes of the ``sendmsg`` that carried them.

Two kinds of bad input, two errors:

* :class:`FramingError` — the stream itself cannot be trusted (wrong protocol version, a
  payload larger than any message may be, the peer hung up mid-message). The connection must
  be closed.
* :class:`MessageError` — one message is wrong (bad payload size for its type, wrong number
  of fds, a value out of range). That request is refused; the stream stays in sync because
  its size was known.

:data:`REQUEST_RULES` holds, for every front-end request the specification defines, the
payload and fd-count rules and the kind of reply it expects; :func:`check_request` applies
them.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pyvirtio.errors import LocalError, PeerError
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.spec.vhost_user import Request as R


class FramingError(PeerError):
    """The byte stream is broken: close the connection."""


class MessageError(PeerError):
    """This one message is invalid: refuse it (the stream is still in sync)."""


@dataclass(eq=False)
class Message:
    """One vhost-user message. ``fds`` are owned by the message until taken with
    :meth:`take_fd`; :meth:`close_fds` closes whatever is left."""

    request: int
    flags: int = V.VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)
    #: the kernel dropped fds because more came than the reader had room for
    fds_truncated: bool = False
    #: True for messages on the back-end channel (request numbers are BackendRequest)
    backend: bool = False

    @property
    def name(self) -> str:
        if self.backend:
            return V.backend_request_name(self.request)
        return V.request_name(self.request)

    @property
    def version(self) -> int:
        return self.flags & V.VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & V.REPLY_FLAG)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & V.NEED_REPLY_FLAG)

    @property
    def size(self) -> int:
        return len(self.payload)

    def encode(self) -> bytes:
        """Header and payload as they go on the wire (fds travel separately)."""
        return V.HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload

    def take_fd(self, index: int = 0) -> int:
        """Take ownership of fd ``index`` (the caller now closes it)."""
        fd = self.fds[index]
        self.fds[index] = -1
        return fd

    def close_fds(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = []

    def __repr__(self) -> str:
        return (f"Message({self.name}, flags=0x{self.flags:x}, size={len(self.payload)}, "
                f"fds={len(self.fds)})")


# ---- building ---------------------------------------------------------------------------------


def request(req: int, payload: bytes = b"", *, need_reply: bool = False,
            fds: Sequence[int] = (), backend: bool = False) -> Message:
    """A request message (front-end request, or back-end request with ``backend=True``)."""
    flags = V.VERSION | (V.NEED_REPLY_FLAG if need_reply else 0)
    return Message(int(req), flags, bytes(payload), list(fds), backend=backend)


def reply(to: Message, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
    """The reply to ``to``: same request number, VERSION | REPLY flags."""
    return Message(to.request, V.VERSION | V.REPLY_FLAG, bytes(payload), list(fds),
                   backend=to.backend)


def ack(to: Message, status: int = 0) -> Message:
    """The REPLY_ACK answer: u64 0 for success, non-zero for failure."""
    return reply(to, V.U64.pack(status))


def u64(value: int) -> bytes:
    return V.U64.pack(value & 0xFFFFFFFFFFFFFFFF)


def vring_state(index: int, num: int) -> bytes:
    return V.VRING_STATE.pack(index, num)


def vring_addr(index: int, desc: int, used: int, avail: int, log: int = 0,
               flags: int = 0) -> bytes:
    """Payload of SET_VRING_ADDR (note the wire order: desc, used, avail, log)."""
    return V.VRING_ADDR.pack(index, flags, desc, used, avail, log)


def vring_fd(index: int, nofd: bool = False) -> bytes:
    """Payload of SET_VRING_KICK / CALL / ERR."""
    return V.U64.pack(index | (V.VRING_NOFD_MASK if nofd else 0))


class MemoryRegionDesc(NamedTuple):
    """One region of SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG."""

    gpa: int
    size: int
    user_addr: int
    mmap_offset: int

    def describe(self) -> str:
        return (f"gpa 0x{self.gpa:x} size 0x{self.size:x} user 0x{self.user_addr:x} "
                f"offset 0x{self.mmap_offset:x}")


def memory_table(regions: Sequence[MemoryRegionDesc]) -> bytes:
    """Payload of SET_MEM_TABLE (only the regions present, as QEMU sends it)."""
    out = bytearray(V.MEMORY_HEADER.pack(len(regions), 0))
    for r in regions:
        out += V.MEMORY_REGION.pack(r.gpa, r.size, r.user_addr, r.mmap_offset)
    return bytes(out)


def mem_reg(region: MemoryRegionDesc) -> bytes:
    """Payload of ADD_MEM_REG / REM_MEM_REG."""
    return V.MEM_REG.pack(0, region.gpa, region.size, region.user_addr, region.mmap_offset)


def config(offset: int, data: bytes = b"", *, size: int | None = None, flags: int = 0) -> bytes:
    """Payload of GET_CONFIG / SET_CONFIG: header and ``size`` bytes (``data`` or zeros)."""
    n = len(data) if size is None else size
    body = bytes(data) if size is None else bytes(data).ljust(n, b"\0")[:n]
    return V.CONFIG_HEADER.pack(offset, n, flags) + body


# ---- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


class ConfigAccess(NamedTuple):
    offset: int
    size: int
    flags: int
    data: bytes


def parse_u64(payload: bytes) -> int:
    _need(payload, V.U64.size, "u64")
    value: int = V.U64.unpack_from(payload)[0]
    return value


def parse_vring_state(payload: bytes) -> VringState:
    _need(payload, V.VRING_STATE.size, "vring state")
    return VringState(*V.VRING_STATE.unpack_from(payload))


def parse_vring_addr(payload: bytes) -> VringAddr:
    _need(payload, V.VRING_ADDR.size, "vring address")
    return VringAddr(*V.VRING_ADDR.unpack_from(payload))


def parse_memory_table(payload: bytes) -> list[MemoryRegionDesc]:
    _need(payload, V.MEMORY_HEADER.size, "memory table header")
    n, _ = V.MEMORY_HEADER.unpack_from(payload)
    _need(payload, V.MEMORY_HEADER.size + n * V.MEMORY_REGION.size, f"memory table of {n} regions")
    base, step = V.MEMORY_HEADER.size, V.MEMORY_REGION.size
    return [MemoryRegionDesc(*V.MEMORY_REGION.unpack_from(payload, base + i * step))
            for i in range(n)]


def parse_mem_reg(payload: bytes) -> MemoryRegionDesc:
    _need(payload, V.MEM_REG.size, "memory region")
    return MemoryRegionDesc(*V.MEM_REG.unpack_from(payload)[1:])


def parse_config(payload: bytes) -> ConfigAccess:
    _need(payload, V.CONFIG_HEADER.size, "config header")
    offset, size, flags = V.CONFIG_HEADER.unpack_from(payload)
    data = payload[V.CONFIG_HEADER.size : V.CONFIG_HEADER.size + size]
    return ConfigAccess(offset, size, flags, bytes(data))


def _need(payload: bytes, n: int, what: str) -> None:
    if len(payload) < n:
        raise MessageError(f"payload of {len(payload)} bytes is too short for a {what} "
                           f"({n} bytes)")


# ---- validation -------------------------------------------------------------------------------


class ReplyKind(enum.Enum):
    """What a request expects back (besides a REPLY_ACK u64 when NEED_REPLY is set)."""

    NONE = "none"  # nothing, or the u64 ack when NEED_REPLY is set
    U64 = "u64"  # a u64 value; no error form exists
    STATUS_U64 = "status"  # a u64 where 0 is success and non-zero failure
    VRING_STATE = "vring state"  # no error form exists
    CONFIG = "config"  # a zero-size payload means failure
    INFLIGHT = "inflight"  # inflight description plus one fd


Check = Callable[[Message], "str | None"]


@dataclass(frozen=True)
class RequestRule:
    """What a valid request of one type looks like.

    ``check`` returns why a message breaks the rule (payload size, fd count...) or None.
    ``feature`` is the protocol feature that must have been negotiated for the request to be
    legal (None: always legal).
    """

    check: Check
    reply: ReplyKind = ReplyKind.NONE
    feature: int | None = None


def _fd_problem(msg: Message, lo: int, hi: int) -> str | None:
    n = len(msg.fds)
    if msg.fds_truncated:
        return f"carries more file descriptors than the {V.MAX_FDS} a message may have"
    if n < lo:
        return f"carries {n} file descriptors, needs {lo}"
    if n > hi:
        return f"carries {n} file descriptors, at most {hi} allowed"
    return None


def exact(size: int, fds: int = 0, max_fds: int | None = None) -> Check:
    """Payload of exactly ``size`` bytes and ``fds`` (up to ``max_fds``) fds."""
    hi = fds if max_fds is None else max_fds

    def check(msg: Message) -> str | None:
        if len(msg.payload) != size:
            return f"payload is {len(msg.payload)} bytes, expected {size}"
        return _fd_problem(msg, fds, hi)

    return check


def _vring_fd_check(msg: Message) -> str | None:
    if len(msg.payload) != V.U64.size:
        return f"payload is {len(msg.payload)} bytes, expected {V.U64.size}"
    value = parse_u64(msg.payload)
    if value & ~(V.VRING_IDX_MASK | V.VRING_NOFD_MASK):
        return f"payload 0x{value:x} sets reserved bits (only index bits 0-7 and bit 8 exist)"
    want = 0 if value & V.VRING_NOFD_MASK else 1
    return _fd_problem(msg, want, want)


def _memory_table_check(msg: Message) -> str | None:
    p = msg.payload
    if len(p) < V.MEMORY_HEADER.size:
        return f"payload is {len(p)} bytes, shorter than the {V.MEMORY_HEADER.size}-byte header"
    n, _ = V.MEMORY_HEADER.unpack_from(p)
    if n == 0:
        return "memory table has no regions"
    if n > V.MEMORY_BASELINE_NREGIONS:
        return f"memory table has {n} regions, more than the {V.MEMORY_BASELINE_NREGIONS} allowed"
    need = V.MEMORY_HEADER.size + n * V.MEMORY_REGION.size
    full = V.MEMORY_HEADER.size + V.MEMORY_BASELINE_NREGIONS * V.MEMORY_REGION.size
    # QEMU sends exactly the regions present; UML sends its whole (2-region) struct.
    if not need <= len(p) <= full:
        return f"payload is {len(p)} bytes, {n} regions need {need} (at most {full})"
    return _fd_problem(msg, n, n)


def _config_check(msg: Message) -> str | None:
    p = msg.payload
    if len(p) < V.CONFIG_HEADER.size:
        return f"payload is {len(p)} bytes, shorter than the {V.CONFIG_HEADER.size}-byte header"
    _, size, _ = V.CONFIG_HEADER.unpack_from(p)
    if size > V.MAX_CONFIG_SIZE:
        return f"config access of {size} bytes exceeds the maximum {V.MAX_CONFIG_SIZE}"
    if len(p) != V.CONFIG_HEADER.size + size:
        return (f"payload is {len(p)} bytes, a {size}-byte config access needs "
                f"{V.CONFIG_HEADER.size + size}")
    return _fd_problem(msg, 0, 0)


_U64 = V.U64.size
_STATE = V.VRING_STATE.size

#: Rules for every front-end request the specification defines. A request that is absent
#: here is unknown: its payload is consumed and it is refused.
REQUEST_RULES: dict[int, RequestRule] = {
    R.GET_FEATURES: RequestRule(exact(0), ReplyKind.U64),
    R.SET_FEATURES: RequestRule(exact(_U64)),
    R.SET_OWNER: RequestRule(exact(0)),
    R.RESET_OWNER: RequestRule(exact(0)),
    R.SET_MEM_TABLE: RequestRule(_memory_table_check),
    R.SET_LOG_BASE: RequestRule(exact(V.LOG.size, 0, 1), feature=PF.LOG_SHMFD),
    R.SET_LOG_FD: RequestRule(exact(0, 1)),
    R.SET_VRING_NUM: RequestRule(exact(_STATE)),
    R.SET_VRING_ADDR: RequestRule(exact(V.VRING_ADDR.size)),
    R.SET_VRING_BASE: RequestRule(exact(_STATE)),
    R.GET_VRING_BASE: RequestRule(exact(_STATE), ReplyKind.VRING_STATE),
    R.SET_VRING_KICK: RequestRule(_vring_fd_check),
    R.SET_VRING_CALL: RequestRule(_vring_fd_check),
    R.SET_VRING_ERR: RequestRule(_vring_fd_check),
    R.GET_PROTOCOL_FEATURES: RequestRule(exact(0), ReplyKind.U64),
    R.SET_PROTOCOL_FEATURES: RequestRule(exact(_U64)),
    R.GET_QUEUE_NUM: RequestRule(exact(0), ReplyKind.U64, PF.MQ),
    R.SET_VRING_ENABLE: RequestRule(exact(_STATE)),
    R.SEND_RARP: RequestRule(exact(_U64), feature=PF.RARP),
    R.NET_SET_MTU: RequestRule(exact(_U64), feature=PF.NET_MTU),
    R.SET_BACKEND_REQ_FD: RequestRule(exact(0, 1), feature=PF.BACKEND_REQ),
    R.IOTLB_MSG: RequestRule(exact(V.IOTLB.size), ReplyKind.STATUS_U64),
    R.SET_VRING_ENDIAN: RequestRule(exact(_STATE), feature=PF.CROSS_ENDIAN),
    R.GET_CONFIG: RequestRule(_config_check, ReplyKind.CONFIG, PF.CONFIG),
    R.SET_CONFIG: RequestRule(_config_check, feature=PF.CONFIG),
    R.CLOSE_CRYPTO_SESSION: RequestRule(exact(_U64), feature=PF.CRYPTO_SESSION),
    R.POSTCOPY_LISTEN: RequestRule(exact(0), feature=PF.PAGEFAULT),
    R.POSTCOPY_END: RequestRule(exact(0), ReplyKind.STATUS_U64, PF.PAGEFAULT),
    R.GET_INFLIGHT_FD: RequestRule(exact(V.INFLIGHT.size), ReplyKind.INFLIGHT,
                                   PF.INFLIGHT_SHMFD),
    R.SET_INFLIGHT_FD: RequestRule(exact(V.INFLIGHT.size, 1), feature=PF.INFLIGHT_SHMFD),
    R.GPU_SET_SOCKET: RequestRule(exact(0, 1)),
    R.RESET_DEVICE: RequestRule(exact(0), feature=PF.RESET_DEVICE),
    R.VRING_KICK: RequestRule(exact(_STATE), feature=PF.INBAND_NOTIFICATIONS),
    R.GET_MAX_MEM_SLOTS: RequestRule(exact(0), ReplyKind.U64, PF.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: RequestRule(exact(V.MEM_REG.size, 1), feature=PF.CONFIGURE_MEM_SLOTS),
    # The spec says no fd, but allows one "for compatibility with existing incorrect
    # implementations" (it must be closed unused).
    R.REM_MEM_REG: RequestRule(exact(V.MEM_REG.size, 0, 1), feature=PF.CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: RequestRule(exact(_U64), feature=PF.STATUS),
    R.GET_STATUS: RequestRule(exact(0), ReplyKind.U64, PF.STATUS),
    R.GET_SHARED_OBJECT: RequestRule(exact(16), ReplyKind.STATUS_U64, PF.SHARED_OBJECT),
    R.SET_DEVICE_STATE_FD: RequestRule(exact(V.DEVICE_STATE.size, 1), ReplyKind.STATUS_U64,
                                       PF.DEVICE_STATE),
    R.CHECK_DEVICE_STATE: RequestRule(exact(0), ReplyKind.STATUS_U64, PF.DEVICE_STATE),
}

#: Rules for back-end requests, as a front-end checks them.
BACKEND_REQUEST_RULES: dict[int, RequestRule] = {
    V.BackendRequest.CONFIG_CHANGE_MSG: RequestRule(exact(0), feature=PF.CONFIG),
    V.BackendRequest.IOTLB_MSG: RequestRule(exact(V.IOTLB.size)),
    V.BackendRequest.VRING_HOST_NOTIFIER_MSG: RequestRule(exact(V.VRING_AREA.size, 0, 1),
                                                          feature=PF.HOST_NOTIFIER),
    V.BackendRequest.VRING_CALL: RequestRule(exact(_STATE),
                                             feature=PF.INBAND_NOTIFICATIONS),
    V.BackendRequest.VRING_ERR: RequestRule(exact(_STATE), feature=PF.INBAND_NOTIFICATIONS),
}


def check_request(msg: Message, rule: RequestRule) -> None:
    """Raise :class:`MessageError` unless ``msg`` follows ``rule`` (protocol feature gating is
    the caller's business: it knows what was negotiated)."""
    problem = rule.check(msg)
    if problem is not None:
        raise MessageError(problem)


# ---- framing ----------------------------------------------------------------------------------


class Decoder:
    """Incremental message decoder for one direction of one connection.

    Feed it what the socket delivered; it returns every message completed. :attr:`wanted` is
    how many bytes finish the current header or payload: read at most that many so fds are
    never received ahead of their message. Header problems raise :class:`FramingError`.
    ``max_payload`` bounds what a peer can make us buffer; ``backend`` marks decoded messages
    as back-end channel requests (for names in logs).
    """

    def __init__(self, max_payload: int = V.MAX_PAYLOAD_SIZE, *, backend: bool = False) -> None:
        self.max_payload = max_payload
        self.backend = backend
        self._buf = bytearray()
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []
        self._truncated = False

    @property
    def wanted(self) -> int:
        if self._header is None:
            return V.HEADER_SIZE - len(self._buf)
        return self._header[2] - len(self._buf)

    @property
    def in_progress(self) -> bool:
        """Whether part of a message has been received."""
        return self._header is not None or bool(self._buf) or bool(self._fds)

    def describe_partial(self) -> str:
        """What was cut off, for the log line when the peer hangs up mid-message."""
        if self._header is None:
            return f"{len(self._buf)} of {V.HEADER_SIZE} header bytes"
        name = V.backend_request_name(self._header[0]) if self.backend else \
            V.request_name(self._header[0])
        return f"{name} with {len(self._buf)} of {self._header[2]} payload bytes"

    def feed(self, data: bytes | bytearray | memoryview, fds: Iterable[int] = (),
             truncated: bool = False) -> list[Message]:
        """Consume ``data`` (and the fds that arrived with it). Returns completed messages;
        raises :class:`FramingError` for a header that cannot be trusted (the fds received
        so far are closed then)."""
        self._fds.extend(fds)
        self._truncated |= truncated
        out: list[Message] = []
        view = memoryview(data).cast("B")
        pos = 0
        try:
            while True:
                need = self.wanted
                if need > 0:
                    take = min(need, len(view) - pos)
                    self._buf += view[pos : pos + take]
                    pos += take
                    if take < need:
                        break
                if self._header is None:
                    self._header = self._parse_header()
                    self._buf.clear()
                    if self._header[2] > 0:
                        continue
                req, flags, _size = self._header
                out.append(Message(req, flags, bytes(self._buf), self._fds,
                                   fds_truncated=self._truncated, backend=self.backend))
                self._header = None
                self._buf = bytearray()
                self._fds = []
                self._truncated = False
                if pos >= len(view):
                    break
        except FramingError:
            self.close()
            for m in out:
                m.close_fds()
            raise
        return out

    def _parse_header(self) -> tuple[int, int, int]:
        req, flags, size = V.HEADER.unpack(bytes(self._buf))
        name = V.backend_request_name(req) if self.backend else V.request_name(req)
        if flags & V.VERSION_MASK != V.VERSION:
            raise FramingError(
                f"{name}: header flags 0x{flags:x} carry protocol version {flags & V.VERSION_MASK}"
                f", not {V.VERSION}"
            )
        if size > self.max_payload:
            raise FramingError(
                f"{name}: payload size {size} exceeds the maximum {self.max_payload}"
            )
        return req, flags, size

    def close(self) -> None:
        """Drop a partial message and close the fds it brought."""
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._buf = bytearray()
        self._header = None


def describe(msg: Message) -> str:
    """A one-line rendering of a message and its decoded payload for DEBUG traces."""
    head = f"{msg.name} flags=0x{msg.flags:x} size={msg.size}"
    if msg.fds:
        head += f" fds={len(msg.fds)}"
    try:
        detail = _detail(msg)
    except (MessageError, LocalError):
        detail = "(malformed payload)"
    return f"{head} {detail}".rstrip()


def _detail(msg: Message) -> str:
    p = msg.payload
    if msg.backend or not p:
        return ""
    r = msg.request
    if msg.is_reply:
        rule = REQUEST_RULES.get(r)
        kind = rule.reply if rule is not None else ReplyKind.NONE
        if kind is ReplyKind.NONE and len(p) == V.U64.size:
            return f"ack {parse_u64(p)}"
        if kind is ReplyKind.STATUS_U64 and len(p) == V.U64.size:
            return f"status {parse_u64(p)}"
    if r in (R.GET_CONFIG, R.SET_CONFIG):
        c = parse_config(p)
        return f"offset {c.offset} size {c.size} flags {c.flags}"
    if r in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE):
        s = parse_vring_state(p)
        return f"vring {s.index} num {s.num}"
    if r == R.SET_VRING_ADDR:
        a = parse_vring_addr(p)
        return (f"vring {a.index} flags 0x{a.flags:x} desc 0x{a.desc:x} used 0x{a.used:x} "
                f"avail 0x{a.avail:x} log 0x{a.log:x}")
    if r in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR) and len(p) == 8:
        v = parse_u64(p)
        return f"vring {v & V.VRING_IDX_MASK}" + (" nofd" if v & V.VRING_NOFD_MASK else "")
    if r == R.SET_MEM_TABLE:
        return "; ".join(reg.describe() for reg in parse_memory_table(p))
    if r in (R.ADD_MEM_REG, R.REM_MEM_REG):
        return parse_mem_reg(p).describe()
    if r in (R.SET_PROTOCOL_FEATURES, R.GET_PROTOCOL_FEATURES):
        return V.describe_protocol_features(parse_u64(p))
    if len(p) == 8:
        return f"0x{parse_u64(p):x}"
    return ""
