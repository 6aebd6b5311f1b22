"""pyvirtio's drivers against QEMU's own virtio device models, over qtest and virtio-pci.

QEMU runs ``-M pc`` with guest RAM in a shared file we map; pyvirtio is the firmware (BARs,
INTx routing) and the guest driver. Each device is driven through the paper's legacy I/O BAR
layout (``disable-modern=on``), through the VIRTIO 1.x capability layout
(``disable-legacy=on``), and a transitional device through its legacy side. What is
asserted is what QEMU did: the bytes its rng back-end read from a file we wrote, the sectors
its block back-end wrote into an image file we read on the host, the feature bits it latched,
the interrupt line it raised.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.driver.base import probe
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.rng import RngDriver
from pyvirtio.guest.qtest import QtestMachine
from pyvirtio.io.qtest import QtestError, QtestTimeoutError
from pyvirtio.ring import PackedDriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import pci as P
from pyvirtio.transport.pci_bus import PcFirmware, piix_pirq
from pyvirtio.transport.virtio_pci import (
    VirtioPciLegacy,
    VirtioPciModern,
    VirtioPciTransport,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QEMU = "qemu-system-x86_64"

#: interface -> (device property, prefer_modern, expected transport class)
INTERFACES: dict[str, tuple[str, bool, type[VirtioPciTransport]]] = {
    "legacy": ("disable-modern=on", True, VirtioPciLegacy),
    "modern": ("disable-legacy=on", True, VirtioPciModern),
    "transitional-as-legacy": ("disable-legacy=off,disable-modern=off", False,
                               VirtioPciLegacy),
}

#: driver feature sets: the ring features on, or off
RING_FEATURES = {
    "event_idx+indirect": F.bit(F.VERSION_1) | F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC),
    "plain": F.bit(F.VERSION_1),
}

StartMachine = Callable[..., QtestMachine]


@pytest.fixture
def machine(require: Callable[..., None]) -> Iterator[StartMachine]:
    """Start QtestMachines; every one is closed (QEMU stopped, files removed) at teardown,
    also when the test fails."""
    require(QEMU)
    started: list[QtestMachine] = []

    def start(*device_args: str, **kwargs: Any) -> QtestMachine:
        m = QtestMachine(list(device_args), **kwargs)
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.close()


def only_transport(m: QtestMachine, interface: str) -> VirtioPciTransport:
    _, prefer_modern, cls = INTERFACES[interface]
    (transport,) = m.virtio_transports(prefer_modern=prefer_modern)
    assert type(transport) is cls
    return transport


def expected_features(wanted: int, transport: VirtioPciTransport) -> int:
    """The ring bits of ``wanted`` the driver acks on this interface (legacy: no VERSION_1)."""
    ring = wanted & (F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC))
    return ring if transport.legacy else ring | F.bit(F.VERSION_1)


@pytest.fixture
def entropy_file(tmp_path: Path) -> bytes:
    """Known 'entropy' for QEMU's rng-random back-end (more than any test reads, so the
    back-end never hits end of file)."""
    data = os.urandom(512 * 1024)
    (tmp_path / "entropy").write_bytes(data)
    return data


# ---- discovery and firmware ------------------------------------------------------------


def test_scan_finds_each_virtio_device_with_its_interface(machine: StartMachine) -> None:
    m = machine("-device", "virtio-rng-pci,disable-modern=on,addr=2",
                "-device", "virtio-rng-pci,disable-legacy=on,addr=3",
                "-device", "virtio-blk-pci,drive=d0,addr=4",
                "-drive", "if=none,id=d0,driver=null-co,size=1M")
    transports = m.virtio_transports()
    assert [(type(t), t.device_id, t.func.address.device) for t in transports] == [
        (VirtioPciLegacy, ids.RNG, 2), (VirtioPciModern, ids.RNG, 3),
        (VirtioPciModern, ids.BLOCK, 4)]
    legacy, modern, transitional = (t.func for t in transports)
    assert (legacy.device_id, legacy.subsystem_id) == (0x1005, ids.RNG)
    assert modern.device_id == P.modern_device_id(ids.RNG)
    assert transitional.device_id == 0x1001  # transitional: legacy id, modern caps too
    firmware = PcFirmware()
    for t in transports:
        assert t.func.command & 0x7 == 0x7  # I/O, memory, bus master on
        assert t.line == firmware.pirq_irqs[piix_pirq(t.func.address.device, 1)]
        assert t.func.interrupt_line == t.line
        for bar in t.func.bars.values():
            assert bar.address != 0 and bar.address % bar.size == 0
    # QEMU decodes what we assigned: BAR0 of the legacy device answers at its port.
    assert isinstance(transports[0], VirtioPciLegacy)
    assert transports[0].queue_max_size(0) > 0
    assert isinstance(transports[1], VirtioPciModern)
    assert transports[1].num_queues() == 1


# ---- entropy -----------------------------------------------------------------------------


@pytest.mark.parametrize("interface", ["legacy", "modern"])
def test_rng_driver_reads_fresh_random_bytes_from_the_builtin_backend(
        machine: StartMachine, interface: str) -> None:
    prop = INTERFACES[interface][0]
    m = machine("-device", f"virtio-rng-pci,{prop}")
    driver = probe(only_transport(m, interface), RngDriver)
    assert isinstance(driver, RngDriver)
    first = driver.read(64 * 1024)
    second = driver.read(64 * 1024)
    assert len(first) == len(second) == 64 * 1024
    assert first.count(0) < len(first)
    assert first != second


@pytest.mark.parametrize("ring", sorted(RING_FEATURES))
@pytest.mark.parametrize("interface", sorted(INTERFACES))
def test_rng_driver_reads_exactly_the_bytes_the_backend_read_from_its_file(
        machine: StartMachine, tmp_path: Path, entropy_file: bytes, interface: str,
        ring: str) -> None:
    prop = INTERFACES[interface][0]
    m = machine("-object", f"rng-random,id=r0,filename={tmp_path / 'entropy'}",
                "-device", f"virtio-rng-pci,rng=r0,{prop}")
    transport = only_transport(m, interface)
    wanted = RING_FEATURES[ring]
    driver = probe(transport, RngDriver, features=wanted)
    assert isinstance(driver, RngDriver)
    assert transport.acked_features() == expected_features(wanted, transport)
    got = driver.read(64 * 1024) + driver.read(64 * 1024)
    assert got == entropy_file[: len(got)]
    assert len(got) == 128 * 1024


@pytest.mark.parametrize("interface", ["legacy", "modern"])
def test_used_buffer_interrupt_arrives_on_the_routed_line_and_runs_the_callback(
        machine: StartMachine, tmp_path: Path, entropy_file: bytes, interface: str) -> None:
    prop = INTERFACES[interface][0]
    m = machine("-object", f"rng-random,id=r0,filename={tmp_path / 'entropy'}",
                "-device", f"virtio-rng-pci,rng=r0,{prop}")
    transport = only_transport(m, interface)
    driver = probe(transport, RngDriver)
    assert isinstance(driver, RngDriver)
    assert transport.line is not None
    seen: list[object] = []
    driver.vq.callback = seen.append
    driver.vq.add_buf([], [(driver.buf, 100)], token="first")
    driver.vq.kick()
    assert transport.wait(10.0)
    assert seen == [driver.vq]
    assert driver.vq.get_buf() == ("first", 100)
    # Reading the ISR acknowledged the device: QEMU lowered the line again.
    assert not m.qtest.irq_level(transport.line)
    assert transport.interrupts == 1
    assert m.memory is not None
    assert m.memory.read(driver.buf, 100) == entropy_file[:100]


def test_interrupts_of_one_device_stay_on_its_own_line(machine: StartMachine) -> None:
    m = machine("-device", "virtio-rng-pci,disable-modern=on,addr=2",
                "-device", "virtio-rng-pci,disable-legacy=on,addr=3")
    a, b = m.virtio_transports()
    assert a.line != b.line
    driver_a = probe(a, RngDriver)
    probe(b, RngDriver)
    assert isinstance(driver_a, RngDriver)
    driver_a.vq.add_buf([], [(driver_a.buf, 16)], token="a")
    driver_a.vq.kick()
    assert a.line is not None
    assert m.qtest.wait_irq([a.line], 10.0)
    assert not b.wait(0.2)  # b's line stays low and its ISR reads 0
    assert b.interrupts == 0
    assert a.wait(1.0)
    assert a.interrupts == 1


def test_rng_driver_works_by_polling_the_isr_without_interrupts(
        machine: StartMachine, tmp_path: Path, entropy_file: bytes) -> None:
    m = machine("-object", f"rng-random,id=r0,filename={tmp_path / 'entropy'}",
                "-device", "virtio-rng-pci,rng=r0,disable-modern=on")
    (transport,) = m.virtio_transports(use_interrupts=False)
    driver = probe(transport, RngDriver)
    assert isinstance(driver, RngDriver)
    assert driver.read(16 * 1024) == entropy_file[: 16 * 1024]
    assert m.qtest.irq_events == 0  # nothing intercepted: the ISR was polled


# ---- block -------------------------------------------------------------------------------


@pytest.fixture
def disk_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A 4 MiB raw image whose every sector starts with its own number (host-written)."""
    content = bytearray(4 * 1024 * 1024)
    for sector in range(len(content) // 512):
        content[sector * 512 : sector * 512 + 8] = sector.to_bytes(8, "little")
    path = tmp_path / "disk.img"
    path.write_bytes(content)
    return path, bytes(content)


@pytest.mark.parametrize("ring", sorted(RING_FEATURES))
@pytest.mark.parametrize("interface", ["legacy", "modern"])
def test_blk_driver_reads_and_writes_the_image_file_through_qemu(
        machine: StartMachine, disk_image: tuple[Path, bytes], interface: str,
        ring: str) -> None:
    path, content = disk_image
    prop = INTERFACES[interface][0]
    m = machine("-drive", f"if=none,id=d0,file={path},format=raw",
                "-device",
                f"virtio-blk-pci,drive=d0,serial=pyvirtio-qtest,num-queues=2,{prop}")
    transport = only_transport(m, interface)
    wanted = RING_FEATURES[ring] | BlkDriver.features
    driver = probe(transport, BlkDriver, features=wanted)
    assert isinstance(driver, BlkDriver)
    ring_bits = F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC)
    assert transport.acked_features() & ring_bits == wanted & ring_bits
    assert driver.capacity == len(content) // 512
    assert driver.num_queues == 2  # so queue 1's notify offset is exercised too

    # what the host wrote into the image, QEMU reads back to us
    assert driver.read(100, 16) == content[100 * 512 : 116 * 512]

    # what we write, QEMU writes into the image file
    payload = os.urandom(64 * 1024)
    driver.write(2048, payload)
    driver.flush()
    with open(path, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(payload)) == payload
    assert driver.read(2048, len(payload) // 512) == payload

    # many requests in flight at once (multi-descriptor chains; indirect when negotiated)
    ios = [driver.submit_read(sector, 8) for sector in range(0, 8 * 24, 8)]
    driver.wait(ios)
    assert {io.queue for io in ios} == {0, 1}
    for io in ios:
        assert io.ok
        assert io.data == content[io.sector * 512 : (io.sector + 8) * 512]

    assert driver.get_id() == b"pyvirtio-qtest"


# ---- the packed ring (VIRTIO 1.1) on QEMU's own device models ----------------------------

PACKED = F.bit(F.RING_PACKED)


@pytest.mark.parametrize("ring", sorted(RING_FEATURES))
def test_packed_blk_driver_reads_writes_and_flushes_the_image_file_through_qemu(
        machine: StartMachine, disk_image: tuple[Path, bytes], ring: str) -> None:
    path, content = disk_image
    m = machine("-drive", f"if=none,id=d0,file={path},format=raw",
                "-device", "virtio-blk-pci,drive=d0,serial=pyvirtio-packed,num-queues=2,"
                "disable-legacy=on,packed=on")
    transport = only_transport(m, "modern")
    wanted = RING_FEATURES[ring] | BlkDriver.features | PACKED
    driver = probe(transport, BlkDriver, features=wanted)
    assert isinstance(driver, BlkDriver)
    acked = transport.acked_features()
    assert acked & PACKED  # QEMU offered the packed ring and we run it
    ring_bits = F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC)
    assert acked & ring_bits == wanted & ring_bits
    assert all(type(vq.ring) is PackedDriverQueue for vq in driver.device.vqs)

    assert driver.read(100, 16) == content[100 * 512 : 116 * 512]
    payload = os.urandom(64 * 1024)
    driver.write(2048, payload)
    driver.flush()
    with open(path, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(payload)) == payload
    expected = bytearray(content)
    expected[2048 * 512 : 2048 * 512 + len(payload)] = payload
    # more requests than the rings have slots: each packed ring wraps (wrap counters flip)
    ios = [driver.submit_read(sector, 8) for sector in range(0, 8 * 300, 8)]
    driver.wait(ios)
    assert {io.queue for io in ios} == {0, 1}
    for io in ios:
        assert io.ok
        assert io.data == expected[io.sector * 512 : (io.sector + 8) * 512]
    assert driver.read(2048, len(payload) // 512) == payload
    assert driver.get_id() == b"pyvirtio-packed"


@pytest.mark.parametrize("ring", sorted(RING_FEATURES))
def test_packed_rng_driver_reads_exactly_the_bytes_the_backend_read_from_its_file(
        machine: StartMachine, tmp_path: Path, entropy_file: bytes, ring: str) -> None:
    """QEMU 7.2 writes used lengths without the WRITE flag: the driver must take them."""
    m = machine("-object", f"rng-random,id=r0,filename={tmp_path / 'entropy'}",
                "-device", "virtio-rng-pci,rng=r0,disable-legacy=on,packed=on")
    transport = only_transport(m, "modern")
    driver = probe(transport, RngDriver, features=RING_FEATURES[ring] | PACKED)
    assert isinstance(driver, RngDriver)
    assert transport.acked_features() & PACKED
    assert type(driver.vq.ring) is PackedDriverQueue
    got = b"".join(driver.read(4096) for _ in range(40))  # many laps of an 8-entry ring
    assert got == entropy_file[: 40 * 4096]


# ---- the qtest machine itself -------------------------------------------------------------


def test_guest_ram_is_the_same_bytes_for_qemu_and_for_us(machine: StartMachine) -> None:
    m = machine()
    assert m.memory is not None
    m.memory.write(0x20_0000, b"written through the mmap")
    assert m.qtest.read(0x20_0000, 24) == b"written through the mmap"
    m.qtest.write(0x30_0000, b"written by QEMU")
    assert m.memory.read(0x30_0000, 15) == b"written by QEMU"
    m.qtest.writeq(0x30_0100, 0x1122334455667788)
    assert m.memory.read(0x30_0100, 8) == bytes.fromhex("8877665544332211")


def test_refused_command_raises_and_the_connection_stays_usable(machine: StartMachine) -> None:
    m = machine()
    with pytest.raises(QtestError, match="Unknown command"):
        m.qtest.command("no_such_command 1 2")
    assert m.qtest.broken is None
    m.qtest.outl(0xCF8, 0x8000_0000)
    assert m.qtest.inl(0xCFC) == 0x1237_8086  # the i440FX host bridge


def test_unanswered_command_times_out_and_closes_the_client(machine: StartMachine) -> None:
    m = machine()
    assert m.pid is not None
    os.kill(m.pid, signal.SIGSTOP)
    try:
        with pytest.raises(QtestTimeoutError, match="no answer"):
            m.qtest.command("inl 0xcfc", timeout=0.3)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert m.qtest.broken is not None
    with pytest.raises(QtestError):
        m.qtest.inl(0xCFC)


def _shm_leftovers() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("pyvirtio-qtest-")}


