"""The vhost-user back-end protocol: decoded front-end requests applied to a VirtioDevice.

:class:`BackendProtocol` is sans-I/O. The I/O layer (:mod:`pyvirtio.io.vhost_user_server`)
decodes messages from the socket and calls :meth:`BackendProtocol.handle`, which returns the
replies to send; every effect that needs an event loop or a syscall on a file descriptor
(watch a kick fd, poll a ring, write an eventfd, send on the back-end channel, examine, seal
and map a memory file, close an fd) goes through the small :class:`BackendHost` interface the
I/O layer implements. The protocol keeps track of the fds that arrive with messages (memory,
kick, call, err, back-end channel) and has the host close them when they are replaced, when
the ring stops and in :meth:`BackendProtocol.close`.

Ring life cycle (spec "Ring states"): a vring is configured by SET_VRING_NUM/ADDR/BASE, is
*started* by SET_VRING_KICK (or in polling mode when the kick fd is absent), and is *enabled*
from the start unless VHOST_USER_F_PROTOCOL_FEATURES was negotiated, in which case it waits
for SET_VRING_ENABLE 1. The device queue runs once the vring is started and enabled; while
disabled again it keeps its state but kicks are not processed. GET_VRING_BASE stops the ring
and answers its last_avail_idx.

Features: vhost-user front-ends only relay the device status with the STATUS protocol
feature, so SET_FEATURES is taken as final (``VirtioDevice.accept_features``), and the device
is told DRIVER_OK when its first ring starts, unless SET_STATUS said so first.

Bad requests: each refusal is logged (WARNING, naming the request and the problem) and
recorded in :attr:`BackendProtocol.problems`. The front-end learns about it from a NACK when
it set NEED_REPLY, from a zero-size reply for GET_CONFIG; a request whose reply has no error
form (GET_VRING_BASE, GET_FEATURES...) cannot be refused politely, so the connection is
closed (:class:`ConnectionFatal`). Unknown requests are refused the same way (their payload
was consumed by the decoder, so the stream stays in sync).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvirtio.core.features import describe as _describe
from pyvirtio.core.reactor import Reactor, TimerHandle
from pyvirtio.device.base import ConfigAccessError, VirtioDevice
from pyvirtio.device.engine import WATCH_INTERVAL
from pyvirtio.errors import PeerError
from pyvirtio.memory import GuestMemory, GuestMemoryError, Region, sigbus
from pyvirtio.ring import DeviceRing, fresh_base, is_packed
from pyvirtio.ring.packed import base_of_zero
from pyvirtio.spec import features as F
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user.codec import (
    Message,
    MessageError,
    ReplyKind,
    RequestRule,
)
from pyvirtio.transport.vhost_user.extension import BackendExtension, Handler

log = logging.getLogger("pyvirtio.vhost_user.backend")

#: protocol features the generic back-end implements
DEFAULT_PROTOCOL_FEATURES = V.protocol_mask(
    PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS,
    PF.STATUS,
)

#: ring features pyvirtio's DeviceQueue implements whatever the device offered. QEMU's
#: vhost-user front-ends (7.2's vhost-user-rng among them) pass on what the guest acked even
#: if the back-end never offered it; these bits are honoured, any other unoffered bit refused.
RING_FEATURES = (F.bit(F.INDIRECT_DESC) | F.bit(F.EVENT_IDX) | F.bit(F.VERSION_1)
                 | F.bit(F.ANY_LAYOUT))

PROTOCOL_FEATURES_BIT = F.bit(V.VHOST_USER_F_PROTOCOL_FEATURES)

#: memory slots offered by GET_MAX_MEM_SLOTS (QEMU needs at least as many as the guest has
#: RAM sections; a q35 guest uses a handful)
DEFAULT_MAX_MEM_SLOTS = 32


class ConnectionFatal(PeerError):
    """The front-end's request cannot be answered: the connection must be closed."""


class BackendHost(Protocol):
    """What the back-end protocol needs from the I/O layer."""

    def watch_kick(self, index: int, fd: int) -> None:
        """Call ``BackendProtocol.on_kick(index)`` whenever ``fd`` is readable (after
        draining it). Raises OSError if ``fd`` cannot be watched."""

    def unwatch_kick(self, index: int, fd: int) -> None:
        """Stop watching ``fd``."""

    def start_polling(self, index: int) -> None:
        """Call ``on_kick(index)`` periodically: the front-end gave no kick fd."""

    def stop_polling(self, index: int) -> None:
        """Stop polling vring ``index``."""

    def adopt_signal_fd(self, fd: int) -> None:
        """Prepare a call/err/back-end-channel fd for writing without ever blocking.
        Raises OSError if it is unusable."""

    def signal(self, fd: int) -> None:
        """Write an 8-byte 1 to a call or err eventfd (or pipe)."""

    def send_backend(self, fd: int, data: bytes) -> None:
        """Write one back-end request on the back-end channel."""

    def map_memory(self, fd: int, gpa: int, size: int, fd_offset: int,
                   user_addr: int | None) -> Region:
        """Map ``size`` bytes of the memory file ``fd`` from ``fd_offset`` (sealing it
        against shrinking where possible); the region owns ``fd`` on success. Raises
        :class:`~pyvirtio.memory.GuestMemoryError` saying what is wrong with the fd."""
        ...

    def close_fd(self, fd: int) -> None:
        """Close an fd the front-end sent (ignoring one already gone)."""


