"""A joined console whose sending side is a hostile ring (pyvirtio.testing.hostile: valid
rings, targeted defects, garbage and mutations, each judged by the independent reference
reader), and whose receiving side is a pyvirtio console driver: the receiver gets exactly
the readable bytes of the chains the judge says a correct device pops, in order, and nothing
else; a ring the judge calls broken breaks the sending side only."""

from __future__ import annotations

import pytest

from pyvirtio.device.join import Join
from pyvirtio.driver.console import ConsoleDriver
from pyvirtio.memory import GuestMemory
from pyvirtio.ring.split import MAX_INDIRECT_DESCRIPTORS
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.testing.hostile import HostileCase, HostileRingGenerator
from pyvirtio.testing.pair import DevicePair

CASES = 800
TRANSMITQ = 1


def usable(case: HostileCase) -> bool:
    # The join completes each chain as soon as its bytes are copied (complete_each), and
    # its rings use the default limit on indirect tables.
    return case.complete_each and case.max_indirect == MAX_INDIRECT_DESCRIPTORS


def run_case(case: HostileCase, memory: GuestMemory) -> None:
    expected = b"".join(memory.read(gpa, n) for chain in case.verdict.chains
                        for gpa, n in chain.readable)
    join = Join("console")
    sender = join.sides[0]
    with DevicePair(join.sides[1]) as receiver_pair:
        receiver = receiver_pair.probe(ConsoleDriver)
        assert isinstance(receiver, ConsoleDriver)
        sender.memory = memory
        sender.set_status(S.ACKNOWLEDGE | S.DRIVER)
        sender.set_driver_features(F.bit(F.VERSION_1)
                                   | (F.bit(F.EVENT_IDX) if case.event_idx else 0)
                                   | (F.bit(F.INDIRECT_DESC) if case.indirect else 0))
        sender.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        sender.start_queue(TRANSMITQ, case.size, case.desc_addr, case.avail_addr,
                           case.used_addr, last_avail_idx=case.last_avail_idx)
        sender.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)  # drains
        got = receiver.read_available(0)
        what = f"{case.defect.name}: {case.description}"
        assert got == expected, what
        if case.verdict.broken:
            assert sender.status & S.DEVICE_NEEDS_RESET, what
            problem = case.verdict.mismatch(sender.problems[-1])
            assert problem is None, f"{what}: {problem}"
        else:
            assert not sender.problems, what
        receiver_side = join.sides[1]
        assert not receiver_side.problems and not receiver_side.status & S.DEVICE_NEEDS_RESET
        sender.reset()


@pytest.mark.parametrize("seed", range(4))
def test_the_receiver_gets_exactly_the_bytes_of_the_chains_a_correct_device_pops(
        seed: int) -> None:
    memory = GuestMemory.anonymous(16 << 10, gpa=0x10000)
    try:
        gen = HostileRingGenerator(memory, seed=seed)
        ran = 0
        for case in gen.cases(CASES):
            if usable(case):
                run_case(case, memory)
                ran += 1
        assert ran >= 50  # the cases the join can be judged on (a sixth or so)
    finally:
        memory.close()
