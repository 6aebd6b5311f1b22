"""The shared rules of multi-round feature negotiation (experimental, docs/multi-round.md):
the round record both sides keep, and the one status move it adds."""

from __future__ import annotations

import pytest

from pyvirtio.core import features as CF
from pyvirtio.core.status import judge
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S

ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VERSION_1)
MR = F.bit(F.MULTI_ROUND)


def test_the_bit_is_outside_every_allocated_range() -> None:
    # VIRTIO 1.4: 44-49 reserved for future extensions; not device-specific, not a
    # transport bit pyvirtio (or Linux, 28..41) treats as one.
    assert 44 <= F.MULTI_ROUND <= 49
    assert not F.TRANSPORT_FEATURES_START <= F.MULTI_ROUND < F.TRANSPORT_FEATURES_END
    assert CF.unimplemented(MR) == 0
    assert "MULTI_ROUND" in CF.describe(MR)


def test_multi_round_needs_version_1() -> None:
    assert CF.negotiate(MR | 1, MR | 1) == 1
    assert CF.negotiate(V1 | MR | 1, V1 | MR | 1) == V1 | MR | 1
    with pytest.raises(CF.FeatureError, match=r"MULTI_ROUND\(experimental\) requires VERSION_1"):
        CF.check_acked(MR | V1, MR)


def test_an_answer_is_final_unless_it_acks_the_bit() -> None:
    assert CF.is_final(V1 | 1) and not CF.is_final(V1 | MR)
    rounds = CF.Rounds()
    assert rounds.current == 1 and rounds.final is None
    assert not rounds.accepted(V1 | MR | 3, V1 | MR | 1)
    assert rounds.current == 2 and rounds.final is None
    assert rounds.accepted(V1 | 1, V1 | 1)
    assert rounds.final == V1 | 1


def test_offers_lose_the_bit_at_the_limit_and_an_offer_keeping_it_is_refused() -> None:
    rounds = CF.Rounds(limit=3)
    for _ in range(2):
        assert rounds.bounded(V1 | MR) == V1 | MR
        rounds.check_offer(V1 | MR, "test device")
        rounds.accepted(V1 | MR, V1 | MR)
    assert not rounds.may_continue()
    assert rounds.bounded(V1 | MR | 5) == V1 | 5
    rounds.check_offer(V1 | 5, "test device")  # a final offer is always fine
    with pytest.raises(CF.RoundsExceeded,
                       match=r"^test device: still offered MULTI_ROUND in round 3 .*at most 3"):
        rounds.check_offer(V1 | MR, "test device")
    assert CF.Rounds().bounded(MR | 1) == 1  # never without VERSION_1


def test_the_driver_may_clear_features_ok_alone_to_open_a_round() -> None:
    t = judge(ACK | DRV | FOK, ACK | DRV, modern=True, features_acceptable=None,
              round_open=True)
    assert t.reopened and t.accepted == ACK | DRV and not t.problems


@pytest.mark.parametrize("old, new, round_open", [
    (ACK | DRV | FOK, ACK | DRV, False),  # the accepted answer was final
    (ACK | DRV | FOK, ACK, True),  # DRIVER cleared too
    (ACK | DRV | FOK | DOK, ACK | DRV | DOK, True),  # after DRIVER_OK
    (ACK | DRV | FOK, ACK | DRV | S.FAILED, True),  # something set at the same time
])
def test_any_other_clearing_is_still_refused(old: int, new: int, round_open: bool) -> None:
    t = judge(old, new, modern=True, features_acceptable=None, round_open=round_open)
    assert not t.reopened and t.accepted & FOK
    assert any("without a reset" in p for p in t.problems)


def test_driver_ok_waits_for_the_final_round() -> None:
    t = judge(ACK | DRV | FOK, ACK | DRV | FOK | DOK, modern=True, features_acceptable=None,
              round_open=True)
    assert not t.driver_ok and t.accepted == ACK | DRV | FOK
    assert any("multi-round" in p for p in t.problems)
