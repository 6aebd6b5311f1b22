"""The vhost-user front-end protocol, sans-I/O.

:class:`FrontendProtocol` is the front-end's half of the conversation, beside the back-end's
:class:`~pyvirtio.transport.vhost_user.backend.BackendProtocol`: feature and protocol-feature
negotiation, the memory table, the order in which a vring is described, the reset sequence,
config space, and the checking of every reply. Each operation is a generator that yields the
requests to send (with the fds they carry, which the caller owns) and is sent each reply
(``None`` when :func:`expects_reply` says none comes); its return value is the operation's
result. It owns no fds and does no syscalls: :mod:`pyvirtio.io.vhost_user_client` runs the
generators over a socket and owns the memory, eventfds and the back-end channel::

    gen = protocol.handshake(wanted, None)
    msg = next(gen)
    while True:
        reply = transact(msg)            # send; receive if expects_reply(msg)
        msg = gen.send(reply)            # ... until StopIteration(value)

The module-level functions are the checks those operations use: which protocol features to
take, whether a request will be answered (and how), whether a reply is well-formed, and what
to do with a request arriving on the back-end channel.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.ring import DriverRing, fresh_base
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user.codec import Message, ReplyKind

log = logging.getLogger("pyvirtio.io.vhost_user_client")

T = TypeVar("T")
#: one front-end operation: yields requests, is sent replies, returns its result
Step = Generator[Message, "Message | None", T]

PROTOCOL_FEATURES_BIT = F.bit(V.VHOST_USER_F_PROTOCOL_FEATURES)
#: user address = guest-physical address + this (any value works; it only has to be
#: consistent between SET_MEM_TABLE and SET_VRING_ADDR)
USER_ADDR_OFFSET = 0x7F00_0000_0000

#: protocol features pyvirtio's front-end knows how to use
FRONTEND_PROTOCOL_FEATURES = V.protocol_mask(
    PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS,
    PF.STATUS,
)


class BackendRefused(PeerError):
    """The back-end NACKed a request (REPLY_ACK status non-zero, empty GET_CONFIG reply)."""


class BadReply(PeerError):
    """The back-end's reply does not match the request (type, flags or payload size)."""


def negotiate_protocol(offered: int, wanted: int = FRONTEND_PROTOCOL_FEATURES) -> int:
    """The protocol features to SET: what the back-end offered and we can use."""
    return offered & wanted


def reply_kind(request: int) -> ReplyKind:
    """What the back-end answers to ``request`` regardless of NEED_REPLY."""
    rule = C.REQUEST_RULES.get(request)
    return rule.reply if rule is not None else ReplyKind.NONE


def expects_reply(msg: Message) -> bool:
    """Whether the back-end answers ``msg`` (a reply of its own, or an ack asked for)."""
    return reply_kind(msg.request) is not ReplyKind.NONE or msg.need_reply


def wants_ack(request: int, negotiated: int) -> bool:
    """Whether to set NEED_REPLY: REPLY_ACK was negotiated and the request has no reply of
    its own (asking for an ack on a GET is meaningless and some back-ends would send two
    replies)."""
    return bool(negotiated >> PF.REPLY_ACK & 1) and reply_kind(request) is ReplyKind.NONE


def check_reply(request: Message, reply: Message) -> None:
    """Raise :class:`BadReply` unless ``reply`` answers ``request``."""
    if reply.request != request.request:
        raise BadReply(f"{request.name}: the back-end answered with {reply.name}")
    if reply.flags & ~V.NEED_REPLY_FLAG != V.VERSION | V.REPLY_FLAG:
        raise BadReply(f"{request.name}: reply flags 0x{reply.flags:x}, expected "
                       f"0x{V.VERSION | V.REPLY_FLAG:x}")


def parse_u64_reply(request: Message, reply: Message) -> int:
    check_reply(request, reply)
    if reply.size != V.U64.size:
        raise BadReply(f"{request.name}: reply payload of {reply.size} bytes, expected "
                       f"{V.U64.size}")
    return C.parse_u64(reply.payload)


