"""A device queue fed hostile rings: it breaks with a precise reason, never crashes, never
hangs, and never touches memory it was not given.

Guest memory is three regions cut out of one anonymous mmap, each surrounded by guard bytes
that belong to the mapping but to no region::

    mmap:  [guard][R1 4 KiB][guard][R2 4 KiB][guard][R3 4 KiB][guard]
    gpa:    0x10000 R1, 0x11000 R2 (adjacent: buffers may span), hole, 0x13000 R3

The guards are filled with a pattern and must stay untouched. After each ring the whole
mapping is compared with its copy from before the device ran: only the used ring and the
writable buffers of chains the device popped may differ. Every chain popped must match what
the independent reference judge (:func:`pyvirtio.testing.hostile.judge_ring`) read, down to
segment boundaries, bytes read and where the bytes written land.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

from pyvirtio.memory import GuestMemory, buffer_region
from pyvirtio.ring import DeviceQueue, QueueUsageError, RingError
from pyvirtio.ring.chain import DescriptorChain
from pyvirtio.ring.packed import PackedDeviceQueue
from pyvirtio.testing.hostile import (
    Defect,
    ExpectedChain,
    HostileCase,
    HostileRingGenerator,
    Reason,
    _Rng,
)
from pyvirtio.testing.hostile_packed import (
    HostilePackedRingGenerator,
    PackedDefect,
    PackedHostileCase,
    PackedReason,
)

GUARD = 512
REGION = 4096
GUARD_PATTERN = bytes([0xA5, 0x5A, 0xC3, 0x3C]) * (GUARD // 4)
#: (gpa, offset in the mapping)
LAYOUT = [(0x10000, GUARD), (0x11000, 2 * GUARD + REGION), (0x13000, 3 * GUARD + 2 * REGION)]
MAP_SIZE = 4 * GUARD + 3 * REGION
PATTERN = bytes(range(251)) * (MAP_SIZE // 251 + 2)  # what the device writes into buffers


class Arena:
    """The mapping, its guards, and a gpa -> mapping-offset translation of its own."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, MAP_SIZE)
        self.view = memoryview(self.map)
        self.guards = [(0, GUARD)] + [(off + REGION, GUARD) for _, off in LAYOUT]
        for off, n in self.guards:
            self.view[off : off + n] = GUARD_PATTERN[:n]
        rnd = random.Random(7)
        for _, off in LAYOUT:
            self.view[off : off + REGION] = rnd.randbytes(REGION)
        self.memory = GuestMemory(
            [buffer_region(self.view[off : off + REGION], gpa) for gpa, off in LAYOUT]
        )

    def offsets(self, addr: int, length: int) -> Iterator[tuple[int, int]]:
        """Mapping (offset, length) pieces of a guest range that the judge found mapped."""
        while length:
            for gpa, off in LAYOUT:
                if gpa <= addr < gpa + REGION:
                    n = min(length, gpa + REGION - addr)
                    yield off + addr - gpa, n
                    addr += n
                    length -= n
                    break
            else:
                raise AssertionError(f"0x{addr:x} is not in the arena")

    def read(self, ranges: tuple[tuple[int, int], ...]) -> bytes:
        return b"".join(bytes(self.view[o : o + n]) for a, ln in ranges
                        for o, n in self.offsets(a, ln))

    def guards_intact(self) -> bool:
        # (mmap slices are bytes: compared with memcmp, where a memoryview compares item
        # by item, ~20 times slower)
        return all(self.map[off : off + n] == GUARD_PATTERN[:n] for off, n in self.guards)

    def close(self) -> None:
        self.memory.close()
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # a failing test's traceback still holds chain views; GC unmaps later


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena()
    try:
        yield a
    finally:
        a.close()


def _check_chain(arena: Arena, chain: DescriptorChain, want: ExpectedChain) -> None:
    assert chain.head == want.head
    assert [len(s) for s in chain.readable] == [n for _, n in want.readable]
    assert [len(s) for s in chain.writable] == [n for _, n in want.writable]
    assert chain.readable_len == want.readable_len
    assert chain.writable_len == want.writable_len
    assert chain.read() == arena.read(want.readable)


