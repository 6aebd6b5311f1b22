"""Every device type through every register model, with our drivers, in one process.

DevicePair(transport=...) puts the device behind a register model (legacy, modern and
transitional virtio-pci, virtio-mmio version 2 and 1) on an in-process VMM bus; our driver
finds it as it would on a machine (PCI scan and firmware setup, or the MMIO window) and
works through the matching driver transport. Each case moves data both ways and checks it
byte for byte, then resets and probes the device again and moves data again. Neither the
register model nor the device may have recorded a problem: our driver follows the rules.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

import pyvirtio.driver.all  # noqa: F401 - registers every built-in driver
from helpers.net import arp_request, mac
from pyvirtio.device.balloon import BalloonDevice
from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.blk import BlkDevice
from pyvirtio.device.console import ConsoleDevice, MemoryPort, Port
from pyvirtio.device.net import NetDevice, link
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.balloon import BalloonDriver
from pyvirtio.driver.base import Driver, probe
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.console import ConsoleDriver
from pyvirtio.driver.net import NetDriver
from pyvirtio.driver.rng import RngDriver
from pyvirtio.errors import LocalError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import REGISTER_TRANSPORTS, DevicePair
from pyvirtio.testing.vmm import VmmBus
from pyvirtio.transport.mmio_device import VirtioMmioDevice
from pyvirtio.transport.pci_device import VirtioPciDevice
from pyvirtio.transport.virtio_mmio import VirtioMmio
from pyvirtio.transport.virtio_pci import discover

MiB = 1 << 20
SECTOR = 512


def assert_clean(pair: DevicePair) -> None:
    assert pair.model is not None
    assert pair.model.problems == []
    assert pair.device.problems == []


def reprobe(pair: DevicePair) -> Driver:
    """Reset the device through the driver's removal and probe it again."""
    pair.remove()
    assert pair.device.status == 0
    return pair.probe()


def rng_io(drv: Driver, device: VirtioDevice) -> None:
    assert isinstance(drv, RngDriver) and isinstance(device, RngDevice)
    before = device.served
    data = drv.read(8192)
    assert len(data) == 8192 and device.served - before == 8192


@pytest.mark.parametrize("kind", REGISTER_TRANSPORTS)
def test_rng(kind: str) -> None:
    device = RngDevice()
    with DevicePair(device, transport=kind) as pair:
        drv = pair.probe()
        data = drv.read(8192) if isinstance(drv, RngDriver) else b""
        assert hashlib.sha256(data).digest() == device.digest.digest()
        rng_io(reprobe(pair), device)
        assert_clean(pair)