def test_qemu_failing_at_startup_is_reported_with_its_stderr_and_cleaned_up(
        require: Callable[..., None]) -> None:
    require(QEMU)
    before = _shm_leftovers()
    m = QtestMachine(["-device", "no-such-virtio-device"])
    try:
        with pytest.raises(QtestError, match="no-such-virtio-device"):
            m.start()
        assert m.process is not None and m.process.poll() is not None
    finally:
        m.close()
    assert _shm_leftovers() <= before


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_close_stops_qemu_and_leaves_no_files(require: Callable[..., None]) -> None:
    require(QEMU)
    m = QtestMachine(["-device", "virtio-rng-pci"])
    try:
        m.start()
        pid, ram, workdir = m.pid, m.ram_path, m.workdir
        assert pid is not None and ram is not None and workdir is not None
        # Removed as soon as QEMU had them open: nothing can be left behind.
        assert not os.path.exists(ram)
        assert not os.path.exists(workdir)
        assert not _gone(pid)
    finally:
        m.close()
    assert _gone(pid)


def test_qemu_dies_with_the_process_that_started_it(require: Callable[..., None]) -> None:
    require(QEMU)
    script = textwrap.dedent("""
        import time
        from pyvirtio.guest.qtest import QtestMachine
        m = QtestMachine(["-device", "virtio-rng-pci"]).start()
        print(m.pid, flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        assert child.stdout is not None
        qemu_pid = int(child.stdout.readline())
        assert not _gone(qemu_pid)
    finally:
        child.kill()  # no chance to clean up: the parent-death signal must do it
        child.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not _gone(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(qemu_pid)