def _complete(arena: Arena, chain: DescriptorChain, want: ExpectedChain,
              rnd: random.Random) -> int:
    """Write a pattern into the chain and check it landed exactly where the judge's segments
    say (segments may overlap: later ones win, as in a scatter). Returns the length."""
    written = rnd.randint(0, chain.writable_len)
    start = want.head % 251
    pattern = PATTERN[start : start + written]
    expect = bytearray(arena.view)
    pos = 0
    for addr, length in want.writable:
        for off, n in arena.offsets(addr, length):
            take = min(n, written - pos)
            expect[off : off + take] = pattern[pos : pos + take]
            pos += take
    assert chain.write(pattern) == written
    assert arena.map[:] == expect
    return written


def _push(arena: Arena, queue: DeviceQueue | PackedDeviceQueue, case: HostileCase,
          chain: DescriptorChain, written: int) -> None:
    """Push and check the used element and used->idx the device wrote (right away: a hostile
    driver may point a later writable buffer at the used ring itself)."""
    if isinstance(queue, PackedDeviceQueue):
        pos, wrap = queue.used_idx & 0x7FFF, queue.used_idx >> 15
        queue.push(chain, written)
        used = arena.read(((case.desc_addr + 16 * pos, 16),))
        flags = int.from_bytes(used[14:], "little")
        assert (int.from_bytes(used[8:12], "little"), int.from_bytes(used[12:14], "little")) \
            == (written, chain.head)
        assert flags & 0x8080 == (0x8080 if wrap else 0)  # AVAIL = USED = wrap counter
        return
    assert isinstance(queue, DeviceQueue)
    slot = queue.used_idx % case.size
    queue.push(chain, written)
    used = arena.read(((case.used_addr, 4 + 8 * case.size),))
    assert int.from_bytes(used[2:4], "little") == queue.used_idx
    elem = used[4 + 8 * slot : 12 + 8 * slot]
    assert (int.from_bytes(elem[:4], "little"), int.from_bytes(elem[4:], "little")) == (
        chain.head, written)


def run_case(arena: Arena, case: HostileCase, rnd: random.Random) -> str | None:
    """Drive one case through a DeviceQueue; returns the break reason (None if valid)."""
    before = bytes(arena.view)
    queue = case.device_queue(arena.memory)
    want = case.verdict.chains
    popped: list[tuple[DescriptorChain, ExpectedChain]] = []
    error: RingError | None = None
    try:
        for _ in range(case.size + 1):  # pop must terminate: at most `size` chains pending
            chain = queue.pop()
            if chain is None:
                break
            assert len(popped) < len(want), f"popped more chains than the judge: {case}"
            expected = want[len(popped)]
            _check_chain(arena, chain, expected)
            popped.append((chain, expected))
            if case.complete_each:
                _push(arena, queue, case, chain, _complete(arena, chain, expected, rnd))
        else:
            raise AssertionError(f"pop did not run dry after {case.size + 1} chains: {case}")
    except RingError as exc:
        error = exc
    verdict = case.verdict
    if error is None:
        assert not verdict.broken, f"{case.defect.name} ring not detected: {case}"
        assert len(popped) == len(want)
        assert queue.broken is None
        if not case.complete_each:
            order = list(range(len(popped)))
            rnd.shuffle(order)  # out-of-order completion
            for i in order:
                chain, expected = popped[i]
                _push(arena, queue, case, chain, _complete(arena, chain, expected, rnd))
        assert queue.in_flight() == []
    else:
        problem = verdict.mismatch(str(error))
        assert problem is None, f"{problem}\n{case}"
        assert queue.broken is not None
        assert len(popped) == len(want), f"stopped after {len(popped)} chains: {case}"
        with pytest.raises(RingError):
            queue.pop()  # stays broken
        with pytest.raises((RingError, QueueUsageError)):
            queue.push(0, 0)
    # Nothing outside the used ring and the popped chains' writable buffers changed.
    after = bytearray(arena.view)
    expect = bytearray(before)
    allowed = [case.used_range]
    allowed += [seg for _, exp in popped for seg in exp.writable]
    for addr, length in allowed:
        for off, n in arena.offsets(addr, length):
            after[off : off + n] = bytes(n)
            expect[off : off + n] = bytes(n)
    assert after == expect, f"device wrote outside the used ring and writable buffers: {case}"
    assert arena.guards_intact()
    return None if error is None else str(error)


def test_hostile_generator_yields_every_defect_with_the_reason_it_promises(arena: Arena) -> None:
    gen = HostileRingGenerator(arena.memory, seed=1)
    rnd = random.Random(1)
    for defect in Defect:
        for _ in range(200):
            case = gen.case(defect)
            assert case.defect is defect
            if defect.reason is not None:
                assert defect.reason in case.verdict.reasons
            elif defect is Defect.NONE:
                assert not case.verdict.broken
            run_case(arena, case, rnd)