def check_ack(request: Message, reply: Message) -> None:
    """A REPLY_ACK answer: raise :class:`BackendRefused` for a non-zero status."""
    status = parse_u64_reply(request, reply)
    if status != 0:
        raise BackendRefused(f"the back-end refused {request.name} (status {status})")


def parse_vring_state_reply(request: Message, reply: Message) -> C.VringState:
    check_reply(request, reply)
    if reply.size != V.VRING_STATE.size:
        raise BadReply(f"{request.name}: reply payload of {reply.size} bytes, expected "
                       f"{V.VRING_STATE.size}")
    state = C.parse_vring_state(reply.payload)
    asked = C.parse_vring_state(request.payload)
    if state.index != asked.index:
        raise BadReply(f"{request.name}: asked for vring {asked.index}, answered for "
                       f"{state.index}")
    return state


def parse_config_reply(request: Message, reply: Message) -> bytes:
    """The config bytes of a GET_CONFIG reply; an empty payload is the back-end's refusal."""
    check_reply(request, reply)
    if reply.size == 0:
        raise BackendRefused(f"the back-end refused {request.name} "
                             f"({C.describe(request)})")
    asked = C.parse_config(request.payload)
    got = C.parse_config(reply.payload)
    if reply.size != V.CONFIG_HEADER.size + asked.size or got.size != asked.size:
        raise BadReply(f"{request.name}: reply carries {got.size} config bytes in a "
                       f"{reply.size}-byte payload, asked for {asked.size}")
    return got.data


@dataclass(frozen=True)
class BackendEvent:
    """What a back-end channel request means to the front-end."""

    kind: str  # "config-change", "unsupported"
    reply: Message | None  # what to answer (when NEED_REPLY was set)
    detail: str = ""


def handle_backend_request(msg: Message, negotiated: int) -> BackendEvent:
    """Interpret one request from the back-end channel."""
    rule = C.BACKEND_REQUEST_RULES.get(msg.request)
    problem = None
    if rule is None:
        problem = "unknown back-end request"
    else:
        problem = rule.check(msg)
        if problem is None and rule.feature is not None and not negotiated >> rule.feature & 1:
            name = V.describe_protocol_features(1 << rule.feature)
            problem = f"needs protocol feature {name}, not negotiated"
    if problem is None and msg.request == V.BackendRequest.CONFIG_CHANGE_MSG:
        return BackendEvent("config-change", C.ack(msg, 0) if msg.need_reply else None)
    detail = problem or "not supported by this front-end"
    return BackendEvent("unsupported", C.ack(msg, 1) if msg.need_reply else None, detail)


