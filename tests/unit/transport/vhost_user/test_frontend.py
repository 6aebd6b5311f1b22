"""The vhost-user front-end state machine talking to the back-end state machine, both sans
I/O: every request FrontendProtocol yields is handled by a BackendProtocol serving an
RngDevice and its reply is sent back, so the sequencing and reply checks run against our real
back-end without a socket."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import TypeVar

import pytest

from helpers.vhost_user import FakeHost
from pyvirtio.device.rng import RngDevice
from pyvirtio.errors import LocalError
from pyvirtio.io.vhost_user_client import sealed_memory
from pyvirtio.memory import GuestMemory
from pyvirtio.ring import DriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.transport.vhost_user import frontend as FE
from pyvirtio.transport.vhost_user.backend import BackendProtocol
from pyvirtio.transport.vhost_user.frontend import FrontendProtocol

T = TypeVar("T")
MEM = 1 << 20


class Link:
    """A FrontendProtocol and a BackendProtocol, each request handed over in memory. Fds
    are duplicated on the way (the back-end owns what it receives, as over a socket)."""

    def __init__(self, device: RngDevice) -> None:
        self.device = device
        self.back = BackendProtocol(device, FakeHost(), name="test")
        self.front = FrontendProtocol(name="test")

    def run(self, step: FE.Step[T]) -> T:
        try:
            msg = next(step)
            while True:
                sent = dataclasses.replace(msg, fds=[os.dup(fd) for fd in msg.fds])
                replies = self.back.handle(sent)
                assert len(replies) == (1 if FE.expects_reply(msg) else 0), msg.name
                reply = replies[0] if replies else None
                msg = step.send(reply)
        except StopIteration as done:
            result: T = done.value
            return result


@pytest.fixture
def link() -> Iterator[Link]:
    link = Link(RngDevice(config_size=4))
    try:
        yield link
    finally:
        link.back.close()


def test_handshake_negotiates_what_both_sides_know(link: Link) -> None:
    link.run(link.front.handshake(FE.FRONTEND_PROTOCOL_FEATURES, None))
    assert link.front.trace[:4] == ["SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES",
                                    "SET_PROTOCOL_FEATURES"]
    assert link.front.protocol_features == (link.back.offered_protocol_features
                                            & FE.FRONTEND_PROTOCOL_FEATURES)
    assert link.back.protocol_features == link.front.protocol_features
    assert link.front.get_features() == link.device.get_features()
    assert link.front.num_queues == link.device.num_queues
    assert link.front.wants_backend_channel


def test_features_status_and_config_reach_the_device(link: Link) -> None:
    link.run(link.front.handshake(FE.FRONTEND_PROTOCOL_FEATURES, None))
    features = F.bit(F.VERSION_1)
    link.run(link.front.set_features(features))
    assert link.device.driver_features == features
    link.run(link.front.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK))
    assert link.run(link.front.get_status()) & S.FEATURES_OK
    assert link.run(link.front.read_config(0, 4)) == link.device.read_config(0, 4)


def test_a_vring_is_described_in_order_and_stopped_by_reset(link: Link) -> None:
    link.run(link.front.handshake(FE.FRONTEND_PROTOCOL_FEATURES, None))
    link.run(link.front.set_features(F.bit(F.VERSION_1)))
    memory = GuestMemory([sealed_memory(MEM)])
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        ring = DriverQueue(memory, 8, 0x10000, 0x11000, 0x12000)
        del link.front.trace[:]
        link.run(link.front.setup_queue(0, ring, kick, call, memory))
        assert link.front.trace == ["ADD_MEM_REG", "SET_VRING_NUM", "SET_VRING_BASE",
                                    "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL",
                                    "SET_VRING_ENABLE"]
        assert link.device.ring(0) is not None
        del link.front.trace[:]
        link.run(link.front.set_status(0))
        assert link.front.trace == ["GET_VRING_BASE", "RESET_DEVICE", "SET_STATUS"]
        assert link.device.ring(0) is None and link.front.started == {}
    finally:
        os.close(kick)
        os.close(call)
        memory.close()


def test_config_access_without_the_config_feature_is_the_callers_mistake() -> None:
    link = Link(RngDevice())
    try:
        link.run(link.front.handshake(V.protocol_mask(PF.REPLY_ACK), None))
        with pytest.raises(LocalError, match="CONFIG"):
            link.run(link.front.read_config(0, 4))
    finally:
        link.back.close()
