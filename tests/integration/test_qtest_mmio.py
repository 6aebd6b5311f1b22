"""pyvirtio's drivers against QEMU's virtio device models on virtio-mmio, over qtest.

QEMU runs its ``microvm`` machine (:data:`pyvirtio.guest.qtest.MICROVM`), whose virtio
devices sit in virtio-mmio slots; pyvirtio is the guest driver through
:class:`~pyvirtio.transport.virtio_mmio.VirtioMmio`, with the register layout of version 1
(legacy, QEMU's default) and version 2 (``-global virtio-mmio.force-legacy=off``). One QEMU
per version serves every test of this module: an rng fed from a file we wrote, a block
device on an image file we read back, and a balloon steered over QMP. What is asserted is
what QEMU did: the bytes its back-end read, the sectors it wrote into the file, the
interrupt line of the device's slot, the balloon size QEMU reports.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from helpers.qtest import QTEST_TRANSPORTS, QtestBus
from peers import require_binaries
from pyvirtio.driver.balloon import BalloonDriver
from pyvirtio.driver.base import probe
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.rng import RngDriver
from pyvirtio.guest.qtest import MICROVM_IRQ_BASE, MICROVM_MMIO_BASE, MICROVM_MMIO_STRIDE
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.transport.virtio_mmio import VirtioMmio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QEMU = "qemu-system-x86_64"
MIB = 1 << 20
RAM = 64 * MIB
RING_BITS = F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC)
MMIO = [bus for bus in QTEST_TRANSPORTS if bus.mmio]


class MicroVm:
    """One microvm under qtest with rng, blk and balloon on virtio-mmio, and its files."""

    def __init__(self, tmp: Path, bus: QtestBus) -> None:
        self.version = 2 if bus.modern else 1
        self.entropy = os.urandom(512 * 1024)
        (tmp / "entropy").write_bytes(self.entropy)
        content = bytearray(4 * MIB)
        for sector in range(len(content) // 512):
            content[sector * 512 : sector * 512 + 8] = sector.to_bytes(8, "little")
        self.image = tmp / "disk.img"
        self.image.write_bytes(content)
        self.content = bytes(content)
        self.qmp_path = str(tmp / "qmp.sock")
        self.machine = bus.machine(
            ["-object", f"rng-random,id=r0,filename={tmp / 'entropy'}",
             *bus.device("virtio-rng", "rng=r0,id=rng0"),
             "-drive", f"if=none,id=d0,file={self.image},format=raw",
             *bus.device("virtio-blk", "drive=d0,serial=pyvirtio-mmio,num-queues=2,id=blk0"),
             *bus.device("virtio-balloon", "id=balloon0"),
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off"],
            memory_size=RAM)
        self.qmp: QEMUMonitorProtocol | None = None
        self.transports: dict[int, VirtioMmio] = {}

    def start(self) -> MicroVm:
        self.machine.start()
        self.qmp = QEMUMonitorProtocol(self.qmp_path)
        self.qmp.connect()
        self.transports = {t.device_id: t for t in self.machine.virtio_mmio_transports()}
        return self

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        self.machine.close()

    def guest_features(self, qom_id: str) -> set[str]:
        """The transport feature bits QEMU latched from our driver, by QEMU's names."""
        assert self.qmp is not None
        status = self.qmp.cmd("x-query-virtio-status", path=f"/machine/peripheral/{qom_id}")
        return {name.split(":")[0] for name in status["guest-features"]["transports"]}

    def fresh(self, device_id: int) -> VirtioMmio:
        """The device's transport after a reset (each test starts from a reset device)."""
        transport = self.transports[device_id]
        transport.reset()
        assert transport.get_status() == 0
        return transport


@pytest.fixture(scope="module", params=MMIO, ids=str)
def microvm(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroVm]:
    require_binaries(QEMU)
    m = MicroVm(tmp_path_factory.mktemp(f"microvm-{request.param}"), request.param)
    try:
        yield m.start()
    finally:
        m.close()


def test_devices_sit_in_the_top_slots_with_the_requested_register_layout(
        microvm: MicroVm) -> None:
    assert sorted(microvm.transports) == sorted([ids.RNG, ids.BLOCK, ids.BALLOON])
    for t in microvm.transports.values():
        assert t.version == microvm.version
        assert t.vendor_id == 0x554D4551  # "QEMU"
        slot = (t.base - MICROVM_MMIO_BASE) // MICROVM_MMIO_STRIDE
        assert t.base == MICROVM_MMIO_BASE + slot * MICROVM_MMIO_STRIDE
        assert t.line == MICROVM_IRQ_BASE + slot
    # QEMU fills the slots from the top, in command-line order
    assert [microvm.transports[i].base for i in (ids.RNG, ids.BLOCK, ids.BALLOON)] == [
        MICROVM_MMIO_BASE + s * MICROVM_MMIO_STRIDE for s in (7, 6, 5)]


