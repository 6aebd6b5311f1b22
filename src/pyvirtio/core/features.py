"""Feature negotiation (VIRTIO 1.x §2.2, §3.1.1), in one place for both sides."""

from __future__ import annotations

from collections.abc import Iterable

from pyvirtio.errors import PeerError
from pyvirtio.spec import features as F


class FeatureError(PeerError):
    """The driver acknowledged features the device did not offer, or an invalid combination."""


def negotiate(device_features: int, driver_supported: int) -> int:
    """The features a driver should acknowledge: what both sides support.

    The vhost-user-only PROTOCOL_FEATURES bit is never passed to a virtio driver, and
    RING_PACKED only with VERSION_1 (a legacy device has no packed ring).
    """
    common = device_features & driver_supported & ~F.bit(F.VHOST_USER_PROTOCOL_FEATURES)
    if not F.has(common, F.VERSION_1):
        common &= ~F.bit(F.RING_PACKED)
    return common


def check_acked(offered: int, acked: int) -> None:
    """Raise :class:`FeatureError` unless ``acked`` is acceptable for a device that offered
    ``offered``: a subset, and self-consistent (§6: dependencies between transport bits)."""
    extra = acked & ~offered
    if extra:
        raise FeatureError(
            f"driver acknowledged feature bits that were not offered: {describe(extra)}"
        )
    problem = unmet_dependency(acked, ((F.RING_PACKED, F.VERSION_1),))
    if problem is not None:
        raise FeatureError(problem)


def unmet_dependency(features: int, depends: Iterable[tuple[int, int]],
                     device_names: dict[int, str] | None = None) -> str | None:
    """Why ``features`` break one of the ``(feature, the feature it needs)`` rules, or None."""
    for feat, needs in depends:
        if F.has(features, feat) and not F.has(features, needs):
            return (f"{describe(F.bit(feat), device_names)} requires "
                    f"{describe(F.bit(needs), device_names)}, which was not acknowledged")
    return None


#: the ring and transport features pyvirtio's rings implement (both formats: the packed ring
#: is chosen by pyvirtio.ring.factory when RING_PACKED is negotiated)
IMPLEMENTED_TRANSPORT_FEATURES = (F.bit(F.VERSION_1) | F.bit(F.INDIRECT_DESC) | F.bit(F.EVENT_IDX)
                                  | F.bit(F.RING_PACKED) | F.bit(F.IN_ORDER))


def unimplemented(features: int) -> int:
    """The transport-range bits (28..40) of ``features`` that pyvirtio does not implement
    (RING_PACKED, IN_ORDER, ...): never to be offered nor acknowledged. The vhost-user
    PROTOCOL_FEATURES bit is not a virtio feature and is left to the vhost-user layer."""
    transport = ((1 << F.TRANSPORT_FEATURES_END) - 1) & ~((1 << F.TRANSPORT_FEATURES_START) - 1)
    return features & transport & ~IMPLEMENTED_TRANSPORT_FEATURES & ~F.bit(
        F.VHOST_USER_PROTOCOL_FEATURES)


def ring_format(features: int) -> str:
    """``"packed ring"`` or ``"split ring"``: the virtqueue layout ``features`` select."""
    return "packed ring" if F.has(features, F.RING_PACKED) else "split ring"


def is_modern(features: int) -> bool:
    """VERSION_1 negotiated: little-endian, FEATURES_OK step required."""
    return F.has(features, F.VERSION_1)


def describe(features: int, device_names: dict[int, str] | None = None) -> str:
    """``'INDIRECT_DESC|EVENT_IDX|VERSION_1|bit 5'`` style rendering for logs and errors."""
    names = []
    for n in F.bits(features):
        name = F.NAMES.get(n) or (device_names or {}).get(n) or f"bit {n}"
        names.append(name)
    return "|".join(names) or "none"
