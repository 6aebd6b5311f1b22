"""Hostile register access against the device-side register models.

A driver that writes anything anywhere, at any width, in any order: out-of-range selectors,
read-only registers written, misaligned and wrong-width accesses, rings outside guest memory
or across its holes, queue sizes of 0 or not a power of two, features after FEATURES_OK
(:class:`~pyvirtio.testing.hostile_regs.HostileRegisterGenerator`). For every access:

* nothing raises out of the model (a crash would be a test failure, with the sequence);
* an access the spec forbids in every state (the generator's tag) leaves a problem recorded;
* features written once they are final change nothing;

and after every sequence: the guard bytes around each memory region are untouched (no write
outside guest memory), every running ring lies inside guest memory, and the interrupt line is
high exactly while an ISR bit is set (without MSI-X, with INTx enabled). Guest memory is two
regions with a hole between them, inside one mapping whose guards belong to no region.

100,000 sequences run in CI (10,000 for each of 5 layouts x 2 devices), plus hypothesis-driven
ones; PYVIRTIO_SOAK=1 (or a seed) runs a million. At the end, the same model, power-cycled,
still serves our driver.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyvirtio.driver.all  # noqa: F401 - registers every built-in driver
from pyvirtio.device.base import DEFAULT_TRANSPORT_FEATURES, VirtioDevice
from pyvirtio.device.console import ConsoleDevice, MemoryPort, Port
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import probe
from pyvirtio.driver.console import ConsoleDriver
from pyvirtio.driver.rng import RngDriver
from pyvirtio.memory import GuestMemory, buffer_region
from pyvirtio.memory.alloc import Allocator
from pyvirtio.spec import features as F
from pyvirtio.spec import pci as P
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S
from pyvirtio.testing.hostile_regs import KINDS, HostileRegisterGenerator, RegOp
from pyvirtio.testing.vmm import plug
from pyvirtio.transport.mmio_device import VirtioMmioDevice
from pyvirtio.transport.pci_device import VirtioPciDevice

GUARD = 512
REGION = 0x40000
GUARD_PATTERN = bytes([0xA5, 0x5A, 0xC3, 0x3C]) * (GUARD // 4)
#: (gpa, offset in the mapping): two regions with a hole between them
LAYOUT = [(0x100000, GUARD), (0x200000, 2 * GUARD + REGION)]
MAP_SIZE = 3 * GUARD + 2 * REGION
QUEUE_MAX = 16
MSIX_VECTORS = 4
SEQUENCES_PER_CASE = 10_000
DEVICES = ("rng", "console")


#: The generator knows the split ring's part sizes (to place rings that straddle a region's
#: end), so these devices offer the split ring only; hostile packed rings have their own
#: fuzzing (tests/fuzz/test_hostile_rings.py).
SPLIT_ONLY = DEFAULT_TRANSPORT_FEATURES & ~F.bit(F.RING_PACKED)


def make_device(name: str) -> VirtioDevice:
    if name == "rng":
        return RngDevice(queue_size=QUEUE_MAX, transport_features=SPLIT_ONLY)
    return ConsoleDevice([Port(MemoryPort()), Port(MemoryPort(), name="org.test.p1")],
                         queue_size=QUEUE_MAX, transport_features=SPLIT_ONLY)


class Rig:
    """A guarded guest memory, one device behind a model of ``kind``, and its generator."""

    def __init__(self, kind: str, device_name: str, seed: int) -> None:
        self.kind = kind
        self.map = mmap.mmap(-1, MAP_SIZE)
        self.view = memoryview(self.map)
        self.guards = [(0, GUARD)] + [(off + REGION, GUARD) for _, off in LAYOUT]
        for off, n in self.guards:
            self.view[off : off + n] = GUARD_PATTERN[:n]
        rnd = random.Random(seed)
        for _, off in LAYOUT:
            self.view[off : off + REGION] = rnd.randbytes(REGION)
        self.memory = GuestMemory(
            [buffer_region(self.view[off : off + REGION], gpa) for gpa, off in LAYOUT])
        self.device = make_device(device_name)
        self.model: VirtioPciDevice | VirtioMmioDevice
        if kind.startswith("mmio"):
            self.model = VirtioMmioDevice(self.device, self.memory,
                                          version=1 if kind == "mmio-legacy" else 2)
        else:
            self.model = VirtioPciDevice(
                self.device, self.memory, legacy=kind != "pci-modern",
                modern=kind != "pci-legacy",
                msix_vectors=MSIX_VECTORS if kind.endswith("msix") else 0)
        self.gen = HostileRegisterGenerator(
            kind, num_queues=self.device.num_queues, queue_max=QUEUE_MAX,
            features=self.device.get_features(), config_size=len(self.device.config),
            regions=[(gpa, REGION) for gpa, _ in LAYOUT],
            msix_vectors=MSIX_VECTORS if kind.endswith("msix") else 0, seed=seed)
        self.feature_registers = set(self.gen.layout.driver_features)
        self.refused: Counter[str] = Counter()
        self.ops = 0

    def close(self) -> None:
        self.memory.close()
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # a failing test's traceback may still hold views; GC unmaps later

    # ---- one sequence -------------------------------------------------------------------

    def run(self, sequence: list[RegOp]) -> None:
        model, device = self.model, self.device
        model.reset()
        model.problems.clear()
        device.problems.clear()
        feature_registers = self.feature_registers
        for step, op in enumerate(sequence):
            before = model.problem_count
            features_before = device.driver_features
            final = (op.write and op.size == 4 and (op.space, op.offset) in feature_registers
                     and model.features_final())
            try:
                if op.write:
                    model.write(op.space, op.offset, op.size, op.value)
                else:
                    model.read(op.space, op.offset, op.size)
            except Exception as exc:
                raise AssertionError(f"{self.kind}: step {step} ({op}) raised {exc!r}\n"
                                     + self.show(sequence)) from exc
            self.ops += 1
            if op.refuse is not None:
                self.refused[op.refuse] += 1
                assert model.problem_count > before, (
                    f"{self.kind}: step {step} ({op}) must be refused and recorded "
                    f"({op.refuse}), nothing was\n" + self.show(sequence))
            if final:
                assert device.driver_features == features_before, (
                    f"{self.kind}: step {step} ({op}) changed final features\n"
                    + self.show(sequence))
        self.check_after(sequence)

    def check_after(self, sequence: list[RegOp]) -> None:
        assert self.guards_intact(), f"{self.kind}: a guard was written\n" + self.show(sequence)
        for index, q in enumerate(self.device.queues):
            if q.ring is None:
                continue
            for addr, length in ((q.desc, SP.desc_table_size(q.size)),
                                 (q.avail, SP.avail_size(q.size)),
                                 (q.used, SP.used_size(q.size))):
                assert self.memory.contains(addr, length), (
                    f"{self.kind}: queue {index} runs on 0x{addr:x}+{length} outside memory\n"
                    + self.show(sequence))
        model = self.model
        intx_disabled = isinstance(model, VirtioPciDevice) and bool(
            model.read("config", P.PCI_COMMAND, 2) & 0x400)
        level = bool(model.isr) and not model.msix_enabled() and not intx_disabled
        assert self.model.irq_level == level, (
            f"{self.kind}: line {self.model.irq_level} with ISR 0x{self.model.isr:x}\n"
            + self.show(sequence))

    def guards_intact(self) -> bool:
        return all(self.view[off : off + n] == GUARD_PATTERN[:n] for off, n in self.guards)

    @staticmethod
    def show(sequence: list[RegOp]) -> str:
        return "\n".join(f"  {i:3} {op}" for i, op in enumerate(sequence))

    # ---- afterwards: it still serves ----------------------------------------------------

    def still_serves(self, device_name: str) -> None:
        """Power-cycle the function, then our driver probes it and moves data."""
        if isinstance(self.model, VirtioPciDevice):
            self.model.power_on_reset()
        else:
            self.model.reset()
        self.model.problems.clear()
        self.device.problems.clear()
        gpa = LAYOUT[0][0]
        allocator = Allocator(gpa, REGION)
        _, transport = plug(self.model, self.memory, allocator)
        driver = probe(transport)
        if device_name == "rng":
            assert isinstance(driver, RngDriver)
            assert len(driver.read(1000)) == 1000
        else:
            assert isinstance(driver, ConsoleDriver)
            driver.write(0, b"still here\n")
            assert isinstance(self.device, ConsoleDevice)
            backend = self.device.ports[0].backend
            assert isinstance(backend, MemoryPort)
            assert backend.take_output().endswith(b"still here\n")
        assert self.device.status & S.DRIVER_OK
        assert self.model.problems == [] and self.device.problems == []
        assert self.guards_intact()
        transport.reset()


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """Hundreds of thousands of recorded problems: the records are checked, the log lines
    would only cost time."""
    logger = logging.getLogger("pyvirtio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def run_many(rig: Rig, count: int) -> None:
    for sequence in rig.gen.sequences(count):
        rig.run(sequence)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_10k_hostile_sequences_are_refused_recorded_and_contained(
        kind: str, device_name: str, rigs: list[Rig]) -> None:
    rig = Rig(kind, device_name, seed=KINDS.index(kind) * 10 + DEVICES.index(device_name))
    rigs.append(rig)
    start = time.perf_counter()
    run_many(rig, SEQUENCES_PER_CASE)
    elapsed = time.perf_counter() - start
    print(f"{kind}/{device_name}: {SEQUENCES_PER_CASE} sequences, {rig.ops} accesses, "
          f"{sum(rig.refused.values())} tagged refusals in {elapsed:.2f} s")
    # The generator reached every kind of refusal it knows for this layout, and the device
    # got far enough to run queues and be notified.
    expected = {"wrong width", "misaligned", "width or range", "no such queue",
                "ring outside memory", "outside the device configuration", "read-only"}
    if kind != "pci-legacy":  # legacy PCI queues have the device's size, nothing to write
        expected.add("queue size 0")
    missing = {r for r in expected if not any(t.startswith(r) for t in rig.refused)}
    assert not missing, f"never generated: {missing} (got {dict(rig.refused)})"
    rig.still_serves(device_name)


@pytest.mark.parametrize("kind", KINDS)
def test_hypothesis_register_sequences(kind: str) -> None:
    rig = Rig(kind, "rng", seed=99)
    try:
        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(st.randoms(use_true_random=False), st.integers(4, 40))
        def check(rnd: random.Random, length: int) -> None:
            rig.gen.rnd = rnd
            rig.run(rig.gen.sequence(length))

        check()
        rig.still_serves("rng")
    finally:
        rig.close()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("PYVIRTIO_SOAK"),
                    reason="soak test: set PYVIRTIO_SOAK=1 (and optionally a seed) to run")
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_register_soak(kind: str, rigs: list[Rig]) -> None:
    soak = os.environ["PYVIRTIO_SOAK"]
    seed = int(soak) if soak != "1" else random.randrange(1 << 32)
    print(f"hostile register soak seed {seed} (rerun with PYVIRTIO_SOAK={seed})")
    for device_name in DEVICES:
        rig = Rig(kind, device_name, seed)
        rigs.append(rig)
        run_many(rig, 100_000)
        rig.still_serves(device_name)
