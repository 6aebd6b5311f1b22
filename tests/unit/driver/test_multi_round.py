"""Multi-round feature negotiation (experimental, docs/multi-round.md) between our driver
framework and our device framework, over DevicePair: in memory (loopback) and through the
virtio-pci and virtio-mmio register models. The device is a real entropy device; after the
negotiation the driver reads bytes from it, so the negotiated features are the ones in use."""

from __future__ import annotations

import itertools

import pytest

from pyvirtio.core import features as CF
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import DeviceRefusedFeatures
from pyvirtio.driver.rng import RngDriver
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair

ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VERSION_1)
MR = F.bit(F.MULTI_ROUND)
#: the small feature universe: four device-specific bits (virtio-rng defines none, so the
#: device may give them any meaning; here they are just names)
UNIVERSE = 0b1111
SUBSETS = list(range(UNIVERSE + 1))


class NarrowingRng(RngDevice):
    """An entropy device that negotiates as ``join`` will: its first offer is everything it
    can serve (``UNIVERSE``), which is what a driver that does not know MULTI_ROUND gets; a
    driver that knows the bit is then offered only the bits it took that the device prefers
    (``preferred``), until an answer takes nothing the device does not prefer: the next offer
    is that answer, without MULTI_ROUND, the final round.

    Records every status write the driver makes as (written, held afterwards), a reset as
    (0, 0)."""

    def __init__(self, preferred: int, *, multi_round: bool = True) -> None:
        super().__init__(device_features=UNIVERSE, transport_features=V1,
                         multi_round=multi_round)
        self.preferred = preferred
        self.status_log: list[tuple[int, int]] = []

    def next_offer(self, rounds: CF.Rounds) -> int:
        answer = rounds.answers[-1][1]
        narrowed = answer & (self.preferred | ~UNIVERSE)
        if narrowed == answer:
            return answer & ~MR
        return narrowed

    def set_status(self, value: int) -> None:
        super().set_status(value)
        if value:
            self.status_log.append((value, self.status))

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "status_log"):
            self.status_log.append((0, 0))


def since_last_reset(log: list[tuple[int, int]]) -> list[tuple[int, int]]:
    last = max(i for i, entry in enumerate(log) if entry == (0, 0))
    return log[last + 1:]


def plain_sequence(rounds: int) -> list[tuple[int, int]]:
    """The status writes (and what the device holds after each) of a negotiation in
    ``rounds`` rounds, all accepted: FEATURES_OK set and, before every round but the first,
    cleared by the driver to open it; DRIVER_OK after the last."""
    seq = [(ACK, ACK), (ACK | DRV, ACK | DRV)]
    for r in range(rounds):
        if r:
            seq.append((ACK | DRV, ACK | DRV))
        seq.append((ACK | DRV | FOK, ACK | DRV | FOK))
    seq.append((ACK | DRV | FOK | DOK, ACK | DRV | FOK | DOK))
    return seq


def negotiate(transport: str, preferred: int, wanted: int, *, driver_knows: bool = True,
              device_multi_round: bool = True) -> tuple[NarrowingRng, DevicePair, RngDriver]:
    device = NarrowingRng(preferred, multi_round=device_multi_round)
    pair = DevicePair(device, transport=transport)
    try:
        drv = pair.probe(RngDriver, features=wanted | (MR if driver_knows else 0))
    except BaseException:
        pair.close()
        raise
    assert isinstance(drv, RngDriver)
    return device, pair, drv


def check_converged(transport: str, preferred: int, wanted: int) -> None:
    device, pair, drv = negotiate(transport, preferred, wanted)
    try:
        common = preferred & wanted
        # Both sides hold the common set (plus VERSION_1), the driver's view read from the
        # device's own record.
        assert device.driver_features == V1 | common, (preferred, wanted)
        assert drv.device.features == V1 | common
        # Two rounds when the driver took nothing the device does not prefer, else three.
        rounds = 2 if wanted & ~preferred == 0 else 3
        assert len(device.rounds.answers) == len(drv.device.rounds.answers) == rounds
        assert drv.device.rounds.answers == device.rounds.answers
        assert device.rounds.answers[0] == (V1 | UNIVERSE | MR, V1 | wanted | MR)
        assert since_last_reset(device.status_log) == plain_sequence(rounds)
        assert not device.problems
        assert len(drv.read(16)) == 16  # the device serves with the final features
    finally:
        pair.close()


@pytest.mark.parametrize("preferred", SUBSETS)
def test_our_driver_and_device_converge_in_rounds_to_the_common_set(preferred: int) -> None:
    for wanted in SUBSETS:
        check_converged("loopback", preferred, wanted)


@pytest.mark.parametrize("transport", ["pci-modern", "pci-transitional", "mmio"])
def test_rounds_run_through_the_register_models(transport: str) -> None:
    for preferred, wanted in itertools.product(SUBSETS, SUBSETS):
        check_converged(transport, preferred, wanted)


