"""Differential register traces: one driver scenario on QEMU's device model and on ours.

The same scenario (probe with every feature bit wanted, queue setup, I/O, for blk a
capacity change by the host and the driver's read of it, reset, probe again) runs our
driver against QEMU's rng and blk models over qtest and against pyvirtio's own devices
behind our register models in process, on legacy PCI, modern PCI and virtio-mmio (version
2 and 1). A :class:`~pyvirtio.testing.trace.BusRecorder` under the driver records every
register access on both machines as (structure, offset, size, value); the two traces must
be equal once the differences the spec allows are taken out (:func:`normalise`, each
listed with its spec section in docs/peers.md).
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from peers import require_binaries
from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.blk import BlkDevice
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import Driver, probe
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.rng import RngDriver
from pyvirtio.guest.qtest import MICROVM, QtestMachine
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.testing.trace import BusRecorder
from pyvirtio.testing.vmm import plug
from pyvirtio.transport.mmio_device import VirtioMmioDevice
from pyvirtio.transport.pci_device import VirtioPciDevice
from pyvirtio.transport.register_model import Access
from pyvirtio.transport.virtio_mmio import VirtioMmio
from pyvirtio.transport.virtio_pci import VirtioPciTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QEMU = "qemu-system-x86_64"
MIB = 1 << 20
RAM = 64 * MIB
ALL_FEATURES = (1 << 64) - 1
DISK = 1 * MIB
GROWN = 2 * MIB  # the disk after the host grew it
TRANSPORTS = ["pci-legacy", "pci-modern", "mmio", "mmio-legacy"]
#: the queue size both devices offer (QEMU's virtio-rng has 8, fixed; blk's is a property)
QUEUE_SIZE = {"rng": 8, "blk": 128}
#: QEMU's virtio-mmio answers QueueNumMax with VIRTQUEUE_MAX_SIZE, whatever the model's size
QEMU_MMIO_QUEUE_MAX = 1024

#: (structure, offset) of each register whose *value* is the device's own choice
FEATURE_REGS = {("legacy", 0x0), ("legacy", 0x4), ("common", 0x4), ("common", 0xC),
                ("mmio", 0x10), ("mmio", 0x20)}
#: registers an interrupt handler reads and acknowledges: when the driver looks at them
#: depends on when the device's interrupt arrives, not on the driver's scenario
INTERRUPT_REGS = {("legacy", 0x13), ("isr", 0x0), ("mmio", 0x60), ("mmio", 0x64)}
#: device status: read back during I/O waits (needs-reset checks), as often as the device
#: takes to complete the request
STATUS_REGS = {("legacy", 0x12), ("common", 0x14), ("mmio", 0x70)}
#: the queue-notify registers of the legacy layouts (modern PCI has its "notify" area)
NOTIFY_REGS = {("legacy", 0x10), ("mmio", 0x50)}
#: configuration generation: its value is the device's (only changes matter: compared
#: relative to the first value read)
GENERATION_REGS = {("common", 0x15), ("mmio", 0xFC)}
#: where device configuration starts, per structure
CONFIG_START = {"legacy": 0x14, "device": 0x0, "mmio": 0x100}
#: the blk configuration fields whose values both devices must share: capacity
BLK_SHARED_CONFIG = range(0, 8)


def normalise(trace: list[Access], device: str) -> list[str]:
    """The trace with the allowed differences taken out (see docs/peers.md):
    interrupt status reads/acks dropped, feature words compared by position only, notify
    writes compared by the queue index written, not by where each device put its
    doorbell."""
    out: list[str] = []
    first_generation: int | None = None
    for a in trace:
        key = (a.space, a.offset)
        if key in INTERRUPT_REGS:
            continue
        if key in STATUS_REGS and not a.write and a.value & 0x4:
            continue  # a needs-reset check while waiting (DRIVER_OK already set)
        if key in GENERATION_REGS:
            if first_generation is None:
                first_generation = a.value
            out.append(f"r {a.space}+0x{a.offset:x}/{a.size} = first generation "
                       f"+ {a.value - first_generation}")
            continue
        start = CONFIG_START.get(a.space)
        if (device == "blk" and start is not None and a.offset >= start
                and a.offset - start not in BLK_SHARED_CONFIG):
            out.append(f"r {a.space}+0x{a.offset:x}/{a.size} = <device's limit>")
            continue
        if key in FEATURE_REGS:
            out.append(f"{'w' if a.write else 'r'} {a.space}+0x{a.offset:x}/{a.size} "
                       "= <features>")
        elif a.space == "notify":
            out.append(f"notify queue {a.value}")
        else:
            out.append(str(a))
    return out

Transport = VirtioPciTransport | VirtioMmio


def qemu_args(kind: str, device: str, image: Path) -> tuple[list[str], str]:
    """QEMU's arguments and machine for ``device`` on ``kind``."""
    backend = [] if device == "rng" else [
        "-drive", f"if=none,id=d0,file={image},format=raw"]
    props = "" if device == "rng" else f",drive=d0,queue-size={QUEUE_SIZE['blk']}"
    if kind in ("pci-modern", "mmio"):
        props += ",packed=on"  # our devices offer the packed ring: QEMU's must too
    if kind.startswith("pci"):
        iface = "disable-modern=on" if kind == "pci-legacy" else "disable-legacy=on"
        return [*backend, "-device", f"virtio-{device}-pci{props},{iface}"], "pc"
    legacy = "on" if kind == "mmio-legacy" else "off"
    return [*backend, "-global", f"virtio-mmio.force-legacy={legacy}",
            "-device", f"virtio-{device}-device{props}"], MICROVM