def test_the_generators_fast_rng_draws_exactly_what_random_random_draws() -> None:
    """The generators' shortcut randrange/randint keep the stdlib stream: a seed names the
    same rings as before the shortcut, and the ranges stay exact."""
    fast, ref = _Rng(42), random.Random(42)
    for _ in range(5000):
        n = ref.choice([1, 2, 3, 64, 700, 1 << 16, 1 << 64])
        assert fast.randrange(n) == ref.randrange(n)
        assert fast.randint(-n, n) == ref.randint(-n, n)
        assert fast.randrange(5, 5 + n) == ref.randrange(5, 5 + n)
        assert fast.randrange(0, n, 3) == ref.randrange(0, n, 3)
        assert fast.choice("abcdefg") == ref.choice("abcdefg")
        fast.choice([1, 2, 3, 64, 700, 1 << 16, 1 << 64])
    with pytest.raises(ValueError):
        fast.randrange(0)
    with pytest.raises(ValueError):
        fast.randint(3, 2)


@pytest.mark.timeout(300)
def test_100k_hostile_rings_break_the_queue_precisely_and_touch_nothing_else(
        arena: Arena) -> None:
    gen = HostileRingGenerator(arena.memory, seed=20240601)
    _run_100k_and_check_every_outcome(arena, gen.cases(100_000), set(Reason), random.Random(5))


def _run_100k_and_check_every_outcome(arena: Arena, cases: Iterator[HostileCase],
                                      all_reasons: set[object], rnd: random.Random) -> None:
    """Run every case; then every kind of reason was exercised, garbage and mutations
    produced both outcomes, and plenty of well-formed rings were served."""
    outcomes: Counter[str] = Counter()
    reasons: Counter[object] = Counter()
    for case in cases:
        reason = run_case(arena, case, rnd)
        outcomes[f"{case.defect.name}:{'broken' if reason else 'ok'}"] += 1
        if reason is not None:
            for r in case.verdict.reasons:
                if r.matches(reason):
                    reasons[r] += 1
    assert set(reasons) == all_reasons, all_reasons - set(reasons)
    assert outcomes["GARBAGE:broken"] and outcomes["GARBAGE:ok"]
    assert outcomes["MUTATION:broken"] and outcomes["MUTATION:ok"]
    assert outcomes["NONE:ok"] > 20_000


TOP = 1 << 64
OTHER_LAYOUTS = {
    "one-region-at-0": [(0, 1 << 16)],
    "top-of-the-address-space": [(TOP - 0x3000, 0x2000), (TOP - 0x1000, 0x1000)],
    "many-small-regions": [(0x2000 * i, 0x1000) for i in range(1, 6)]
    + [(0x20000, 0x1000), (0x21000, 0x800)],
}


@pytest.mark.parametrize("layout", OTHER_LAYOUTS.values(), ids=OTHER_LAYOUTS.keys())
def test_generator_and_judge_work_on_other_memory_layouts(
        layout: list[tuple[int, int]]) -> None:
    memory = GuestMemory([buffer_region(bytearray(n), gpa) for gpa, n in layout])
    gen = HostileRingGenerator(memory, seed=11)
    outcomes: Counter[bool] = Counter()
    for case in gen.cases(3000):
        queue = case.device_queue(memory)
        popped = 0
        try:
            for _ in range(case.size + 1):
                chain = queue.pop()
                if chain is None:
                    break
                want = case.verdict.chains[popped]
                assert (chain.head, chain.readable_len, chain.writable_len) == (
                    want.head, want.readable_len, want.writable_len)
                popped += 1
                if case.complete_each:
                    queue.push(chain, chain.writable_len)
        except RingError as exc:
            assert case.verdict.mismatch(str(exc)) is None, case
            outcomes[True] += 1
        else:
            assert not case.verdict.broken, case
            outcomes[False] += 1
        assert popped == len(case.verdict.chains)
    assert outcomes[True] and outcomes[False]


