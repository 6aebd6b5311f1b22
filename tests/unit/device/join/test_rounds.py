"""Multi-round feature negotiation through a join (docs/multi-round.md): two pyvirtio net
drivers, each in its own guest memory and its own thread (their negotiations run at the same
time, as two guests' do), converge to the features both want; a driver that does not follow
rounds answers once and the other side narrows to it. After negotiating, frames cross, so
the features negotiated are the ones in use."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers.net import mac
from pyvirtio.device.join import Join
from pyvirtio.device.join.rounds import device_bits
from pyvirtio.driver.net import NetDriver
from pyvirtio.spec import features as F
from pyvirtio.spec import net as N
from pyvirtio.testing.pair import DevicePair

MR = F.bit(F.MULTI_ROUND)
BASE = F.bit(F.VERSION_1) | F.bit(N.VIRTIO_NET_F_MAC)
#: the small universe: three device-specific bits with no dependencies between them
UNIVERSE = [N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM]
SUBSETS = [sum(F.bit(b) for b in combo) for n in range(len(UNIVERSE) + 1)
           for combo in itertools.combinations(UNIVERSE, n)]


def negotiate(wish_a: int, wish_b: int, *, round_wait: float = 10.0
              ) -> tuple[Join, list[DevicePair], list[NetDriver]]:
    join = Join("net", macs=[mac(1), mac(2)], multi_round=True, round_wait=round_wait)
    pairs = [DevicePair(side) for side in join.sides]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(pair.probe, NetDriver, wish)
                   for pair, wish in zip(pairs, (wish_a, wish_b), strict=True)]
        drivers = [f.result(timeout=60) for f in futures]
    assert all(isinstance(d, NetDriver) for d in drivers)
    return join, pairs, drivers  # type: ignore[return-value]


def exchange(drivers: list[NetDriver]) -> None:
    for i, drv in enumerate(drivers):
        f = mac(2 - i) + mac(1 + i) + b"\x88\xb5" + bytes([i]) * 1000
        drv.send(f)
        (got,) = drivers[1 - i].recv_all()
        assert got.data == f


@pytest.mark.parametrize("wish_a,wish_b", list(itertools.product(SUBSETS, SUBSETS)))
def test_two_drivers_that_follow_rounds_converge_to_the_common_set(wish_a: int,
                                                                   wish_b: int) -> None:
    join, pairs, drivers = negotiate(BASE | MR | wish_a, BASE | MR | wish_b)
    try:
        common = wish_a & wish_b
        for side, drv in zip(join.sides, drivers, strict=True):
            assert device_bits(side.driver_features) == device_bits(BASE) | common
            assert drv.device.features == side.driver_features
            assert not side.driver_features & MR
            assert 2 <= len(side.rounds.answers) <= 3
        assert join.broker.timeouts == 0
        exchange(drivers)
    finally:
        for pair in pairs:
            pair.close()


@pytest.mark.parametrize("wish_plain", SUBSETS)
def test_a_driver_that_answers_once_leads_the_other_side_to_its_set(wish_plain: int) -> None:
    everything = sum(F.bit(b) for b in UNIVERSE)
    join, pairs, drivers = negotiate(BASE | MR | everything, BASE | wish_plain)
    try:
        following, plain = join.sides
        assert len(plain.rounds.answers) == 1  # one plain round, as a Linux guest runs
        assert device_bits(plain.driver_features) == device_bits(BASE) | wish_plain
        assert device_bits(following.driver_features) == device_bits(BASE) | wish_plain
        exchange(drivers)
    finally:
        for pair in pairs:
            pair.close()


def test_a_side_whose_peer_never_comes_stops_waiting_and_keeps_its_answer() -> None:
    join = Join("net", macs=[mac(1), mac(2)], multi_round=True, round_wait=0.2)
    pair = DevicePair(join.sides[0])
    try:
        wish = BASE | MR | F.bit(N.VIRTIO_NET_F_CSUM)
        pair.probe(NetDriver, wish)
        assert device_bits(join.sides[0].driver_features) == device_bits(wish)
        assert join.broker.timeouts == 1
    finally:
        pair.close()
