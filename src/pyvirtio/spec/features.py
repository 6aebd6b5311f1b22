"""Device-independent feature bits (VIRTIO 1.x §6) and legacy transport bits.

Values are bit *numbers*; use ``1 << BIT`` for masks. Bits 0-23, 41, 42 and 50-127 are
device-specific (VIRTIO 1.4 §2.2; 41 and 42 were reserved before 1.4), 24-40 and 43 extend the
queue and feature negotiation mechanisms, 44-49 are reserved for future extensions.
"""

from __future__ import annotations

from collections.abc import Mapping

NOTIFY_ON_EMPTY = 24  # legacy only
ANY_LAYOUT = 27  # legacy only; implied by VERSION_1
INDIRECT_DESC = 28
EVENT_IDX = 29
VHOST_USER_PROTOCOL_FEATURES = 30  # vhost-user only: never offered to the driver
VERSION_1 = 32
ACCESS_PLATFORM = 33
RING_PACKED = 34
IN_ORDER = 35
ORDER_PLATFORM = 36
SR_IOV = 37
NOTIFICATION_DATA = 38
NOTIF_CONFIG_DATA = 39
RING_RESET = 40

#: EXPERIMENTAL, pyvirtio's own, not a VIRTIO bit: multi-round feature negotiation
#: (docs/multi-round.md). Bit 49 is in 44-49, which VIRTIO 1.4 reserves for future extensions
#: and no specification or Linux header allocates; the top of that range, farthest from where
#: the specification allocates next (41, 42 and 43 were taken in turn). Never offered unless a
#: device opts in; never acknowledged unless a driver asks for it.
VIRTIO_F_PYVIRTIO_MULTI_ROUND = 49
MULTI_ROUND = VIRTIO_F_PYVIRTIO_MULTI_ROUND

TRANSPORT_FEATURES_START = 28
TRANSPORT_FEATURES_END = 41  # exclusive

NAMES = {
    NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    ANY_LAYOUT: "ANY_LAYOUT",
    INDIRECT_DESC: "INDIRECT_DESC",
    EVENT_IDX: "EVENT_IDX",
    VHOST_USER_PROTOCOL_FEATURES: "PROTOCOL_FEATURES",
    VERSION_1: "VERSION_1",
    ACCESS_PLATFORM: "ACCESS_PLATFORM",
    RING_PACKED: "RING_PACKED",
    IN_ORDER: "IN_ORDER",
    ORDER_PLATFORM: "ORDER_PLATFORM",
    SR_IOV: "SR_IOV",
    NOTIFICATION_DATA: "NOTIFICATION_DATA",
    NOTIF_CONFIG_DATA: "NOTIF_CONFIG_DATA",
    RING_RESET: "RING_RESET",
    MULTI_ROUND: "MULTI_ROUND(experimental)",
}


def names_in(namespace: Mapping[str, object], prefix: str, strip: str | None = None
             ) -> dict[int, str]:
    """``{bit: name}`` for each ``<prefix>NAME = bit`` constant of a spec module (for logs),
    each name without ``strip`` (default: the prefix); e.g.
    ``names_in(vars(spec.blk), "VIRTIO_BLK_F_")``."""
    cut = len(prefix if strip is None else strip)
    return {v: k[cut:] for k, v in namespace.items() if k.startswith(prefix) and type(v) is int}


def bit(n: int) -> int:
    """The mask of feature bit ``n``."""
    return 1 << n


def mask(*bits: int) -> int:
    """The mask of feature bits ``bits``."""
    return sum(1 << n for n in set(bits))


def has(features: int, n: int) -> bool:
    """Whether feature bit ``n`` is set in ``features``."""
    return bool(features >> n & 1)


def bits(features: int) -> list[int]:
    """The bit numbers set in ``features``, ascending."""
    return [n for n in range(features.bit_length()) if features >> n & 1]