@pytest.mark.parametrize("ring", ["event_idx+indirect", "plain"])
def test_rng_driver_reads_exactly_the_bytes_the_backend_read_from_its_file(
        microvm: MicroVm, ring: str) -> None:
    transport = microvm.fresh(ids.RNG)
    wanted = F.bit(F.VERSION_1) | (RING_BITS if ring != "plain" else 0)
    driver = probe(transport, RngDriver, features=wanted)
    assert isinstance(driver, RngDriver)
    expected = {"VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_INDIRECT_DESC"} \
        if ring != "plain" else set()
    if not transport.legacy:
        expected.add("VIRTIO_F_VERSION_1")  # a legacy device takes no bit above 31
    assert microvm.guest_features("rng0") == expected
    got = driver.read(32 * 1024) + driver.read(32 * 1024)
    # the back-end reads the file sequentially across resets: find where this read began
    start = microvm.entropy.find(got[:64])
    assert start >= 0
    assert got == microvm.entropy[start : start + len(got)]


def test_used_buffer_interrupt_arrives_on_the_slot_line(microvm: MicroVm) -> None:
    transport = microvm.fresh(ids.RNG)
    driver = probe(transport, RngDriver)
    assert isinstance(driver, RngDriver)
    qtest = microvm.machine.qtest
    seen: list[object] = []
    driver.vq.callback = seen.append
    before = transport.interrupts
    driver.vq.add_buf([], [(driver.buf, 100)], token="first")
    driver.vq.kick()
    assert transport.line is not None
    assert qtest.wait_irq([transport.line], 10.0)  # the slot's own GSI went high
    assert transport.wait(1.0)
    assert seen == [driver.vq]
    assert driver.vq.get_buf() == ("first", 100)
    assert transport.interrupts == before + 1
    qtest.poll_irqs()
    assert not qtest.irq_level(transport.line)  # InterruptACK lowered it


@pytest.mark.parametrize("ring", ["event_idx+indirect", "plain"])
def test_blk_driver_reads_writes_and_flushes_the_image_file_through_qemu(
        microvm: MicroVm, ring: str) -> None:
    transport = microvm.fresh(ids.BLOCK)
    wanted = BlkDriver.features | (RING_BITS if ring != "plain" else 0)
    driver = probe(transport, BlkDriver, features=wanted)
    assert isinstance(driver, BlkDriver)
    ring_names = {"VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_INDIRECT_DESC"}
    assert microvm.guest_features("blk0") & ring_names == (
        ring_names if ring != "plain" else set())
    assert driver.capacity == len(microvm.content) // 512
    assert driver.num_queues == 2
    assert driver.read(100, 16) == microvm.content[100 * 512 : 116 * 512]

    sector = 2048 + (128 if ring == "plain" else 0) + 512 * microvm.version
    payload = os.urandom(64 * 1024)
    driver.write(sector, payload)
    driver.flush()
    with open(microvm.image, "rb") as f:
        f.seek(sector * 512)
        assert f.read(len(payload)) == payload
    assert driver.read(sector, len(payload) // 512) == payload

    ios = [driver.submit_read(s, 8) for s in range(0, 8 * 24, 8)]
    driver.wait(ios)
    assert {io.queue for io in ios} == {0, 1}
    for io in ios:
        assert io.ok
        assert io.data == microvm.content[io.sector * 512 : (io.sector + 8) * 512]
    assert driver.get_id() == b"pyvirtio-mmio"


def test_qemu_sets_the_balloon_target_and_our_driver_inflates_to_it(
        microvm: MicroVm) -> None:
    transport = microvm.fresh(ids.BALLOON)
    driver = probe(transport, BalloonDriver)
    assert isinstance(driver, BalloonDriver)
    assert microvm.qmp is not None
    microvm.qmp.cmd("balloon", value=RAM - 8 * MIB)
    driver.run_until(lambda: driver.actual_pages == 8 * MIB // 4096, timeout=30)
    assert microvm.qmp.cmd("query-balloon")["actual"] == RAM - 8 * MIB
    microvm.qmp.cmd("balloon", value=RAM)
    driver.run_until(lambda: driver.actual_pages == 0, timeout=30)
    assert microvm.qmp.cmd("query-balloon")["actual"] == RAM
    assert driver.pages == []
