"""The vhost-user back-end state machine, fed decoded messages (no sockets): what each request
does to the device and its rings, and how bad requests are refused."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from helpers.reactor import ManualReactor
from helpers.vhost_user import FakeHost
from pyvirtio.device.rng import RngDevice
from pyvirtio.memory import GuestMemory, region_from_fd
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user.backend import (
    DEFAULT_PROTOCOL_FEATURES,
    BackendProtocol,
    ConnectionFatal,
)
from pyvirtio.transport.vhost_user.extension import BackendExtension

MEM = 1 << 20
UOFF = 0x5555_0000_0000  # the fake front-end's user address space


class Front:
    """Drive a BackendProtocol like a front-end would, with a driver ring in shared memory."""

    def __init__(self, device: RngDevice | None = None,
                 reactor: ManualReactor | None = None) -> None:
        self.device = device or RngDevice()
        self.host = FakeHost()
        self.proto = BackendProtocol(self.device, self.host, name="test",
                                     reactor=reactor)  # type: ignore[arg-type]
        self.memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM)
        self.memory = GuestMemory([region_from_fd(os.dup(self.memfd), 0, MEM, 0)])
        self.alloc = Allocator(0, MEM)
        self.efds: list[int] = []

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = True) -> list[C.Message]:
        return self.proto.handle(C.request(req, payload, need_reply=need_reply, fds=fds or []))

    def ok(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        (reply,) = self.send(req, payload, fds)
        assert C.parse_u64(reply.payload) == 0, self.proto.problems

    def nack(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> str:
        (reply,) = self.send(req, payload, fds)
        assert C.parse_u64(reply.payload) == 1
        return self.proto.problems[-1]

    def u64(self, req: int) -> int:
        (reply,) = self.send(req, need_reply=False)
        return C.parse_u64(reply.payload)

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.efds.append(fd)
        return os.dup(fd)

    def negotiate(self, protocol: int = DEFAULT_PROTOCOL_FEATURES, features: int | None = None,
                  protocol_bit: bool = True) -> None:
        offered = self.u64(R.GET_FEATURES)
        self.send(R.SET_PROTOCOL_FEATURES, C.u64(protocol), need_reply=False)
        # This front-end writes split rings by hand: it takes everything but RING_PACKED.
        wanted = offered & ~F.bit(F.RING_PACKED) if features is None else features
        if not protocol_bit:
            wanted &= ~F.bit(30)
        self.ok(R.SET_FEATURES, C.u64(wanted))

    def mem_table(self) -> None:
        desc = C.MemoryRegionDesc(0, MEM, UOFF, 0)
        self.ok(R.SET_MEM_TABLE, C.memory_table([desc]), [os.dup(self.memfd)])

    def ring(self, index: int = 0, size: int = 8, enable: bool = True,
             event_idx: bool = False) -> DriverQueue:
        q = DriverQueue(self.memory, size, self.alloc.alloc(SP.desc_table_size(size), 16),
                        self.alloc.alloc(SP.avail_size(size), 2),
                        self.alloc.alloc(SP.used_size(size), 4096), allocator=self.alloc,
                        event_idx=event_idx)
        self.ok(R.SET_VRING_NUM, C.vring_state(index, size))
        self.ok(R.SET_VRING_BASE, C.vring_state(index, 0))
        self.ok(R.SET_VRING_ADDR, C.vring_addr(index, q.desc_addr + UOFF, q.used_addr + UOFF,
                                               q.avail_addr + UOFF))
        self.ok(R.SET_VRING_CALL, C.vring_fd(index), [self.eventfd()])
        self.ok(R.SET_VRING_KICK, C.vring_fd(index), [self.eventfd()])
        if enable:
            self.ok(R.SET_VRING_ENABLE, C.vring_state(index, 1))
        return q

    def close(self) -> None:
        self.proto.close()
        self.memory.close()
        os.close(self.memfd)
        for fd in self.efds:
            os.close(fd)


@pytest.fixture
def front() -> Iterator[Front]:
    f = Front()
    yield f
    f.close()


def _post(front: Front, q: DriverQueue, n: int) -> int:
    buf = front.alloc.alloc(n, 8)
    q.add_buf([], [(buf, n)], token=buf)
    q.kick_prepare()
    return buf


def test_features_offer_the_device_bits_plus_protocol_features(front: Front) -> None:
    offered = front.u64(R.GET_FEATURES)
    assert offered == front.device.get_features() | F.bit(30)
    # CONFIG is not offered for a device without config space (nothing to get or set).
    config = V.protocol_mask(PF.CONFIG)
    assert front.u64(R.GET_PROTOCOL_FEATURES) == DEFAULT_PROTOCOL_FEATURES & ~config
    assert DEFAULT_PROTOCOL_FEATURES >> PF.BACKEND_REQ & 1  # UML's vq setup needs it
    with_config = BackendProtocol(RngDevice(config_size=4), FakeHost())
    assert with_config.offered_protocol_features == DEFAULT_PROTOCOL_FEATURES
    with_config.close()


def test_multi_round_negotiation_is_not_carried_over_vhost_user() -> None:
    # docs/multi-round.md: the back-end offers a multi-round device's first round without the
    # experimental bit, refuses an answer holding it, and negotiates plainly.
    f = Front(RngDevice(multi_round=True))
    try:
        assert f.device.get_features() & F.bit(F.MULTI_ROUND)
        offered = f.u64(R.GET_FEATURES)
        assert offered == f.device.get_features() & ~F.bit(F.MULTI_ROUND) | F.bit(30)
        f.send(R.SET_PROTOCOL_FEATURES, C.u64(DEFAULT_PROTOCOL_FEATURES), need_reply=False)
        problem = f.nack(R.SET_FEATURES, C.u64(F.bit(F.VERSION_1) | F.bit(F.MULTI_ROUND)))
        assert "multi-round negotiation needs the status register" in problem
        assert not f.device.status & S.FEATURES_OK
        f.negotiate()
        assert f.device.status & S.FEATURES_OK
        assert f.device.driver_features == offered & ~F.bit(F.RING_PACKED) & ~F.bit(30)
    finally:
        f.close()


def test_set_features_is_final_without_the_status_protocol_feature(front: Front) -> None:
    front.negotiate(protocol=V.protocol_mask(PF.REPLY_ACK))
    assert front.device.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    assert front.device.driver_features == front.device.get_features() & ~F.bit(F.RING_PACKED)


def test_a_ring_serves_after_kick_and_enable_and_get_vring_base_stops_it(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    q = front.ring(enable=False)
    assert front.device.ring(0) is None  # PROTOCOL_FEATURES negotiated: starts disabled
    front.ok(R.SET_VRING_ENABLE, C.vring_state(0, 1))
    assert front.device.ring(0) is not None
    assert front.device.status & S.DRIVER_OK  # implied by the first running ring
    buf = _post(front, q, 32)
    front.proto.on_kick(0)
    token, written = q.get_buf()  # type: ignore[misc]
    assert token == buf and written == 32
    assert hashlib.sha256(front.memory.read(buf, 32)).digest() == front.device.digest.digest()
    assert front.host.signals  # the call fd was written
    (reply,) = front.send(R.GET_VRING_BASE, C.vring_state(0, 0), need_reply=False)
    assert C.parse_vring_state(reply.payload) == C.VringState(0, 1)
    assert front.device.ring(0) is None and not front.host.watched


def test_running_rings_are_watched_for_lost_kicks_until_the_connection_closes() -> None:
    reactor = ManualReactor()
    front = Front(reactor=reactor)
    try:
        front.negotiate()
        front.mem_table()
        q = front.ring()
        assert reactor.armed() == 1  # the watch runs while a ring does
        first = _post(front, q, 32)
        front.proto.on_kick(0)
        assert q.get_buf() == (first, 32)
        lost = _post(front, q, 32)  # its kick never comes
        reactor.fire()
        assert q.get_buf() is None  # the kick may still have been on its way
        reactor.fire()
        assert q.get_buf() == (lost, 32) and front.device.lost_kicks == 1
        assert reactor.armed() == 1
    finally:
        front.close()
    assert reactor.armed() == 0


def test_a_resumed_ring_notifies_the_driver_once(front: Front) -> None:
    # A back-end killed after publishing a used buffer but before writing the call fd
    # leaves the driver waiting for an interrupt nobody sends: the next start must send it.
    front.negotiate()
    front.mem_table()
    q = front.ring()
    _post(front, q, 16)
    front.proto.on_kick(0)
    front.send(R.GET_VRING_BASE, C.vring_state(0, 0), need_reply=False)
    front.host.signals.clear()  # as if the call had been lost with the dying back-end
    call = front.eventfd()
    front.ok(R.SET_VRING_BASE, C.vring_state(0, 1))
    front.ok(R.SET_VRING_ADDR, C.vring_addr(0, q.desc_addr + UOFF, q.used_addr + UOFF,
                                            q.avail_addr + UOFF))
    front.ok(R.SET_VRING_CALL, C.vring_fd(0), [call])
    front.ok(R.SET_VRING_KICK, C.vring_fd(0), [front.eventfd()])
    front.ok(R.SET_VRING_ENABLE, C.vring_state(0, 1))
    assert front.host.signals == [call]  # no kick, no new buffer: the resumption itself
    assert q.get_buf() is not None


def test_without_protocol_features_the_ring_starts_enabled(front: Front) -> None:
    front.negotiate(protocol_bit=False)
    front.mem_table()
    front.ring(enable=False)
    assert front.device.ring(0) is not None


def test_a_disabled_ring_keeps_its_state_and_catches_up_when_enabled(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    q = front.ring()
    front.ok(R.SET_VRING_ENABLE, C.vring_state(0, 0))
    _post(front, q, 16)
    front.proto.on_kick(0)
    assert q.get_buf() is None
    front.ok(R.SET_VRING_ENABLE, C.vring_state(0, 1))
    assert q.get_buf() is not None


def test_ring_features_acked_without_being_offered_are_honoured(front: Front) -> None:
    # QEMU 7.2's vhost-user-rng passes on the guest's EVENT_IDX even if never offered.
    device = RngDevice(transport_features=F.bit(F.VERSION_1))
    f = Front(device)
    try:
        f.negotiate(features=F.bit(F.VERSION_1) | F.bit(F.EVENT_IDX) | F.bit(30))
        assert device.has_feature(F.EVENT_IDX)
        f.mem_table()
        q = f.ring(event_idx=True)
        ring = device.ring(0)
        assert ring is not None and ring.event_idx
        _post(f, q, 8)
        f.proto.on_kick(0)
        assert q.get_buf() is not None
    finally:
        f.close()


def test_device_bits_that_were_not_offered_are_refused(front: Front) -> None:
    front.u64(R.GET_FEATURES)
    front.send(R.SET_PROTOCOL_FEATURES, C.u64(DEFAULT_PROTOCOL_FEATURES), need_reply=False)
    problem = front.nack(R.SET_FEATURES, C.u64(F.bit(F.VERSION_1) | F.bit(5)))
    assert "SET_FEATURES refused: acks feature bits that were not offered: bit 5" in problem
    assert not front.device.status & S.FEATURES_OK


def test_qemu_style_status_summaries_are_understood(front: Front) -> None:
    front.negotiate()
    front.ok(R.SET_STATUS, C.u64(S.FEATURES_OK))  # QEMU 7.2 sets it without ACK/DRIVER
    assert front.u64(R.GET_STATUS) == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    front.ok(R.SET_STATUS, C.u64(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK))
    assert front.device.status & S.DRIVER_OK
    front.ok(R.SET_STATUS, C.u64(0))
    assert front.device.status == 0 and front.device.driver_features == 0


def test_reset_device_forgets_rings_but_keeps_memory_and_protocol(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    front.ring()
    front.ok(R.RESET_DEVICE)
    assert front.device.ring(0) is None and front.device.status == 0
    assert not front.host.watched
    assert front.proto.memory.regions and front.proto.protocol_features
    front.negotiate()
    front.ring()
    assert front.device.ring(0) is not None


def test_need_reply_acks_requests_that_have_no_reply_of_their_own(front: Front) -> None:
    assert front.send(R.SET_OWNER, need_reply=False) == []
    (ack,) = front.send(R.SET_OWNER, need_reply=True)
    assert ack.request == R.SET_OWNER and C.parse_u64(ack.payload) == 0


def test_an_unknown_request_is_nacked_or_ignored(front: Front) -> None:
    assert "unknown request number 99" in front.nack(99, b"\0" * 16)
    assert front.send(99, b"xyz", need_reply=False) == []
    assert front.u64(R.GET_FEATURES)  # still serving


def test_a_refused_request_that_needs_a_reply_closes_the_connection(front: Front) -> None:
    with pytest.raises(ConnectionFatal, match="vring 3 does not exist"):
        front.send(R.GET_VRING_BASE, C.vring_state(3, 0), need_reply=False)


def test_get_config_refusal_is_an_empty_payload() -> None:
    f = Front(RngDevice(config_size=4))
    try:
        f.negotiate()
        (reply,) = f.send(R.GET_CONFIG, C.config(2, size=4), need_reply=False)
        assert reply.payload == b""
        assert "offset 2 +4 is outside the 4-byte config space" in f.proto.problems[-1]
        (reply,) = f.send(R.GET_CONFIG, C.config(0, size=4), need_reply=False)
        assert C.parse_config(reply.payload) == C.ConfigAccess(0, 4, 0, bytes(4))
    finally:
        f.close()


def test_requests_of_unnegotiated_protocol_features_are_refused(front: Front) -> None:
    front.negotiate(protocol=V.protocol_mask(PF.REPLY_ACK))
    problem = front.nack(R.ADD_MEM_REG, C.mem_reg(C.MemoryRegionDesc(0, MEM, UOFF, 0)),
                         [os.dup(front.memfd)])
    assert "needs protocol feature CONFIGURE_MEM_SLOTS" in problem


def test_add_and_remove_memory_regions(front: Front) -> None:
    front.negotiate()
    half = MEM // 2
    for i in range(2):
        front.ok(R.ADD_MEM_REG, C.mem_reg(C.MemoryRegionDesc(i * half, half, UOFF + i * half,
                                                             i * half)),
                 [os.dup(front.memfd)])
    assert len(front.proto.memory.regions) == 2
    q = front.ring()  # spans nothing odd: all three areas sit in the first half
    _post(front, q, 8)
    front.proto.on_kick(0)
    assert q.get_buf() is not None
    front.ok(R.REM_MEM_REG, C.mem_reg(C.MemoryRegionDesc(half, half, UOFF + half, 0)))
    assert len(front.proto.memory.regions) == 1
    assert "no memory region matches" in front.nack(
        R.REM_MEM_REG, C.mem_reg(C.MemoryRegionDesc(half, half, UOFF + half, 0)))


def test_removing_the_region_under_a_running_ring_stops_it(front: Front) -> None:
    front.negotiate()
    front.ok(R.ADD_MEM_REG, C.mem_reg(C.MemoryRegionDesc(0, MEM, UOFF, 0)),
             [os.dup(front.memfd)])
    front.ring()
    err = front.eventfd()
    front.ok(R.SET_VRING_ERR, C.vring_fd(0), [err])
    front.ok(R.REM_MEM_REG, C.mem_reg(C.MemoryRegionDesc(0, MEM, UOFF, 0)))
    assert front.device.ring(0) is None
    assert "outside guest memory" in front.proto.problems[-1]
    assert err in front.host.signals


def test_a_broken_ring_is_reported_once_on_the_err_fd(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    q = front.ring()
    err = front.eventfd()
    front.ok(R.SET_VRING_ERR, C.vring_fd(0), [err])
    q.add_buf([], [(MEM + 0x1000, 16)], token=1)  # outside guest memory
    q.kick_prepare()
    front.proto.on_kick(0)
    front.proto.on_kick(0)
    assert front.host.signals.count(err) == 1
    assert "vring 0 broken" in front.proto.problems[-1]
    assert front.device.status & S.DEVICE_NEEDS_RESET


def test_config_changes_go_out_on_the_back_end_channel(front: Front) -> None:
    device = RngDevice(config_size=4)
    f = Front(device)
    try:
        f.negotiate()
        f.ok(R.SET_BACKEND_REQ_FD, b"", [f.eventfd()])
        f.mem_table()
        f.ring()
        device.update_config(0, b"\1\2\3\4")
        (data,) = f.host.backend
        assert data == V.HEADER.pack(V.BackendRequest.CONFIG_CHANGE_MSG, V.VERSION, 0)
    finally:
        f.close()


def test_polling_mode_starts_the_ring_without_a_kick_fd(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    q = DriverQueue(front.memory, 8, 0x10000, 0x11000, 0x12000)
    front.ok(R.SET_VRING_NUM, C.vring_state(0, 8))
    front.ok(R.SET_VRING_ADDR, C.vring_addr(0, 0x10000 + UOFF, 0x12000 + UOFF, 0x11000 + UOFF))
    front.ok(R.SET_VRING_ENABLE, C.vring_state(0, 1))
    front.ok(R.SET_VRING_KICK, C.vring_fd(0, nofd=True))
    assert front.host.polling == {0} and front.device.ring(0) is not None
    q.add_buf([], [(0x20000, 8)], token=1)
    front.proto.on_kick(0)  # what the host's poll timer does
    assert q.get_buf() == (1, 8)


def test_every_fd_of_a_refused_message_is_closed(front: Front) -> None:
    fd = front.eventfd()
    front.nack(R.SET_VRING_CALL, C.vring_fd(7), [fd])
    with pytest.raises(OSError):
        os.fstat(fd)


def test_close_releases_everything_and_resets_the_device() -> None:
    f = Front()
    f.negotiate()
    f.mem_table()
    f.ring()
    f.proto.close()
    assert f.device.status == 0 and f.device.memory is None
    assert not f.host.watched
    f.memory.close()
    os.close(f.memfd)


class _Inflight(BackendExtension):
    protocol_features = V.protocol_mask(PF.INFLIGHT_SHMFD)

    def requests(self) -> dict[int, tuple[C.RequestRule, object]]:  # type: ignore[override]
        rule = C.REQUEST_RULES[R.GET_INFLIGHT_FD]
        return {R.GET_INFLIGHT_FD: (rule, self._get)}

    def _get(self, msg: C.Message) -> C.Message:
        fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
        return self.protocol.reply_to(msg, V.INFLIGHT.pack(4096, 0, 1, 8), [fd])


def test_extensions_add_protocol_features_and_requests() -> None:
    host = FakeHost()
    proto = BackendProtocol(RngDevice(), host, extensions=[_Inflight()])
    try:
        (offer,) = proto.handle(C.request(R.GET_PROTOCOL_FEATURES))
        assert C.parse_u64(offer.payload) >> PF.INFLIGHT_SHMFD & 1
        proto.handle(C.request(R.SET_PROTOCOL_FEATURES, C.u64(C.parse_u64(offer.payload))))
        (reply,) = proto.handle(C.request(R.GET_INFLIGHT_FD, V.INFLIGHT.pack(0, 0, 1, 8)))
        assert len(reply.fds) == 1 and V.INFLIGHT.unpack(reply.payload)[0] == 4096
        reply.close_fds()
    finally:
        proto.close()
