"""Feature negotiation (VIRTIO 1.x §2.2, §3.1.1), in one place for both sides, including
pyvirtio's experimental multi-round negotiation (:class:`Rounds`, docs/multi-round.md)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pyvirtio.errors import PeerError
from pyvirtio.spec import features as F


class FeatureError(PeerError):
    """The driver acknowledged features the device did not offer, or an invalid combination."""


def negotiate(device_features: int, driver_supported: int) -> int:
    """The features a driver should acknowledge: what both sides support.

    The vhost-user-only PROTOCOL_FEATURES bit is never passed to a virtio driver, and
    RING_PACKED and MULTI_ROUND only with VERSION_1 (a legacy device has no packed ring and
    no FEATURES_OK step to end a round with).
    """
    common = device_features & driver_supported & ~F.bit(F.VHOST_USER_PROTOCOL_FEATURES)
    if not F.has(common, F.VERSION_1):
        common &= ~(F.bit(F.RING_PACKED) | F.bit(F.MULTI_ROUND))
    return common


def check_acked(offered: int, acked: int) -> None:
    """Raise :class:`FeatureError` unless ``acked`` is acceptable for a device that offered
    ``offered``: a subset, and self-consistent (§6: dependencies between transport bits)."""
    extra = acked & ~offered
    if extra:
        raise FeatureError(
            f"driver acknowledged feature bits that were not offered: {describe(extra)}"
        )
    problem = unmet_dependency(acked, ((F.RING_PACKED, F.VERSION_1),
                                      (F.MULTI_ROUND, F.VERSION_1)))
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


# ---- multi-round negotiation (experimental; docs/multi-round.md) ----------------------------

#: the most rounds either side takes part in: the offer of round MAX_ROUNDS (and later) must
#: not carry MULTI_ROUND, so negotiation always ends
MAX_ROUNDS = 16


class RoundsExceeded(FeatureError):
    """The device kept offering MULTI_ROUND past the round limit: it never converges."""


def is_final(acked: int) -> bool:
    """Whether a round answered with ``acked`` ends the negotiation: MULTI_ROUND not acked
    (a driver that does not know the bit never acks it, so its only round is final)."""
    return not F.has(acked, F.MULTI_ROUND)


@dataclass
class Rounds:
    """The record of one multi-round negotiation, kept the same way by the device and by the
    driver: every round's offer and the answer accepted for it, oldest first. Sans-I/O: the
    sides call :meth:`check_offer` / :meth:`accepted` and move the status byte themselves."""

    limit: int = MAX_ROUNDS
    #: (offer, acked) of every round whose FEATURES_OK the device accepted
    answers: list[tuple[int, int]] = field(default_factory=list)

    @property
    def current(self) -> int:
        """The number of the round being negotiated (1 for the first)."""
        return len(self.answers) + 1

    def may_continue(self) -> bool:
        """Whether the offer of the current round may carry MULTI_ROUND."""
        return self.current < self.limit

    def bounded(self, offer: int) -> int:
        """``offer`` as a device may present it in the current round: without MULTI_ROUND
        from round :attr:`limit` on, and without it unless VERSION_1 is offered."""
        if not self.may_continue() or not F.has(offer, F.VERSION_1):
            offer &= ~F.bit(F.MULTI_ROUND)
        return offer

    def check_offer(self, offer: int, device: str) -> None:
        """Raise :class:`RoundsExceeded` (naming ``device``) if ``offer`` asks for yet
        another round when the limit allows none."""
        if F.has(offer, F.MULTI_ROUND) and not self.may_continue():
            raise RoundsExceeded(
                f"{device}: still offered MULTI_ROUND in round {self.current} of multi-round "
                f"feature negotiation (at most {self.limit} rounds): it never converges; "
                f"offers so far: {', '.join(hex(o) for o, _ in self.answers)}, {offer:#x}")

    def accepted(self, offer: int, acked: int) -> bool:
        """The device accepted FEATURES_OK for ``acked`` in answer to ``offer``: record the
        round and return whether it was the final one."""
        self.answers.append((offer, acked))
        return is_final(acked)

    @property
    def final(self) -> int | None:
        """The final features, or None while the negotiation is not over."""
        if self.answers and is_final(self.answers[-1][1]):
            return self.answers[-1][1]
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
