"""Per-device extensions of the vhost-user back-end: extra protocol features and requests.

The generic back-end (:class:`~pyvirtio.transport.vhost_user.backend.BackendProtocol`)
implements the messages every device needs. Some devices need more: a block device that
survives back-end crashes wants ``INFLIGHT_SHMFD`` (GET/SET_INFLIGHT_FD), a network device
``NET_MTU`` or ``RARP``. Such a device gets a :class:`BackendExtension` that declares the
protocol feature bits it adds and the requests it handles (with the rule each must follow);
the back-end offers those bits, validates those requests like its own and calls the
extension's handlers and hooks.

Extensions are given to the back-end explicitly (``extensions=`` of the protocol, or an
``extensions(device)`` factory of the server).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvirtio.ring import DeviceRing
from pyvirtio.transport.vhost_user.codec import Message, RequestRule

if TYPE_CHECKING:
    from pyvirtio.transport.vhost_user.backend import BackendProtocol

#: a request handler: returns the reply message (built with ``codec.reply``) or None; raises
#: ``codec.MessageError`` to refuse the request
Handler = Callable[[Message], "Message | None"]


class BackendExtension:
    """Base class: override what you need. One instance serves one connection."""

    #: protocol feature bits (a mask) this extension adds to the back-end's offer
    protocol_features: int = 0

    def attach(self, protocol: BackendProtocol) -> None:
        """Called once when the connection's protocol is built."""
        self.protocol = protocol

    def requests(self) -> dict[int, tuple[RequestRule, Handler]]:
        """Requests this extension handles: request number -> (rule, handler). A rule with
        ``feature`` set is only legal once that protocol feature was negotiated. The fds of a
        reply are given away: the I/O layer closes them once sent (reply with a dup of an
        fd you keep)."""
        return {}

    def on_ring_started(self, index: int, ring: DeviceRing) -> None:
        """Vring ``index`` began running on ``ring``."""

    def on_ring_stopped(self, index: int, last_avail_idx: int) -> None:
        """Vring ``index`` stopped (GET_VRING_BASE, reset, disconnect)."""

    def on_reset(self) -> None:
        """The device was reset (RESET_DEVICE, SET_STATUS 0)."""

    def close(self) -> None:
        """The connection is gone: release what the extension holds (fds, mappings)."""