def decode_vring_base(features: int, base: int | None) -> tuple[int | None, int | None]:
    """``(last_avail_idx, used_idx)`` to start a ring from a SET_VRING_BASE value (None:
    never sent, or the ring's own default).

    Split: the 16-bit avail index (the used index is read from the used ring). Packed
    (vhost-user.rst, "Vring descriptor indices for packed virtqueues"): bits 0-14 the next
    avail position, bit 15 the avail wrap counter; bits 16-30 and bit 31 the same for the
    used position. Front-ends that predate the used half (QEMU 7.2) send it as zero: the
    used position then equals the avail one (nothing in flight).
    """
    if base is None:
        return None, None
    if not is_packed(features):
        return base & 0xFFFF, None
    used = base >> 16
    return base & 0xFFFF, (used or None)


def encode_vring_base(features: int, ring: DeviceRing) -> int:
    """The GET_VRING_BASE answer for a stopped ring (the inverse of
    :func:`decode_vring_base`)."""
    if not is_packed(features):
        return ring.last_avail_idx & 0xFFFF
    return ring.last_avail_idx | ring.used_idx << 16


@dataclass(eq=False)
class Vring:
    """Front-end supplied state of one vring, before and while it runs."""

    index: int
    num: int = 0  # 0: not set yet
    #: where to start (SET_VRING_BASE, or saved at stop), as the message carries it: the
    #: split ring's avail index, or the packed ring's avail position and wrap counter in
    #: bits 0-15 and (if not zero) its used position and wrap counter in bits 16-31; None:
    #: never set (a fresh ring)
    base: int | None = None
    addr: C.VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    polling: bool = False
    enabled: bool | None = None  # None: the default, decided by PROTOCOL_FEATURES
    ring: DeviceRing | None = None
    start_failed: str | None = None
    broken_reported: bool = False

    def describe(self) -> str:
        return f"vring {self.index}"