def scenario(transport: Transport, driver_class: type[Driver],
             change: Callable[[], None]) -> None:
    """Probe (every feature wanted), I/O, a config change and a read of it, reset, probe
    again."""
    driver = probe(transport, driver_class, features=ALL_FEATURES)
    if isinstance(driver, RngDriver):
        assert len(driver.read(64)) == 64
    else:
        assert isinstance(driver, BlkDriver)
        driver.read(0, 8)
        driver.write(8, b"\xa5" * 4096)
        driver.flush()
        seen = transport.config_interrupts
        change()  # the host grows the disk: a configuration change interrupt follows
        deadline = time.monotonic() + 10
        while transport.config_interrupts == seen:
            assert time.monotonic() < deadline, "no configuration change interrupt"
            transport.wait(0.1)
        capacity = int.from_bytes(driver.device.read_config(0, 8), "little")
        assert capacity == GROWN // 512
    transport.reset()
    driver = probe(transport, driver_class, features=ALL_FEATURES)
    transport.reset()


def qemu_trace(kind: str, device: str, image: Path) -> list[Access]:
    args, machine_name = qemu_args(kind, device, image)
    qmp_path = str(image.with_suffix(".qmp"))
    m = QtestMachine([*args, "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                     machine=machine_name, memory_size=RAM)
    qmp = QEMUMonitorProtocol(qmp_path)
    recorders: list[BusRecorder] = []

    def wrap(inner: object) -> BusRecorder:
        recorders.append(BusRecorder(inner))  # type: ignore[arg-type]
        return recorders[-1]

    def grow() -> None:
        qmp.cmd("block_resize", device="d0", size=GROWN)

    try:
        m.start()
        qmp.connect()
        found: list[Transport] = list(
            m.virtio_mmio_transports(wrap=wrap) if kind.startswith("mmio")
            else m.virtio_transports(prefer_modern=kind == "pci-modern", wrap=wrap))
        (transport,) = found
        (recorder,) = recorders
        recorder.watch(transport)
        scenario(transport, RngDriver if device == "rng" else BlkDriver, grow)
        return recorder.accesses
    finally:
        qmp.close()
        m.close()


def our_trace(kind: str, device: str, image: Path) -> list[Access]:
    memory = GuestMemory.anonymous(RAM)
    allocator = Allocator(QtestMachine.LOW_RESERVED, RAM - QtestMachine.LOW_RESERVED)
    size = QEMU_MMIO_QUEUE_MAX if kind.startswith("mmio") else QUEUE_SIZE[device]
    dev: VirtioDevice = (RngDevice(queue_size=size) if device == "rng"
                         else BlkDevice(str(image), queue_size=size))
    model: VirtioPciDevice | VirtioMmioDevice
    if kind.startswith("pci"):
        model = VirtioPciDevice(dev, memory, legacy=kind == "pci-legacy",
                                modern=kind == "pci-modern")
    else:
        model = VirtioMmioDevice(dev, memory, version=1 if kind == "mmio-legacy" else 2)
    recorders: list[BusRecorder] = []

    def wrap(inner: object) -> BusRecorder:
        recorders.append(BusRecorder(inner))  # type: ignore[arg-type]
        return recorders[-1]

    try:
        _, transport = plug(model, memory, allocator, wrap=wrap)
        (recorder,) = recorders
        recorder.watch(transport)

        def grow() -> None:
            os.truncate(image, GROWN)
            dev.update_config(0, (GROWN // 512).to_bytes(8, "little"))

        scenario(transport, RngDriver if device == "rng" else BlkDriver, grow)
        return recorder.accesses
    finally:
        memory.close()


@pytest.fixture
def images(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two equal disk images: QEMU's and ours (each side grows its own)."""
    data = os.urandom(DISK)
    paths = (tmp_path / "qemu.img", tmp_path / "ours.img")
    for path in paths:
        path.write_bytes(data)
    yield paths


@pytest.mark.parametrize("device", ["rng", "blk"])
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_same_scenario_same_register_trace(kind: str, device: str,
                                           images: tuple[Path, Path]) -> None:
    require_binaries(QEMU)
    raw_theirs = qemu_trace(kind, device, images[0])
    raw_ours = our_trace(kind, device, images[1])
    for raw in (raw_theirs, raw_ours):  # the scenario really ran on both machines
        status = [a.value for a in raw if (a.space, a.offset) in STATUS_REGS and a.write]
        assert status.count(0) >= 2 and sum(1 for v in status if v & 0x4) == 2
        assert any(a.space == "notify" or (a.space, a.offset) in NOTIFY_REGS for a in raw)
    theirs, ours = normalise(raw_theirs, device), normalise(raw_ours, device)
    diff = list(difflib.unified_diff(theirs, ours, "qemu", "pyvirtio", n=1, lineterm=""))
    print("\n".join(diff))
    assert not diff