class FrontendProtocol:
    """The front-end's state and sequencing for one connection (see the module docstring).

    ``mem_slots``: describe memory with ADD_MEM_REG instead of SET_MEM_TABLE when
    CONFIGURE_MEM_SLOTS is negotiated. ``name`` labels log lines (the socket path).
    """

    def __init__(self, *, mem_slots: bool = True, name: str = "vhost-user") -> None:
        self.mem_slots = mem_slots
        self.name = name
        self.protocol_features = 0
        self.backend_features = 0
        self.acked_features = 0  # last SET_FEATURES value (PROTOCOL_FEATURES bit included)
        self.num_queues = 1
        self.max_mem_slots = 0
        self.status = 0  # the status kept here when the back-end has no STATUS feature
        self.features_refused = False
        self.generation = 0
        self.config_changes = 0
        self.memory_sent = False
        #: vrings described and running, in the order they were started
        self.started: dict[int, None] = {}
        self.trace: list[str] = []  # request names sent, in order (tests assert sequences)

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    # ---- one request ----------------------------------------------------------------------

    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                ack: bool | None = None) -> Step[Message | None]:
        """One request; returns its reply (requests with a reply of their own) or None.

        With ``ack`` (default: when REPLY_ACK is negotiated and the request has no reply of
        its own) NEED_REPLY is set and a non-zero status raises :class:`BackendRefused`.
        """
        if ack is None:
            ack = wants_ack(req, self.protocol_features)
        msg = C.request(req, payload, need_reply=ack, fds=fds)
        self.trace.append(msg.name)
        rep = yield msg
        if not expects_reply(msg):
            return None
        if rep is None:
            raise LocalError(f"{msg.name} expects a reply and none was given")
        if reply_kind(req) is ReplyKind.NONE:
            check_ack(msg, rep)
            return None
        check_reply(msg, rep)
        return rep

    def _u64(self, req: int) -> Step[int]:
        rep = yield from self.request(req)
        assert rep is not None
        return parse_u64_reply(C.request(req), rep)

    # ---- connection set-up ----------------------------------------------------------------

    def handshake(self, wanted: int | None, num_queues: int | None) -> Step[None]:
        """SET_OWNER, feature and protocol-feature negotiation, queue count, memory slots.

        ``wanted``: the protocol features we are willing to use; None: act as a front-end
        that predates protocol features. Afterwards, when BACKEND_REQ was negotiated, give
        the back-end its channel with :meth:`set_backend_channel`.
        """
        self.protocol_features = 0
        yield from self.request(R.SET_OWNER)
        self.backend_features = yield from self._u64(R.GET_FEATURES)
        if wanted is None:
            self.backend_features &= ~PROTOCOL_FEATURES_BIT
        elif self.backend_features & PROTOCOL_FEATURES_BIT:
            offered = yield from self._u64(R.GET_PROTOCOL_FEATURES)
            chosen = negotiate_protocol(offered, wanted)
            # Not yet negotiated while this very message is in flight: no ack for it.
            yield from self.request(R.SET_PROTOCOL_FEATURES, C.u64(chosen), ack=False)
            self.protocol_features = chosen
        self.num_queues = num_queues if num_queues is not None else 1
        if self.has_protocol(PF.MQ):
            self.num_queues = yield from self._u64(R.GET_QUEUE_NUM)
        if self.has_protocol(PF.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = yield from self._u64(R.GET_MAX_MEM_SLOTS)

    @property
    def wants_backend_channel(self) -> bool:
        return self.has_protocol(PF.BACKEND_REQ)

    def set_backend_channel(self, fd: int) -> Step[None]:
        """Give the back-end ``fd``, its end of the back-end request channel."""
        yield from self.request(R.SET_BACKEND_REQ_FD, fds=[fd])

    # ---- features and status --------------------------------------------------------------

    def get_features(self) -> int:
        return self.backend_features & ~PROTOCOL_FEATURES_BIT

    def set_features(self, features: int) -> Step[None]:
        """SET_FEATURES; a refusal (REPLY_ACK) is remembered and clears FEATURES_OK later."""
        value = features | (self.backend_features & PROTOCOL_FEATURES_BIT)
        self.features_refused = False
        try:
            yield from self.request(R.SET_FEATURES, C.u64(value))
        except BackendRefused as exc:
            log.warning("%s: %s", self.name, exc)
            self.features_refused = True
        self.acked_features = value

    def get_status(self) -> Step[int]:
        if self.has_protocol(PF.STATUS):
            return (yield from self._u64(R.GET_STATUS))
        return self.status

    def set_status(self, status: int) -> Step[None]:
        """SET_STATUS (or keep it here without STATUS); 0 resets: see :meth:`reset`."""
        if status == 0:
            yield from self.reset()
            return
        if self.has_protocol(PF.STATUS):
            yield from self.request(R.SET_STATUS, C.u64(status))
            return
        if status & S.FEATURES_OK and self.features_refused:
            status &= ~S.FEATURES_OK
        self.status = status

    def reset(self) -> Step[None]:
        """Stop every started ring, then RESET_DEVICE and SET_STATUS 0 where negotiated.
        The caller drops its per-queue fds afterwards."""
        for index in list(self.started):
            yield from self.get_vring_base(index)
        if self.has_protocol(PF.RESET_DEVICE):
            yield from self.request(R.RESET_DEVICE)
        if self.has_protocol(PF.STATUS):
            yield from self.request(R.SET_STATUS, C.u64(0))
        self.started.clear()
        self.status = 0

    def get_vring_base(self, index: int) -> Step[int]:
        """Stop vring ``index`` on the back-end; returns its last_avail_idx."""
        payload = C.vring_state(index, 0)
        rep = yield from self.request(R.GET_VRING_BASE, payload)
        assert rep is not None
        state = parse_vring_state_reply(C.request(R.GET_VRING_BASE, payload), rep)
        self.started.pop(index, None)
        return state.num

    # ---- config space ---------------------------------------------------------------------

    def read_config(self, offset: int, length: int) -> Step[bytes]:
        if not self.has_protocol(PF.CONFIG):
            raise LocalError("the back-end does not offer config space access (no CONFIG "
                             "protocol feature)")
        payload = C.config(offset, size=length)
        rep = yield from self.request(R.GET_CONFIG, payload)
        assert rep is not None
        return parse_config_reply(C.request(R.GET_CONFIG, payload), rep)

    def write_config(self, offset: int, data: bytes) -> Step[None]:
        if not self.has_protocol(PF.CONFIG):
            raise LocalError("the back-end does not offer config space access")
        yield from self.request(R.SET_CONFIG,
                                C.config(offset, data, flags=V.CONFIG_TYPE_FRONTEND))

    # ---- memory and vrings ----------------------------------------------------------------

    def send_memory(self, memory: GuestMemory) -> Step[None]:
        """Describe ``memory``'s fd-backed regions: ADD_MEM_REG each (CONFIGURE_MEM_SLOTS)
        or one SET_MEM_TABLE."""
        descs = [C.MemoryRegionDesc(r.gpa, r.size, r.user_addr or 0, r.fd_offset)
                 for r in memory.regions]
        fds = [r.fd for r in memory.regions if r.fd is not None]
        if self.mem_slots and self.has_protocol(PF.CONFIGURE_MEM_SLOTS):
            for desc, fd in zip(descs, fds, strict=True):
                yield from self.request(R.ADD_MEM_REG, C.mem_reg(desc), [fd])
        else:
            yield from self.request(R.SET_MEM_TABLE, C.memory_table(descs), fds)
        self.memory_sent = True

    def setup_queue(self, index: int, ring: DriverRing, kick_fd: int, call_fd: int,
                    memory: GuestMemory) -> Step[None]:
        """Memory first (once), then NUM, BASE, ADDR, KICK, CALL and ENABLE for ``index``."""
        if not self.memory_sent:
            yield from self.send_memory(memory)
        self.started.pop(index, None)
        yield from self.request(R.SET_VRING_NUM, C.vring_state(index, ring.size))
        # A fresh ring: avail index 0 (split), or position 0 with wrap counter 1 (packed).
        yield from self.request(R.SET_VRING_BASE,
                                C.vring_state(index, fresh_base(self.acked_features)))
        yield from self.request(R.SET_VRING_ADDR, C.vring_addr(
            index, desc=ring.desc_addr + USER_ADDR_OFFSET,
            used=ring.used_addr + USER_ADDR_OFFSET, avail=ring.avail_addr + USER_ADDR_OFFSET))
        yield from self.request(R.SET_VRING_KICK, C.vring_fd(index), [kick_fd])
        yield from self.request(R.SET_VRING_CALL, C.vring_fd(index), [call_fd])
        if self.acked_features & PROTOCOL_FEATURES_BIT:
            # Rings start disabled once PROTOCOL_FEATURES is negotiated.
            yield from self.request(R.SET_VRING_ENABLE, C.vring_state(index, 1))
        self.started[index] = None

    # ---- the back-end channel -------------------------------------------------------------

    def backend_request(self, msg: Message) -> BackendEvent:
        """Interpret one request from the back-end channel (counting config changes)."""
        event = handle_backend_request(msg, self.protocol_features)
        if event.kind == "config-change":
            self.generation += 1
            self.config_changes += 1
        return event