PROTECTED_CHILD = r"""
import ctypes, mmap, random, sys
from pyvirtio.memory import GuestMemory, buffer_region
from pyvirtio.ring import RingError
from pyvirtio.testing.hostile import HostileRingGenerator
from pyvirtio.testing.hostile_packed import HostilePackedRingGenerator

PAGE = mmap.PAGESIZE
count, seed = int(sys.argv[1]), int(sys.argv[2])
generator = HostilePackedRingGenerator if sys.argv[3] == "packed" else HostileRingGenerator
# [guard][R1][guard][R2][guard][R3][guard], one page each; R1 and R2 adjacent in gpa.
m = mmap.mmap(-1, 7 * PAGE)
view = memoryview(m)
libc = ctypes.CDLL(None, use_errno=True)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
for page in (0, 2, 4, 6):
    if libc.mprotect(ctypes.c_void_p(base + page * PAGE), PAGE, 0) != 0:
        sys.exit("mprotect failed")
layout = [(0x10000, 1), (0x10000 + PAGE, 3), (0x10000 + 3 * PAGE, 5)]
memory = GuestMemory([buffer_region(view[p * PAGE:(p + 1) * PAGE], gpa) for gpa, p in layout])
gen = generator(memory, seed=seed)
broken = 0
for case in gen.cases(count):
    queue = case.device_queue(memory)
    chains = []
    try:
        for _ in range(case.size + 1):
            chain = queue.pop()
            if chain is None:
                break
            chain.read()  # every byte the device is handed, read...
            chain.write(b"\x5a" * chain.writable_len)  # ...and written
            if case.complete_each:
                queue.push(chain, chain.writable_len)
            else:
                chains.append(chain)
        for chain in chains:
            queue.push(chain, chain.writable_len)
    except RingError:
        broken += 1
print(broken)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_hostile_rings_never_touch_inaccessible_guard_pages(fmt: str) -> None:
    """Guard pages around every region are mprotect(PROT_NONE): any read or write outside
    the regions would kill the device process with SIGSEGV."""
    proc = subprocess.run([sys.executable, "-c", PROTECTED_CHILD, "20000", "99", fmt],
                          capture_output=True, timeout=100)
    assert proc.returncode != -signal.SIGSEGV, "the device touched a guard page"
    assert proc.returncode == 0, proc.stderr.decode()
    assert 0 < int(proc.stdout) < 20000  # some rings broke, some did not


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("PYVIRTIO_SOAK"),
                    reason="soak test: set PYVIRTIO_SOAK=1 (and optionally a seed) to run")
def test_hostile_soak_million_rings(arena: Arena) -> None:
    seed = int(os.environ["PYVIRTIO_SOAK"]) if os.environ["PYVIRTIO_SOAK"] != "1" else (
        random.randrange(1 << 32))
    print(f"hostile soak seed {seed} (rerun with PYVIRTIO_SOAK={seed})")
    gen = HostileRingGenerator(arena.memory, seed=seed)
    rnd = random.Random(seed)
    for case in gen.cases(1_000_000):
        run_case(arena, case, rnd)


# ---- packed rings ---------------------------------------------------------------------------


def test_hostile_packed_generator_yields_every_defect_with_the_reason_it_promises(
        arena: Arena) -> None:
    gen = HostilePackedRingGenerator(arena.memory, seed=2)
    rnd = random.Random(2)
    for defect in PackedDefect:
        for _ in range(200):
            case = gen.case(defect)
            assert isinstance(case, PackedHostileCase)
            assert case.defect is defect
            if defect.reason is not None:
                assert defect.reason in case.verdict.reasons
            elif defect is PackedDefect.NONE:
                assert not case.verdict.broken
            run_case(arena, case, rnd)


@pytest.mark.timeout(300)
def test_100k_hostile_packed_rings_break_the_queue_precisely_and_touch_nothing_else(
        arena: Arena) -> None:
    gen = HostilePackedRingGenerator(arena.memory, seed=20261203)
    _run_100k_and_check_every_outcome(arena, gen.cases(100_000), set(PackedReason),
                                      random.Random(6))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("PYVIRTIO_SOAK"),
                    reason="soak test: set PYVIRTIO_SOAK=1 (and optionally a seed) to run")
def test_hostile_packed_soak_million_rings(arena: Arena) -> None:
    seed = int(os.environ["PYVIRTIO_SOAK"]) if os.environ["PYVIRTIO_SOAK"] != "1" else (
        random.randrange(1 << 32))
    print(f"hostile packed soak seed {seed} (rerun with PYVIRTIO_SOAK={seed})")
    gen = HostilePackedRingGenerator(arena.memory, seed=seed)
    rnd = random.Random(seed)
    for case in gen.cases(1_000_000):
        run_case(arena, case, rnd)
