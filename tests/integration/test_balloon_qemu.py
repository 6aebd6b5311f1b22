"""pyvirtio's balloon driver against QEMU 7.2's own virtio-balloon-pci, over qtest.

QEMU is the host: its monitor (QMP, through the QEMU project's ``qemu.qmp`` library) sets
the balloon target with ``balloon``, our driver inflates to it, ``query-balloon`` must show
the matching guest size, and QEMU must have discarded the pages from its shared RAM file
(the file's allocated blocks drop by the inflated amount). Our driver's statistics must show
up in QEMU's ``guest-stats`` property once stats polling is on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from pyvirtio.device.balloon import allocated_bytes
from pyvirtio.driver.balloon import BalloonDriver
from pyvirtio.driver.base import probe
from pyvirtio.guest.qtest import QtestMachine
from pyvirtio.transport.virtio_pci import VirtioPciLegacy, VirtioPciModern

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIB = 1 << 20
RAM = 128 * MIB
INTERFACES = {"legacy": ("disable-modern=on", VirtioPciLegacy),
              "modern": ("disable-legacy=on", VirtioPciModern)}


class BalloonMachine:
    """QEMU under qtest with a virtio-balloon-pci and a QMP socket."""

    def __init__(self, tmp: Path, interface: str) -> None:
        prop, self.transport_class = INTERFACES[interface]
        self.qmp_path = str(tmp / "qmp.sock")
        self.machine = QtestMachine(
            ["-device", f"virtio-balloon-pci,id=balloon0,addr=2,{prop}",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off"], memory_size=RAM)
        self.qmp: QEMUMonitorProtocol | None = None

    def start(self) -> BalloonMachine:
        self.machine.start()
        self.qmp = QEMUMonitorProtocol(self.qmp_path)
        self.qmp.connect()
        return self

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a QMP command; its return value (a QMP error raises)."""
        assert self.qmp is not None
        return self.qmp.cmd(name, **args)

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        self.machine.close()


@pytest.fixture
def qemu_balloon(require: Callable[..., None], tmp_path: Path
                 ) -> Iterator[Callable[[str], BalloonMachine]]:
    require("qemu-system-x86_64")
    started: list[BalloonMachine] = []

    def start(interface: str) -> BalloonMachine:
        m = BalloonMachine(tmp_path, interface)
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.close()


def probe_balloon(m: BalloonMachine) -> BalloonDriver:
    (transport,) = m.machine.virtio_transports()
    assert type(transport) is m.transport_class
    driver = probe(transport, BalloonDriver)
    assert isinstance(driver, BalloonDriver)
    return driver


def touch_all(m: BalloonMachine) -> None:
    """Write every page our allocator can hand out, so discards show in the file."""
    alloc = m.machine.allocator
    memory = m.machine.memory
    assert alloc is not None and memory is not None
    chunk = b"\x5a" * MIB
    for off in range(alloc.base, alloc.base + alloc.size, MIB):
        memory.write(off, chunk[: min(MIB, alloc.base + alloc.size - off)])


@pytest.mark.parametrize("interface", INTERFACES)
def test_qemu_sets_the_target_our_driver_inflates_and_qemu_discards_the_pages(
        qemu_balloon: Callable[[str], BalloonMachine], interface: str) -> None:
    m = qemu_balloon(interface)
    touch_all(m)  # before the driver puts its rings there
    driver = probe_balloon(m)
    memory = m.machine.memory
    assert memory is not None
    before = allocated_bytes(memory)
    assert before >= RAM - 2 * MIB

    m.cmd("balloon", value=RAM - 48 * MIB)  # the guest should keep RAM - 48 MiB
    driver.run_until(lambda: driver.actual_pages == 48 * MIB // 4096, timeout=30)
    assert len(driver.pages) == 48 * MIB // 4096
    assert m.cmd("query-balloon")["actual"] == RAM - 48 * MIB
    dropped = before - allocated_bytes(memory)
    print(f"{interface}: QEMU discarded {dropped / MIB:.1f} MiB of its RAM file for a "
          "48 MiB balloon")
    assert abs(dropped - 48 * MIB) <= 48 * MIB // 10
    for gpa in driver.pages[::101]:
        assert memory.read(gpa, 4096) == bytes(4096)  # QEMU punched them: zeros now

    m.cmd("balloon", value=RAM)  # give it all back
    driver.run_until(lambda: driver.actual_pages == 0, timeout=30)
    assert m.cmd("query-balloon")["actual"] == RAM
    assert driver.pages == []


@pytest.mark.parametrize("interface", INTERFACES)
def test_our_stats_appear_in_qemus_guest_stats(
        qemu_balloon: Callable[[str], BalloonMachine], interface: str) -> None:
    m = qemu_balloon(interface)
    driver = probe_balloon(m)
    driver.extra_stats = {0: 11, 1: 22, 2: 33}  # swap in, swap out, major faults
    m.cmd("qom-set", path="/machine/peripheral/balloon0",
          property="guest-stats-polling-interval", value=1)
    driver.run_until(lambda: driver.stats_answered >= 2, timeout=20)
    reply = m.cmd("qom-get", path="/machine/peripheral/balloon0", property="guest-stats")
    stats = reply["stats"]
    alloc = m.machine.allocator
    assert alloc is not None
    assert stats["stat-total-memory"] == alloc.size
    assert stats["stat-free-memory"] == alloc.free_bytes
    assert stats["stat-available-memory"] == alloc.free_bytes
    assert (stats["stat-swap-in"], stats["stat-swap-out"], stats["stat-major-faults"]) \
        == (11, 22, 33)
    assert reply["last-update"] > 0
    assert os.path.exists(m.qmp_path)
