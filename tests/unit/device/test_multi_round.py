"""The device framework's side of multi-round negotiation (experimental,
docs/multi-round.md) against a driver that breaks its rules: the device records the culprit,
keeps its state consistent and never runs a queue on features that are not final."""

from __future__ import annotations

import pytest

from pyvirtio.core import features as CF
from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.rng import RngDevice
from pyvirtio.errors import PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S

ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VERSION_1)
MR = F.bit(F.MULTI_ROUND)


def device(multi_round: bool = True) -> VirtioDevice:
    return RngDevice(device_features=0b11, transport_features=V1, multi_round=multi_round)


def answer(d: VirtioDevice, features: int) -> None:
    """One round as the driver runs it, up to FEATURES_OK."""
    d.set_status(d.status | ACK | DRV)
    d.set_driver_features(features)
    d.set_status(d.status | FOK)


def test_the_bit_is_offered_only_by_a_device_that_opts_in() -> None:
    assert device().get_features() == V1 | MR | 0b11
    assert device(multi_round=False).get_features() == V1 | 0b11
    legacy_only = RngDevice(device_features=0b11, transport_features=0, multi_round=True)
    assert legacy_only.get_features() == 0b11  # no VERSION_1, no FEATURES_OK, no rounds


def test_the_next_offer_appears_when_the_driver_opens_the_round() -> None:
    d = device()
    answer(d, V1 | MR | 0b01)
    assert d.status == ACK | DRV | FOK and d.negotiating
    assert d.get_features() == V1 | MR | 0b11  # still this round's offer
    d.set_status(ACK | DRV)
    assert d.get_features() == V1 | 0b11  # the default next offer: the first, final
    assert not d.problems


def test_driver_ok_after_a_round_that_was_not_final_is_refused() -> None:
    d = device()
    answer(d, V1 | MR | 0b01)
    d.set_status(ACK | DRV | FOK | DOK)
    assert not d.status & DOK
    assert any("DRIVER_OK set before multi-round" in p for p in d.problems)


def test_the_driver_cannot_reopen_after_the_final_round() -> None:
    d = device()
    answer(d, V1 | 0b01)  # final: MULTI_ROUND not acked
    d.set_status(ACK | DRV)
    assert d.status & FOK
    assert any("cleared FEATURES_OK without a reset" in p for p in d.problems)


def test_acking_the_bit_from_an_offer_without_it_is_refused() -> None:
    d = device()
    answer(d, V1 | MR | 0b01)
    d.set_status(ACK | DRV)  # round 2 offers V1|0b11, no MULTI_ROUND
    d.set_driver_features(V1 | MR | 0b01)
    d.set_status(ACK | DRV | FOK)
    assert not d.status & FOK
    assert any("not offered" in p and "MULTI_ROUND" in p for p in d.problems)


def test_no_queue_runs_while_negotiating() -> None:
    d = device()
    d.memory = GuestMemory.anonymous(1 << 20)
    try:
        answer(d, V1 | MR | 0b01)
        with pytest.raises(PeerError, match="queue 0 set up in round 2 of multi-round"):
            d.start_queue(0, 8, 0x1000, 0x2000, 0x3000)
        assert d.queues[0].ring is None
    finally:
        d.memory.close()


def test_features_accepted_in_one_step_cannot_hold_the_bit() -> None:
    # The vhost-user path without a status register: no rounds possible.
    d = device()
    problem = d.accept_features(V1 | MR | 0b01)
    assert problem is not None and "multi-round negotiation needs the status register" in problem
    assert not d.status & FOK


def test_a_device_that_asks_for_rounds_forever_is_cut_off_at_its_limit() -> None:
    class Endless(RngDevice):
        def next_offer(self, rounds: CF.Rounds) -> int:
            return rounds.answers[-1][0]

    d = Endless(device_features=0b11, transport_features=V1, multi_round=True)
    for _ in range(CF.MAX_ROUNDS - 1):
        assert d.get_features() & MR
        answer(d, V1 | MR | 0b11)
        d.set_status(ACK | DRV)
    assert d.get_features() == V1 | 0b11  # round MAX_ROUNDS: final, whatever the hook says
    assert not d.problems


def test_a_device_that_did_not_opt_in_treats_the_bit_as_any_bit_it_did_not_offer() -> None:
    d = device(multi_round=False)
    answer(d, V1 | MR | 0b01)
    assert not d.status & FOK and not d.negotiating
    assert any("not offered" in p and "MULTI_ROUND" in p for p in d.problems)
    assert not any("multi-round" in p for p in d.problems)