@pytest.mark.parametrize("transport", ["loopback", "pci-modern", "mmio"])
def test_a_driver_that_does_not_know_the_bit_gets_one_plain_round(transport: str) -> None:
    device, pair, drv = negotiate(transport, preferred=0b0001, wanted=0b0110,
                                  driver_knows=False)
    try:
        # The first offer is final for it: everything the device can serve that it wants.
        assert device.driver_features == drv.device.features == V1 | 0b0110
        assert device.rounds.answers == [(V1 | UNIVERSE | MR, V1 | 0b0110)]
        assert since_last_reset(device.status_log) == plain_sequence(1)
        assert not device.problems
        assert len(drv.read(16)) == 16
    finally:
        pair.close()


def test_a_driver_that_knows_the_bit_negotiates_plainly_with_a_device_that_does_not() -> None:
    device, pair, drv = negotiate("loopback", preferred=0b0001, wanted=0b0110,
                                  device_multi_round=False)
    try:
        assert device.driver_features == V1 | 0b0110
        assert len(drv.device.rounds.answers) == 1
        assert since_last_reset(device.status_log) == plain_sequence(1)
    finally:
        pair.close()


@pytest.mark.parametrize("transport", ["pci-legacy", "mmio-legacy"])
def test_a_legacy_interface_never_carries_the_bit(transport: str) -> None:
    # No FEATURES_OK to end a round with (and legacy PCI has 32 feature bits): one plain
    # round, MULTI_ROUND never acknowledged.
    device, pair, drv = negotiate(transport, preferred=0b0001, wanted=0b0110)
    try:
        assert device.driver_features == 0b0110
        assert not device.rounds.answers  # no FEATURES_OK round at all
        assert len(drv.read(16)) == 16
    finally:
        pair.close()


class EndlessRng(NarrowingRng):
    """A hostile (or broken) device: every offer asks for yet another round, and its own
    limit is far beyond the driver's."""

    max_rounds = 1000

    def next_offer(self, rounds: CF.Rounds) -> int:
        return rounds.answers[-1][0]


@pytest.mark.parametrize("transport", ["loopback", "pci-modern", "mmio"])
def test_a_device_that_never_stops_offering_rounds_is_refused(transport: str) -> None:
    device = EndlessRng(0b0011)
    with DevicePair(device, transport=transport) as pair:
        with pytest.raises(CF.RoundsExceeded) as err:
            pair.probe(RngDriver, features=0b0011 | MR)
        message = str(err.value)
        assert message.startswith("rng device: still offered MULTI_ROUND in round 16")
        assert "never converges" in message
        assert len(device.rounds.answers) == CF.MAX_ROUNDS - 1
        assert device.status & S.FAILED and not device.status & DOK
        assert device.status_log[-1] == (ACK | DRV | S.FAILED, ACK | DRV | S.FAILED)


class StubbornRng(EndlessRng):
    """Asks for rounds forever, but with the framework's own limit."""

    max_rounds = CF.MAX_ROUNDS


def test_the_device_framework_ends_negotiation_at_its_round_limit() -> None:
    device = StubbornRng(0b0011)
    with DevicePair(device) as pair:
        drv = pair.probe(RngDriver, features=0b0011 | MR)
        assert len(device.rounds.answers) == CF.MAX_ROUNDS
        assert device.driver_features == V1 | 0b0011
        assert since_last_reset(device.status_log) == plain_sequence(CF.MAX_ROUNDS)
        assert isinstance(drv, RngDriver) and len(drv.read(8)) == 8


class PickyRng(NarrowingRng):
    """Refuses, in round 2, an answer holding bit 0."""

    def validate_features(self, features: int) -> str | None:
        if self.rounds.current == 2 and features & 1:
            return "bit 0 is not acceptable in round 2"
        return None

    def next_offer(self, rounds: CF.Rounds) -> int:
        return rounds.answers[-1][1]  # the same again, MULTI_ROUND kept for a third round


@pytest.mark.parametrize("transport", ["loopback", "pci-modern"])
def test_a_round_the_device_refuses_fails_the_driver(transport: str) -> None:
    device = PickyRng(0b0011)
    with DevicePair(device, transport=transport) as pair:
        with pytest.raises(DeviceRefusedFeatures, match="in round 2 of multi-round"):
            pair.probe(RngDriver, features=0b0011 | MR)
        assert device.status & S.FAILED
        assert any("bit 0 is not acceptable in round 2" in p for p in device.problems)


def test_a_reset_brings_back_the_first_offer_and_a_new_negotiation() -> None:
    device = NarrowingRng(0b0001)
    with DevicePair(device) as pair:
        pair.probe(RngDriver, features=0b0011 | MR)
        assert device.offered_features == V1 | 0b0001  # the final round's offer
        pair.remove()
        assert device.get_features() == V1 | UNIVERSE | MR
        assert not device.rounds.answers
        pair.probe(RngDriver, features=0b0110)  # a driver that does not know the bit now
        assert device.driver_features == V1 | 0b0110