class BackendProtocol:
    """One front-end connection's view of one device.

    ``device`` is the VirtioDevice to serve; ``host`` the I/O layer's services;
    ``reactor`` is given to the device (timers, readers of its own back-ends); with one,
    the running rings are watched for lost notifications
    (:meth:`~pyvirtio.device.engine.QueueEngine.watch`).
    ``protocol_features`` is the offer (extensions add theirs; CONFIG is left out for a
    device without config space); ``max_mem_slots`` the answer to GET_MAX_MEM_SLOTS and the
    limit for ADD_MEM_REG.
    """

    def __init__(
        self,
        device: VirtioDevice,
        host: BackendHost,
        *,
        reactor: Reactor | None = None,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        extensions: Iterable[BackendExtension] = (),
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        name: str = "vhost-user",
    ) -> None:
        self.device = device
        self.host = host
        self.name = name
        self.log = log
        self.memory = GuestMemory()
        self.max_mem_slots = max_mem_slots
        self.extensions = list(extensions)
        self.offered_protocol_features = protocol_features
        if not device.config:
            # Nothing to GET or SET; QEMU front-ends without config support warn about it.
            self.offered_protocol_features &= ~V.protocol_mask(PF.CONFIG)
        for ext in self.extensions:
            self.offered_protocol_features |= ext.protocol_features
        self.protocol_features = 0  # negotiated
        self.acked_features: int | None = None  # last SET_FEATURES, bit 30 included
        self.owner = False
        self.backend_fd: int | None = None
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.problems: list[str] = []  # every refusal, newest last
        #: names of the most recent requests, oldest first (what a front-end actually sends)
        self.requests: deque[str] = deque(maxlen=1000)
        self.messages = 0
        self.closed = False
        self.reactor = reactor
        self._watch: TimerHandle | None = None
        self._sigbus_seen = sigbus.faults
        self._truncated: set[int] = set()  # id() of regions reported as truncated
        self.rules: dict[int, RequestRule] = dict(C.REQUEST_RULES)
        self.handlers: dict[int, Handler] = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset_owner,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_kick,
            R.SET_VRING_CALL: self._set_vring_call,
            R.SET_VRING_ERR: self._set_vring_err,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.GET_CONFIG: self._get_config,
            R.SET_CONFIG: self._set_config,
            R.RESET_DEVICE: self._reset_device,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
        }
        for ext in self.extensions:
            ext.attach(self)
            for req, (rule, handler) in ext.requests().items():
                self.rules[req] = rule
                self.handlers[req] = handler
        device.memory = self.memory
        if reactor is not None:
            device.reactor = reactor
        device.notify_queue = self._notify_queue
        device.notify_config = self._notify_config
        device.poll_queue = self.on_kick  # a device's own ring polls obey the enable gate

    # ---- dispatch -------------------------------------------------------------------------

    def handle(self, msg: Message) -> list[Message]:
        """Apply one front-end request; returns the replies to send (usually zero or one).

        Raises :class:`ConnectionFatal` when the connection must be closed. Every fd of
        ``msg`` not kept by a handler is closed before this returns.
        """
        self.messages += 1
        self.requests.append(msg.name)
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s <- %s", self.name, C.describe(msg))
        rule = self.rules.get(msg.request)
        try:
            try:
                out = self._dispatch(msg, rule)
            except MessageError as exc:
                out = self._refuse(msg, rule, str(exc))
        finally:
            msg.close_fds()
        if self.log.isEnabledFor(logging.DEBUG):
            for m in out:
                self.log.debug("%s -> %s", self.name, C.describe(m))
        return out

    def _dispatch(self, msg: Message, rule: RequestRule | None) -> list[Message]:
        if msg.is_reply:
            raise MessageError("the front-end set the REPLY flag on a request")
        unknown = msg.flags & ~V.KNOWN_FLAGS
        if unknown:
            self.log.info("%s: %s carries unknown flag bits 0x%x (ignored)", self.name, msg.name,
                          unknown)
        handler = self.handlers.get(msg.request)
        if rule is None:
            raise MessageError(f"unknown request number {msg.request}")
        C.check_request(msg, rule)
        if rule.feature is not None and not self.protocol_features >> rule.feature & 1:
            name = V.describe_protocol_features(1 << rule.feature)
            raise MessageError(f"needs protocol feature {name}, which was not negotiated")
        if handler is None:
            raise MessageError("not supported by this back-end")
        try:
            answer = handler(msg)
        except GuestMemoryError as exc:
            raise MessageError(str(exc)) from exc
        if answer is not None:
            return [answer]
        if msg.need_reply:
            return [C.ack(msg, 0)]
        return []

    def _refuse(self, msg: Message, rule: RequestRule | None, reason: str) -> list[Message]:
        text = f"{self.name}: {msg.name} refused: {reason}"
        self.problems.append(text)
        kind = rule.reply if rule is not None else ReplyKind.NONE
        if kind is ReplyKind.CONFIG:
            self.log.warning("%s (answered with an empty config payload)", text)
            return [C.reply(msg)]
        if kind is ReplyKind.STATUS_U64:
            self.log.warning("%s (answered with failure)", text)
            return [C.ack(msg, 1)]
        if kind is not ReplyKind.NONE:
            self.log.warning("%s; its reply has no error form, closing the connection", text)
            raise ConnectionFatal(text)
        if msg.need_reply:
            self.log.warning("%s (NACKed)", text)
            return [C.ack(msg, 1)]
        self.log.warning("%s (ignored; the front-end asked for no reply)", text)
        return []

    # ---- helpers --------------------------------------------------------------------------

    def reply_to(self, msg: Message, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        """Build a reply to ``msg`` (for extensions). Its ``fds`` are given away: the I/O
        layer closes them once sent."""
        return C.reply(msg, payload, fds)

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise MessageError(f"vring {index} does not exist (the device has "
                               f"{len(self.vrings)} queue{'s' if len(self.vrings) != 1 else ''})")
        return self.vrings[index]

    def _enabled(self, v: Vring) -> bool:
        if v.enabled is not None:
            return v.enabled
        acked = self.acked_features
        return not (acked is not None and acked & PROTOCOL_FEATURES_BIT)

    def _close(self, fd: int | None) -> None:
        if fd is not None:
            self.host.close_fd(fd)

    # ---- features and ownership -----------------------------------------------------------

    def _get_features(self, msg: Message) -> Message:
        # Multi-round negotiation (docs/multi-round.md) is not carried over vhost-user yet:
        # a front-end is offered the first round's features without the bit (one plain round).
        offer = self.device.get_features() & ~F.bit(F.MULTI_ROUND)
        return C.reply(msg, C.u64(offer | PROTOCOL_FEATURES_BIT))

    def _set_features(self, msg: Message) -> None:
        value = C.parse_u64(msg.payload)
        features = value & ~PROTOCOL_FEATURES_BIT
        offered = self.device.get_features()
        extra = features & ~offered
        if extra & ~RING_FEATURES:
            raise MessageError(f"acks feature bits that were not offered: "
                               f"{_describe(extra & ~RING_FEATURES)}")
        if extra:
            self.log.info("%s: front-end acked %s without the device offering it; honoured "
                          "(the rings implement it)", self.name, _describe(extra))
        problem = self.device.accept_features(features, tolerate=RING_FEATURES)
        if problem is not None:
            raise MessageError(problem)
        self.acked_features = value

    def _get_protocol_features(self, msg: Message) -> Message:
        return C.reply(msg, C.u64(self.offered_protocol_features))

    def _set_protocol_features(self, msg: Message) -> None:
        value = C.parse_u64(msg.payload)
        extra = value & ~self.offered_protocol_features
        if extra:
            self.log.warning("%s: SET_PROTOCOL_FEATURES acks %s, never offered; ignoring those "
                             "bits", self.name, V.describe_protocol_features(extra))
        self.protocol_features = value & self.offered_protocol_features
        self.log.info("%s: protocol features %s", self.name,
                      V.describe_protocol_features(self.protocol_features))

    def _set_owner(self, msg: Message) -> None:
        if self.owner:
            self.log.info("%s: SET_OWNER again (already owned; accepted)", self.name)
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends ignoring it or disabling the rings. Stop them.
        self.log.info("%s: RESET_OWNER (deprecated): stopping every ring", self.name)
        for v in self.vrings:
            self._stop_vring(v)

    # ---- memory -----------------------------------------------------------------------------

    def _check_layout(self, descs: Sequence[C.MemoryRegionDesc], names: Sequence[str],
                      existing: Iterable[Region] = ()) -> None:
        """Refuse zero sizes, 64-bit overflows and overlaps (guest or user addresses)."""
        for d, what in zip(descs, names, strict=True):
            if d.size == 0:
                raise MessageError(f"{what} ({d.describe()}) has size 0")
            for base, label in ((d.gpa, "guest address"), (d.user_addr, "user address"),
                                (d.mmap_offset, "mmap offset")):
                if base + d.size > 1 << 64:
                    raise MessageError(f"{what}: {label} 0x{base:x} + size 0x{d.size:x} "
                                       "overflows 64 bits")
        spans = [(d.gpa, d.user_addr, d.size, what) for d, what in zip(descs, names, strict=True)]
        spans += [(r.gpa, r.user_addr if r.user_addr is not None else -(1 << 65), r.size,
                   f"existing region at gpa 0x{r.gpa:x}") for r in existing]
        for i, (g1, u1, s1, w1) in enumerate(spans):
            for g2, u2, s2, w2 in spans[i + 1 :]:
                if g1 < g2 + s2 and g2 < g1 + s1:
                    raise MessageError(f"{w1} (gpa 0x{g1:x} +0x{s1:x}) overlaps {w2} "
                                       f"(gpa 0x{g2:x} +0x{s2:x})")
                if u1 < u2 + s2 and u2 < u1 + s1:
                    raise MessageError(f"{w1} (user 0x{u1:x} +0x{s1:x}) overlaps {w2} "
                                       f"(user 0x{u2:x} +0x{s2:x}) in the front-end's "
                                       "address space")

    def _map_region(self, d: C.MemoryRegionDesc, fd: int, what: str) -> Region:
        """Map one region from ``fd`` (not yet owned: the caller takes the fd on success)."""
        try:
            return self.host.map_memory(fd, d.gpa, d.size, d.mmap_offset, d.user_addr)
        except GuestMemoryError as exc:
            raise MessageError(f"{what}: {exc}") from exc

    def _set_mem_table(self, msg: Message) -> None:
        descs = C.parse_memory_table(msg.payload)
        names = [f"region {i}" for i in range(len(descs))]
        self._check_layout(descs, names)
        regions: list[Region] = []
        try:
            for i, d in enumerate(descs):
                regions.append(self._map_region(d, msg.fds[i], names[i]))
                msg.take_fd(i)
        except BaseException:
            for r in regions:
                r.close()
            raise
        for old in self.memory.regions:
            self.memory.remove_region(old.gpa, old.size)
            old.close()
        for r in regions:
            self.memory.add_region(r)
        self.log.info("%s: memory table: %s", self.name,
                      "; ".join(d.describe() for d in descs))
        self._memory_changed()

    def _get_max_mem_slots(self, msg: Message) -> Message:
        return C.reply(msg, C.u64(self.max_mem_slots))

    def _add_mem_reg(self, msg: Message) -> None:
        d = C.parse_mem_reg(msg.payload)
        if len(self.memory.regions) >= self.max_mem_slots:
            raise MessageError(f"all {self.max_mem_slots} memory slots are in use; cannot add "
                               f"{d.describe()}")
        self._check_layout([d], ["new region"], self.memory.regions)
        region = self._map_region(d, msg.fds[0], "new region")
        msg.take_fd(0)
        self.memory.add_region(region)
        self.log.info("%s: added memory region %s", self.name, d.describe())
        self._memory_changed()

    def _rem_mem_reg(self, msg: Message) -> None:
        d = C.parse_mem_reg(msg.payload)
        for r in self.memory.regions:
            if r.gpa == d.gpa and r.size == d.size and r.user_addr == d.user_addr:
                self.memory.remove_region(r.gpa, r.size)
                r.close()
                self.log.info("%s: removed memory region %s", self.name, d.describe())
                self._memory_changed()
                return
        raise MessageError(f"no memory region matches {d.describe()}")

    def _memory_changed(self) -> None:
        """After a memory table change: a running ring whose areas moved or vanished stops."""
        for v in self.vrings:
            v.start_failed = None
            ring = v.ring
            if ring is None or v.addr is None:
                continue
            try:
                where = self._translate(v)
            except MessageError as exc:
                self._ring_problem(v, f"memory change left it outside guest memory: {exc}")
                self._stop_vring(v)
                continue
            if where != (ring.desc_addr, ring.avail_addr, ring.used_addr):
                self._ring_problem(v, "memory change moved its ring areas")
                self._stop_vring(v)

    def _translate(self, v: Vring, num: int | None = None) -> tuple[int, int, int]:
        """The guest-physical addresses of the vring's three areas (whole areas must lie in
        guest memory; ``num`` 0 checks only the first byte of each)."""
        assert v.addr is not None
        n = v.num if num is None else num
        out = []
        for label, uaddr, length in (
            ("descriptor table", v.addr.desc, SP.desc_table_size(n) if n else 1),
            ("avail ring", v.addr.avail, SP.avail_size(n) if n else 1),
            ("used ring", v.addr.used, SP.used_size(n) if n else 1),
        ):
            try:
                out.append(self.memory.user_to_gpa(uaddr, length))
            except GuestMemoryError as exc:
                raise MessageError(f"{v.describe()} {label} at user address 0x{uaddr:x} "
                                   f"+{length} is outside guest memory") from exc
        return out[0], out[1], out[2]

    # ---- vrings -------------------------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        s = C.parse_vring_state(msg.payload)
        v = self._vring(s.index)
        if v.ring is not None:
            raise MessageError(f"{v.describe()} is running; its size cannot change")
        max_size = self.device.queues[s.index].max_size
        if not SP.is_valid_queue_size(s.num):
            raise MessageError(f"{v.describe()} size {s.num} is not a power of two in "
                               f"1..{SP.MAX_QUEUE_SIZE}")
        if s.num > max_size:
            raise MessageError(f"{v.describe()} size {s.num} exceeds the device's maximum "
                               f"{max_size}")
        v.num = s.num
        v.start_failed = None

    def _set_vring_addr(self, msg: Message) -> None:
        a = C.parse_vring_addr(msg.payload)
        v = self._vring(a.index)
        if not self.memory.regions:
            raise MessageError(f"{v.describe()} addresses sent before any memory table")
        if v.ring is not None:
            if v.addr is not None and (a.desc, a.used, a.avail) == (v.addr.desc, v.addr.used,
                                                                    v.addr.avail):
                v.addr = a  # flags only (QEMU toggles dirty logging this way)
                return
            raise MessageError(f"{v.describe()} is running; its addresses cannot change")
        old, v.addr = v.addr, a
        try:
            self._translate(v)
        except MessageError:
            v.addr = old
            raise
        v.start_failed = None

    def _set_vring_base(self, msg: Message) -> None:
        s = C.parse_vring_state(msg.payload)
        v = self._vring(s.index)
        if v.ring is not None:
            raise MessageError(f"{v.describe()} is running; its base cannot change")
        if s.num > 0xFFFFFFFF or (s.num > 0xFFFF and not is_packed(self.device.driver_features)):
            raise MessageError(f"{v.describe()} base {s.num} does not fit the 16-bit "
                               "avail index of a split ring")
        v.base = s.num
        v.start_failed = None

    def _get_vring_base(self, msg: Message) -> Message:
        s = C.parse_vring_state(msg.payload)
        v = self._vring(s.index)
        base = self._stop_vring(v)
        # As libvhost-user: the ring's notifiers die with it; a restart sends new ones.
        self._drop_kick(v)
        self._close(v.call_fd)
        v.call_fd = None
        return C.reply(msg, C.vring_state(s.index, base))

    def _vring_fd_payload(self, msg: Message) -> tuple[Vring, bool]:
        value = C.parse_u64(msg.payload)
        return self._vring(value & V.VRING_IDX_MASK), bool(value & V.VRING_NOFD_MASK)

    def _drop_kick(self, v: Vring) -> None:
        if v.kick_fd is not None:
            self.host.unwatch_kick(v.index, v.kick_fd)
            self._close(v.kick_fd)
            v.kick_fd = None
        if v.polling:
            self.host.stop_polling(v.index)
            v.polling = False

    def _set_vring_kick(self, msg: Message) -> None:
        v, nofd = self._vring_fd_payload(msg)
        if not self.memory.regions:
            raise MessageError(f"{v.describe()} kicked before any memory table: the ring "
                               "cannot start")
        if v.addr is None:
            raise MessageError(f"{v.describe()} kicked before SET_VRING_ADDR: the ring "
                               "cannot start")
        if v.num == 0:
            raise MessageError(f"{v.describe()} kicked before SET_VRING_NUM: the ring "
                               "cannot start")
        self._drop_kick(v)
        if nofd:
            self.host.start_polling(v.index)
            v.polling = True
        else:
            fd = msg.fds[0]
            try:
                self.host.watch_kick(v.index, fd)
            except OSError as exc:
                raise MessageError(f"{v.describe()} kick fd cannot be watched: {exc}") from exc
            v.kick_fd = msg.take_fd(0)
        v.started = True
        v.start_failed = None
        self._update_ring(v)

    def _take_signal_fd(self, msg: Message, what: str) -> tuple[Vring, int | None]:
        v, nofd = self._vring_fd_payload(msg)
        if nofd:
            return v, None
        try:
            self.host.adopt_signal_fd(msg.fds[0])
        except OSError as exc:
            raise MessageError(f"{v.describe()} {what} fd is unusable: {exc}") from exc
        return v, msg.take_fd(0)

    def _set_vring_call(self, msg: Message) -> None:
        v, fd = self._take_signal_fd(msg, "call")
        self._close(v.call_fd)
        v.call_fd = fd

    def _set_vring_err(self, msg: Message) -> None:
        v, fd = self._take_signal_fd(msg, "err")
        self._close(v.err_fd)
        v.err_fd = fd

    def _set_vring_enable(self, msg: Message) -> None:
        s = C.parse_vring_state(msg.payload)
        v = self._vring(s.index)
        if s.num not in (0, 1):
            raise MessageError(f"{v.describe()} enable value {s.num} is neither 0 nor 1")
        v.enabled = bool(s.num)
        self._update_ring(v)

    def _get_queue_num(self, msg: Message) -> Message:
        return C.reply(msg, C.u64(len(self.vrings)))

    def _update_ring(self, v: Vring) -> None:
        """Start the device queue once the vring is started and enabled; when re-enabled,
        process what was made available meanwhile."""
        if not v.started or not self._enabled(v):
            return
        if v.ring is None:
            if v.start_failed is not None:
                return
            try:
                self._start_ring(v)
            except PeerError as exc:
                v.start_failed = str(exc)
                self._ring_problem(v, f"cannot start: {exc}")
                return
            assert v.ring is not None
            fresh = fresh_base(self.device.driver_features)
            if v.ring.last_avail_idx != fresh or v.ring.used_idx != fresh:
                # The ring resumes (a reconnection, or a restart after GET_VRING_BASE): a
                # back-end before us may have published used buffers and died before
                # writing the call fd, and nobody else will tell the driver. A spurious
                # notification costs the driver a look; a lost one hangs it forever.
                self.log.info("%s: %s resumes at used idx %d: driver notified once",
                              self.name, v.describe(), v.ring.used_idx)
                self._notify_queue(v.index)
        if self._watch is None and self.reactor is not None:
            self._watch = self.reactor.call_every(WATCH_INTERVAL, self._watch_rings)
        self.on_kick(v.index)

    def _watch_rings(self) -> None:
        """Every WATCH_INTERVAL while a ring runs: let each queue make up for a lost
        notification, and say so (a real peer that loses them, or a bug of ours). Stops
        when no ring runs; the next ring started starts it again."""
        if self.closed or self.reactor is None:
            return
        running = False
        for v in self.vrings:
            engine = self.device.queues[v.index].engine if v.ring is not None else None
            if engine is None or engine.ring is not v.ring:
                continue
            running = True
            done = engine.watch()
            if done is not None:
                d = self.device
                lost = d.lost_kicks + d.renotified
                if lost <= 10 or lost % 100 == 0:
                    self.log.warning("%s: %s: %s (so far: %d kicks missed, %d interrupts "
                                     "repeated)", self.name, v.describe(), done,
                                     d.lost_kicks, d.renotified)
        if not running and self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _start_ring(self, v: Vring) -> None:
        desc, avail, used = self._translate(v)
        d = self.device
        if not d.status & S.FEATURES_OK:
            # No SET_FEATURES (or a refused one): run with what was acked so far.
            problem = d.accept_features(d.driver_features, tolerate=RING_FEATURES)
            if problem is not None:
                raise PeerError(f"features unacceptable: {problem}")
        last_avail, used_pos = decode_vring_base(d.driver_features, v.base)
        if last_avail == 0 and used_pos is None and is_packed(d.driver_features) \
                and d.memory is not None:
            # UML's virtio_uml sends 0 for a fresh packed ring (wrap counter 0): see whether
            # the ring ever completed a lap, else start it fresh.
            last_avail = base_of_zero(d.memory, desc, d.endian)
            if last_avail:
                self.log.info("%s: %s: SET_VRING_BASE 0 on a packed ring that never "
                              "wrapped: started fresh (wrap counter 1)", self.name,
                              v.describe())
        v.ring = d.start_queue(v.index, v.num, desc, avail, used, last_avail_idx=last_avail,
                               used_idx=used_pos)
        v.broken_reported = False
        self.log.info("%s: %s started: size %d, desc 0x%x avail 0x%x used 0x%x, "
                      "last_avail_idx %d used_idx %d", self.name, v.describe(), v.num, desc,
                      avail, used, v.ring.last_avail_idx, v.ring.used_idx)
        for ext in self.extensions:
            ext.on_ring_started(v.index, v.ring)
        if not d.status & S.DRIVER_OK:
            d.set_status(d.status | S.DRIVER_OK)

    def _stop_vring(self, v: Vring) -> int:
        """Stop the ring (keeping its fds); returns the last_avail_idx to resume from."""
        if v.polling:
            self.host.stop_polling(v.index)
            v.polling = False
        v.started = False
        ring, v.ring = v.ring, None
        if ring is not None:
            if self.device.ring(v.index) is ring:
                self.device.stop_queue(v.index)
            v.base = encode_vring_base(self.device.driver_features, ring)
            self.log.info("%s: %s stopped at last_avail_idx %d used_idx %d", self.name,
                          v.describe(), ring.last_avail_idx, ring.used_idx)
            for ext in self.extensions:
                ext.on_ring_stopped(v.index, ring.last_avail_idx)
        return fresh_base(self.device.driver_features) if v.base is None else v.base

    def on_kick(self, index: int) -> None:
        """The front-end kicked vring ``index`` (the host drained the fd, or watches an
        eventfd edge-triggered)."""
        v = self.vrings[index]
        ring = v.ring
        if ring is None or not (v.enabled if v.enabled is not None else self._enabled(v)):
            return
        if ring.broken is None:
            self.device.kick(index)
            if sigbus.faults != self._sigbus_seen:
                self._check_truncated()
                if v.ring is None:
                    return
        if ring.broken is not None and not v.broken_reported:
            v.broken_reported = True
            self._ring_problem(v, f"broken: {ring.broken}")

    def _check_truncated(self) -> None:
        """A SIGBUS was survived (see :mod:`pyvirtio.memory.sigbus`): if it was in our
        memory, the front-end shrank a region's file under the mapping. Its pages past the
        end now read as zeros, shared with nobody: every ring stops."""
        self._sigbus_seen = sigbus.faults
        for r in self.memory.regions:
            if r.guard is None or not r.guard.faulted or id(r) in self._truncated:
                continue
            self._truncated.add(id(r))
            text = (f"{self.name}: memory region gpa 0x{r.gpa:x} size 0x{r.size:x}: its file "
                    "shrank under the mapping (the front-end truncated it); access past its "
                    "end faulted (SIGBUS, survived)")
            self.problems.append(text)
            self.log.warning("%s", text)
            for v in self.vrings:
                if v.ring is not None:
                    self._ring_problem(v, "stopped: its guest memory was truncated")
                    self._stop_vring(v)

    def _ring_problem(self, v: Vring, text: str) -> None:
        message = f"{self.name}: {v.describe()} {text}"
        self.problems.append(message)
        self.log.warning("%s", message)
        if v.err_fd is not None:
            self.host.signal(v.err_fd)

    # ---- notifications from the device ----------------------------------------------------

    def _notify_queue(self, index: int) -> None:
        fd = self.vrings[index].call_fd
        if fd is not None:
            self.host.signal(fd)

    def _notify_config(self) -> None:
        if self.backend_fd is None or not self.has_protocol_feature(PF.CONFIG):
            self.log.info("%s: config changed, but the front-end cannot be told (no back-end "
                          "channel or CONFIG not negotiated)", self.name)
            return
        # No NEED_REPLY: UML's channel is a pipe we can only write to.
        msg = C.request(V.BackendRequest.CONFIG_CHANGE_MSG, backend=True)
        self.log.debug("%s => %s", self.name, C.describe(msg))
        self.host.send_backend(self.backend_fd, msg.encode())

    def _set_backend_req_fd(self, msg: Message) -> None:
        try:
            self.host.adopt_signal_fd(msg.fds[0])
        except OSError as exc:
            raise MessageError(f"back-end channel fd is unusable: {exc}") from exc
        self._close(self.backend_fd)
        self.backend_fd = msg.take_fd(0)

    # ---- config space -----------------------------------------------------------------------

    def _get_config(self, msg: Message) -> Message:
        c = C.parse_config(msg.payload)
        try:
            data = self.device.read_config(c.offset, c.size)
        except ConfigAccessError as exc:
            raise MessageError(str(exc)) from exc
        return C.reply(msg, C.config(c.offset, data, flags=c.flags))

    def _set_config(self, msg: Message) -> None:
        c = C.parse_config(msg.payload)
        d = self.device
        if c.flags == V.CONFIG_TYPE_FRONTEND:
            try:
                d.write_config(c.offset, c.data)
            except ConfigAccessError as exc:
                raise MessageError(str(exc)) from exc
        elif c.flags == V.CONFIG_TYPE_MIGRATION:
            if c.offset + c.size > len(d.config):
                raise MessageError(f"migration config write at offset {c.offset} +{c.size} is "
                                   f"outside the {len(d.config)}-byte config space")
            self.log.info("%s: config restored by migration at offset %d +%d", self.name,
                          c.offset, c.size)
            d.update_config(c.offset, c.data, notify=False)
        else:
            raise MessageError(f"unknown SET_CONFIG flags {c.flags}")

    # ---- status and reset -------------------------------------------------------------------

    def _reset_device(self, msg: Message) -> None:
        self.log.info("%s: RESET_DEVICE", self.name)
        self.reset_device()

    def reset_device(self) -> None:
        """Every ring stopped and forgotten, the device reset; memory, protocol features and
        the back-end channel stay (the owner keeps the session)."""
        for v in self.vrings:
            self._stop_vring(v)
            self._drop_kick(v)
            self._close(v.call_fd)
            self._close(v.err_fd)
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]
        self.acked_features = None
        self.device.reset()
        for ext in self.extensions:
            ext.on_reset()

    def _set_status(self, msg: Message) -> None:
        value = C.parse_u64(msg.payload)
        if value > 0xFF:
            raise MessageError(f"status 0x{value:x} does not fit the 8-bit status field")
        d = self.device
        if value == 0:
            self.log.info("%s: SET_STATUS 0: device reset", self.name)
            for v in self.vrings:
                self._stop_vring(v)
            d.reset()
            for ext in self.extensions:
                ext.on_reset()
            return
        # Front-ends summarise: QEMU 7.2 sets FEATURES_OK or DRIVER_OK without the bits
        # before them. ACKNOWLEDGE and DRIVER are implied by either.
        if value & (S.FEATURES_OK | S.DRIVER_OK):
            value |= S.ACKNOWLEDGE | S.DRIVER
        new = value & ~d.status
        if new & S.FEATURES_OK:
            d.accept_features(d.driver_features, tolerate=RING_FEATURES)
            new &= ~(S.FEATURES_OK | S.ACKNOWLEDGE | S.DRIVER)
        if new & (S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK | S.FAILED):
            d.set_status(d.status | new)
        cleared = d.status & ~value & ~S.DEVICE_NEEDS_RESET
        if cleared:
            self.log.info("%s: SET_STATUS 0x%x would clear %s without a reset; ignored",
                          self.name, value, S.describe(cleared))

    def _get_status(self, msg: Message) -> Message:
        return C.reply(msg, C.u64(self.device.get_status()))

    # ---- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """The front-end is gone: stop every ring, reset the device, release fds and memory."""
        if self.closed:
            return
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for v in self.vrings:
            self._stop_vring(v)
            self._drop_kick(v)
            self._close(v.call_fd)
            self._close(v.err_fd)
            v.call_fd = v.err_fd = None
        self._close(self.backend_fd)
        self.backend_fd = None
        d = self.device
        d.notify_queue = _ignore_queue
        d.notify_config = _ignore
        d.reset()
        for ext in self.extensions:
            ext.on_reset()
            ext.close()
        if d.memory is self.memory:
            d.memory = None
        self.memory.close()


def _ignore_queue(index: int) -> None:
    pass


def _ignore() -> None:
    pass
