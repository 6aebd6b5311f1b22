"""vhost-user, sans-I/O: the message codec, the back-end protocol state machine that applies
front-end requests to a VirtioDevice, per-device protocol extensions, and the front-end's
protocol checks. Sockets, fds and the event loop are in :mod:`pyvirtio.io.vhost_user_server`
and :mod:`pyvirtio.io.vhost_user_client`.

Reference: QEMU ``docs/interop/vhost-user.rst``; constants in :mod:`pyvirtio.spec.vhost_user`.
"""

from pyvirtio.transport.vhost_user.backend import (
    DEFAULT_PROTOCOL_FEATURES,
    BackendHost,
    BackendProtocol,
    ConnectionFatal,
)
from pyvirtio.transport.vhost_user.codec import (
    Decoder,
    FramingError,
    Message,
    MessageError,
    ReplyKind,
    RequestRule,
)
from pyvirtio.transport.vhost_user.extension import BackendExtension

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "BackendExtension",
    "BackendHost",
    "BackendProtocol",
    "ConnectionFatal",
    "Decoder",
    "FramingError",
    "Message",
    "MessageError",
    "ReplyKind",
    "RequestRule",
]
