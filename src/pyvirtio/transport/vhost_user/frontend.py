"""The vhost-user front-end's protocol knowledge, sans-I/O.

What a front-end must decide and check, independent of sockets: which protocol features to
take, whether a request will be answered (and how), whether a reply is well-formed, and what
to do with a request arriving on the back-end channel. :mod:`pyvirtio.io.vhost_user_client`
does the I/O around it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvirtio.errors import PeerError
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user.codec import Message, ReplyKind

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
