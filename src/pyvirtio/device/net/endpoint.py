"""Endpoints that carry Ethernet frames with their virtio-net header, and how they talk.

A :class:`NetEndpoint` is anything frames flow in and out of: a virtio-net device, a tap, a
switch port. :func:`link` joins two; each hands frames to its peer with
:meth:`NetEndpoint.receive`, which answers a :class:`Delivery`: DELIVERED (copied out: the
caller may reuse its buffers), BUSY (no room; the receiver calls the sender's
:meth:`~NetEndpoint.peer_ready` when it has room again) or DROPPED (refused for good and
counted by the receiver). A frame is a list of segments (views into a guest's transmit
buffers, or bytes) with a :class:`~pyvirtio.spec.net.NetHdr`. Every receiver takes every
*valid* offload and completes in software what its own consumer cannot;
:meth:`NetEndpoint.rx_offloads` tells senders that can choose (a tap's kernel) what is cheapest.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from typing import Protocol

from pyvirtio.errors import LocalError
from pyvirtio.ring.chain import gather
from pyvirtio.spec import features as F
from pyvirtio.spec import net as N
from pyvirtio.spec.net import NetHdr

Buffer = bytes | bytearray | memoryview
#: a frame as a list of segments (zero-copy views into a guest's transmit buffers, or bytes)
Frame = Sequence[Buffer]

ETH_HLEN = 14
ETH_ALEN = 6
BROADCAST = b"\xff" * 6


class Delivery(enum.IntEnum):
    """What :meth:`NetEndpoint.receive` did with a frame."""

    DELIVERED = 0
    BUSY = 1  # no room now; the receiver calls the sender's peer_ready() later
    DROPPED = 2  # refused for good and counted by the receiver


class Offload(enum.IntFlag):
    """Offloads a frame may carry (values equal Linux ``TUN_F_*``)."""

    NONE = 0
    CSUM = 1  # partial checksum (NEEDS_CSUM)
    TSO4 = 2
    TSO6 = 4

    @classmethod
    def from_guest_features(cls, features: int) -> Offload:
        """The offloads a driver accepts in received frames, from its GUEST_* bits (TSO only
        together with the checksum offload)."""
        if not F.has(features, N.VIRTIO_NET_F_GUEST_CSUM):
            return cls.NONE
        return (cls.CSUM | (cls.TSO4 if F.has(features, N.VIRTIO_NET_F_GUEST_TSO4) else cls.NONE)
                | (cls.TSO6 if F.has(features, N.VIRTIO_NET_F_GUEST_TSO6) else cls.NONE))


ALL_OFFLOADS = Offload.CSUM | Offload.TSO4 | Offload.TSO6


class FrameSink(Protocol):
    """Where captured frames go (:class:`pyvirtio.device.net.pcap.PcapWriter`)."""

    def write_frame(self, frame: Frame, length: int) -> None: ...


class NetEndpoint:
    """One end of a link that carries Ethernet frames with their virtio-net header.

    Subclasses implement :meth:`receive`; the other methods default to no-ops. ``peer`` is
    the endpoint this one sends to (set by :func:`link`).
    """

    peer: NetEndpoint | None = None
    name: str = "endpoint"

    def connect(self, peer: NetEndpoint | None) -> None:
        """Send frames to ``peer`` from now on (None: disconnect)."""
        self.peer = peer

    def receive(self, hdr: NetHdr, frame: Frame, length: int, *,
                flush: bool = True) -> Delivery:
        """Take one frame of ``length`` bytes from the peer.

        ``frame`` may be views into the sender's guest memory: copy what you keep before
        returning. With ``flush=False`` the receiver may batch its completion work until
        :meth:`flush_rx`.
        """
        raise NotImplementedError

    def flush_rx(self) -> None:
        """Publish frames received with ``flush=False`` (end of the sender's batch)."""

    def peer_ready(self) -> None:
        """The peer, which answered BUSY before, can take frames again."""

    def rx_offloads(self) -> Offload:
        """Offloads frames given to :meth:`receive` may carry without the receiver having to
        convert them (a hint for senders that can choose, like the kernel behind a tap)."""
        return Offload.NONE

    def peer_offloads_changed(self) -> None:
        """The peer's :meth:`rx_offloads` changed."""


#: a frame's bytes in one object, up to a limit (frames are segment lists like chains)
frame_bytes = gather


def link(a: NetEndpoint, b: NetEndpoint) -> None:
    """Join two endpoints: each sends to the other."""
    a.connect(b)
    b.connect(a)


def parse_mac(mac: bytes | str) -> bytes:
    """``b'\\x52\\x54...'`` or ``'52:54:00:12:34:56'`` -> 6 bytes."""
    if isinstance(mac, str):
        parts = mac.replace("-", ":").split(":")
        if len(parts) != 6:
            raise LocalError(f"MAC address {mac!r} does not have six octets")
        try:
            return bytes(int(p, 16) for p in parts)
        except ValueError as exc:
            raise LocalError(f"MAC address {mac!r} is not hexadecimal") from exc
    if len(mac) != ETH_ALEN:
        raise LocalError(f"MAC address must be 6 bytes, not {len(mac)}")
    return bytes(mac)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A random locally administered unicast address."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return bytes(b)