@pytest.mark.parametrize("kind", REGISTER_TRANSPORTS)
def test_blk(kind: str, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    content = random.Random(1).randbytes(256 * SECTOR)
    image.write_bytes(content)
    device = BlkDevice(image)
    with DevicePair(device, transport=kind) as pair:
        drv = pair.probe()
        assert isinstance(drv, BlkDriver)
        assert drv.read(0, 256) == content
        new = random.Random(2).randbytes(64 * SECTOR)
        drv.write(100, new)
        drv.flush()
        drv = reprobe(pair)
        assert isinstance(drv, BlkDriver)
        assert drv.read(100, 64) == new
        assert image.read_bytes() == content[: 100 * SECTOR] + new + content[164 * SECTOR :]
        assert_clean(pair)


@pytest.mark.parametrize("kind", REGISTER_TRANSPORTS)
def test_net(kind: str) -> None:
    a_dev, b_dev = NetDevice(mac(1), name="net1"), NetDevice(mac(2), name="net2")
    link(a_dev, b_dev)
    with DevicePair(a_dev, transport=kind) as a, DevicePair(b_dev, transport=kind) as b:
        da, db = a.probe(), b.probe()
        assert isinstance(da, NetDriver) and isinstance(db, NetDriver)
        assert da.mac == mac(1) and db.mac == mac(2)
        frame = arp_request(mac(1), "10.0.0.1", "10.0.0.2")
        da.send(frame)
        assert [f.data for f in db.recv_all()] == [frame]
        back = arp_request(mac(2), "10.0.0.2", "10.0.0.1")
        db.send(back)
        assert [f.data for f in da.recv_all()] == [back]
        da = reprobe(a)
        assert isinstance(da, NetDriver)
        da.send(frame)
        assert [f.data for f in db.recv_all()] == [frame]
        assert_clean(a)
        assert_clean(b)


@pytest.mark.parametrize("kind", REGISTER_TRANSPORTS)
def test_console(kind: str) -> None:
    console, named = MemoryPort(), MemoryPort()
    device = ConsoleDevice([Port(console), Port(named, name="org.test.port")])
    with DevicePair(device, transport=kind, memory_size=32 * MiB) as pair:
        drv = pair.probe()
        assert isinstance(drv, ConsoleDriver)
        drv.write(0, b"hello from the guest\n")
        assert console.take_output() == b"hello from the guest\n"
        console.feed(b"hello from the host\n")
        assert drv.read(0, 20) == b"hello from the host\n"
        blob = random.Random(3).randbytes(100_000)
        drv.write("org.test.port", blob)
        assert named.take_output() == blob
        drv = reprobe(pair)
        assert isinstance(drv, ConsoleDriver)
        drv.open("org.test.port")  # a guest process opens the port: input flows to it
        named.feed(b"again")
        assert drv.read("org.test.port", 5) == b"again"
        assert_clean(pair)


@pytest.mark.parametrize("kind", REGISTER_TRANSPORTS)
def test_balloon(kind: str) -> None:
    device = BalloonDevice(queue_size=16)
    with DevicePair(device, 32 * MiB, transport=kind) as pair:
        drv = pair.probe()
        assert isinstance(drv, BalloonDriver)
        device.set_target(4 * MiB)  # a config change: reaches the driver as an interrupt
        assert drv.service()
        assert device.actual_bytes == 4 * MiB
        assert drv.current_stats()
        drv = reprobe(pair)
        assert isinstance(drv, BalloonDriver)
        device.set_target(2 * MiB)
        assert drv.service()
        assert device.actual_bytes == 2 * MiB
        assert_clean(pair)


# ---- what the pair shows of the machine -----------------------------------------------


@pytest.mark.parametrize("kind,expected", [
    ("pci-legacy", ("legacy", True)), ("pci-modern", ("modern", False)),
    ("pci-transitional", ("modern", False)), ("mmio", ("virtio-mmio", False)),
    ("mmio-legacy", ("virtio-mmio", True)),
])
def test_the_driver_takes_the_interface_the_model_offers(
        kind: str, expected: tuple[str, bool]) -> None:
    with DevicePair(RngDevice(), transport=kind) as pair:
        assert (pair.transport.kind, pair.transport.legacy) == expected
        model = pair.model
        if kind.startswith("pci"):
            assert isinstance(model, VirtioPciDevice)
            assert (model.legacy, model.modern) == (kind != "pci-modern",
                                                    kind != "pci-legacy")
        else:
            assert isinstance(model, VirtioMmioDevice)
            assert model.version == (1 if kind == "mmio-legacy" else 2)


@pytest.mark.parametrize("kind", REGISTER_TRANSPORTS)
def test_interrupts_arrive_through_the_line_and_are_acknowledged(kind: str) -> None:
    device = RngDevice()
    with DevicePair(device, transport=kind) as pair:
        drv = pair.probe()
        rng_io(drv, device)
        assert pair.transport.interrupts > 0
        assert pair.model is not None and not pair.model.irq_level and pair.model.isr == 0
        assert pair.bus is not None and pair.bus.unclaimed == 0


@pytest.mark.parametrize("kind", REGISTER_TRANSPORTS)
def test_the_trace_records_probe_status_writes_in_order(kind: str) -> None:
    with DevicePair(RngDevice(), transport=kind, trace=True) as pair:
        pair.probe()
        assert pair.trace is not None
        status_off = {"pci-legacy": 18, "mmio": 0x70, "mmio-legacy": 0x70}.get(kind, 20)
        space = "mmio" if kind.startswith("mmio") else ("bar0" if kind == "pci-legacy"
                                                         else "bar4")
        writes = [a.value for a in pair.trace.accesses
                  if a.write and a.space == space and a.offset == status_off]
        ack, drv = S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER
        if kind in ("pci-legacy", "mmio-legacy"):
            assert writes == [0, ack, drv, drv | S.DRIVER_OK]
        else:
            assert writes == [0, ack, drv, drv | S.FEATURES_OK,
                              drv | S.FEATURES_OK | S.DRIVER_OK]


def test_unknown_transport_or_legacy_flag_on_a_register_transport_is_refused() -> None:
    with pytest.raises(LocalError, match="unknown transport"):
        DevicePair(RngDevice(), transport="carrier-pigeon")
    with pytest.raises(LocalError, match="legacy= is for the loopback"):
        DevicePair(RngDevice(), transport="pci-modern", legacy=True)


def test_one_machine_carries_several_functions_each_on_its_own_bars_and_line() -> None:
    """Two PCI functions and a virtio-mmio device on one VmmBus: the scan finds both
    functions, firmware gives them disjoint BARs and different INTx lines, and each driver
    reaches only its own device."""
    memory = GuestMemory.anonymous(8 * MiB)
    allocator = Allocator(0x1000, 8 * MiB - 0x1000)
    devices = [RngDevice(), RngDevice(), RngDevice()]
    bus = VmmBus()
    bus.add_pci(3, VirtioPciDevice(devices[0], memory, modern=False))
    bus.add_pci(4, VirtioPciDevice(devices[1], memory, legacy=False))
    base = bus.add_mmio(VirtioMmioDevice(devices[2], memory), line=9)
    try:
        found = discover(bus, memory, allocator, lines=bus)
        assert [t.kind for t in found] == ["legacy", "modern"]
        assert found[0].line != found[1].line
        mmio = VirtioMmio(bus, base, memory, allocator, found[0].router, 9)
        transports = [*found, mmio]
        for t in transports:
            assert t.line is not None
            bus.on_line(t.line, lambda t=t: t.wait(0.0))
        drivers = [probe(t) for t in transports]
        for i, drv in enumerate(drivers):
            assert isinstance(drv, RngDriver)
            drv.read(100 * (i + 1))
        assert [d.served for d in devices] == [100, 200, 300]
        assert all(t.interrupts > 0 for t in transports) and bus.unclaimed == 0
        for t in transports:
            t.reset()
    finally:
        memory.close()
