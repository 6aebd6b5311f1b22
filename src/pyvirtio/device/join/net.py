"""Joining two guests' virtio-net queues point to point: each side's transmitq into the other
side's receiveq, with the translation the two drivers' features need and nothing else.

A frame is the one thing a virtio-net chain holds beyond bytes: a virtio-net header in front
(10 or 12 bytes, depending on MRG_RXBUF and VERSION_1) that says which offloads the frame
uses. Two drivers that negotiated different features cannot take each other's chains byte
for byte, so this side reads the sender's header (and checks it against the sender's own
features), then places the frame in the receiver's buffers with the receiver's header:
``num_buffers`` when the receiver took MRG_RXBUF (a frame may span several of its buffers),
the partial checksum completed when it did not take GUEST_CSUM, a TSO frame cut into
segments when it did not take GUEST_TSO4/6 (:mod:`pyvirtio.device.net.offload`). The frame's
bytes are copied once, from the sender's buffers into the receiver's, and each receive used
length is the bytes written there. That machinery is the net device's receive path
(:class:`~pyvirtio.device.net.NetDevice`), reused as is: a join side is a NetDevice without a
control queue, linked straight to the other side (no switch, no MAC learning, no filter: a
driver without CTRL_RX receives everything).

Backpressure: while the receiver's driver is up but has no buffers, the sender's chain waits
(the transmit queue stops, nothing is lost: the receiver's kick resumes it); while no
driver is up on the receiving side (not yet connected, gone, or needing a reset) frames for
it are dropped and counted (``stats.tx_dropped`` of the sender), as on a cable with nobody at
the other end, so the sender never stalls behind a guest that is not there.
"""

from __future__ import annotations

from pyvirtio.device.join.core import Joined
from pyvirtio.device.net import NetDevice
from pyvirtio.device.net.endpoint import Delivery, Frame, link
from pyvirtio.spec.net import NetHdr


class JoinNetSide(Joined, NetDevice):
    """One guest's end of a net join (see the module doc)."""

    def __init__(self, mac: bytes | str | None = None, *, side: int = 0,
                 **kwargs: object) -> None:
        self.side = side
        kwargs.setdefault("ctrl", False)
        super().__init__(mac, **kwargs)  # type: ignore[arg-type]

    def receive(self, hdr: NetHdr, frame: Frame, length: int, *,
                flush: bool = True) -> Delivery:
        if not self.live:
            self.stats.rx_dropped += 1
            self.last_error = f"{self.name}: no driver is up: frame dropped"
            return Delivery.DROPPED
        return super().receive(hdr, frame, length, flush=flush)


def join_net(a: JoinNetSide, b: JoinNetSide) -> None:
    """Join two net sides point to point."""
    link(a, b)
    a.peer_offloads_changed()
    b.peer_offloads_changed()
