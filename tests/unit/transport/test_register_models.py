"""The device-side register models, register by register, against the spec's rules.

Each test drives a model directly (``read``/``write`` of a space, offset and width) the way
a driver would, and states one rule of VIRTIO 1.2 §4.1 (PCI) or §4.2 (MMIO): what a register
returns, what a write does to the device behind it, what is refused and recorded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from pyvirtio.device.console import ConsoleDevice
from pyvirtio.device.rng import RngDevice
from pyvirtio.errors import PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.spec import features as F
from pyvirtio.spec import mmio as M
from pyvirtio.spec import pci as P
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S
from pyvirtio.testing.vmm import VmmBus
from pyvirtio.transport.mmio_device import VirtioMmioDevice
from pyvirtio.transport.pci_bus import ConfigMechanism1, PciAddress, PciFunction
from pyvirtio.transport.pci_device import (
    COMMON_OFFSET,
    DEVICE_OFFSET,
    ISR_OFFSET,
    NOTIFY_OFFSET,
    VirtioPciDevice,
)
from pyvirtio.transport.register_model import MAX_PROBLEMS, NO_VECTOR, RegisterTrace
from pyvirtio.transport.virtio_mmio import VirtioMmio
from pyvirtio.transport.virtio_pci import InterruptRouter

MEMORY = 1 << 20
RING = 0x10000  # where the tests put rings
BAR4 = "bar4"


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.anonymous(MEMORY)
    yield mem
    mem.close()


class Lines:
    """Records the levels and MSI-X vectors a model sends out."""

    def __init__(self, model: VirtioPciDevice | VirtioMmioDevice) -> None:
        self.levels: list[bool] = []
        self.msi: list[int] = []
        model.on_irq = self.levels.append
        model.on_msi = self.msi.append


def common(model: VirtioPciDevice, field: int, size: int, value: int | None = None) -> int:
    if value is None:
        return model.read(BAR4, COMMON_OFFSET + field, size)
    model.write(BAR4, COMMON_OFFSET + field, size, value)
    return 0


def modern_bringup(model: VirtioPciDevice, features: int) -> None:
    common(model, P.VIRTIO_PCI_COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    for word in (0, 1):
        common(model, P.VIRTIO_PCI_COMMON_GFSELECT, 4, word)
        common(model, P.VIRTIO_PCI_COMMON_GF, 4, features >> (32 * word) & 0xFFFF_FFFF)
    common(model, P.VIRTIO_PCI_COMMON_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)


def modern_queue(model: VirtioPciDevice, index: int, size: int, base: int = RING) -> None:
    common(model, P.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
    common(model, P.VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
    for field, addr in ((P.VIRTIO_PCI_COMMON_Q_DESCLO, base),
                        (P.VIRTIO_PCI_COMMON_Q_AVAILLO, base + 0x1000),
                        (P.VIRTIO_PCI_COMMON_Q_USEDLO, base + 0x2000)):
        common(model, field, 4, addr & 0xFFFF_FFFF)
        common(model, field + 4, 4, addr >> 32)
    common(model, P.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)


# ---- PCI configuration space -------------------------------------------------------------


def test_ids_tell_transitional_legacy_and_modern_functions_apart(memory: GuestMemory) -> None:
    def ids(**kw: bool) -> tuple[int, int, int, int]:
        model = VirtioPciDevice(RngDevice(), memory, **kw)
        return (model.read("config", P.PCI_DEVICE_ID, 2), model.read("config", 8, 1),
                model.read("config", P.PCI_SUBSYSTEM_ID, 2), model.read("config", 0, 2))

    assert ids(legacy=True, modern=True) == (0x1005, 0, 4, 0x1AF4)
    assert ids(legacy=True, modern=False) == (0x1005, 0, 4, 0x1AF4)
    assert ids(legacy=False, modern=True) == (0x1044, 1, 4, 0x1AF4)


def test_bars_answer_the_sizing_protocol_and_ignore_read_only_bits(memory: GuestMemory) -> None:
    model = VirtioPciDevice(RngDevice(), memory, msix_vectors=2)
    model.write("config", 0x10, 4, 0xFFFF_FFFF)
    assert model.read("config", 0x10, 4) == 0xFFFF_FFE1  # 32-byte I/O BAR
    model.write("config", 0x14, 4, 0xFFFF_FFFF)
    assert model.read("config", 0x14, 4) == 0xFFFF_F000  # 4 KiB MSI-X BAR
    model.write("config", 0x20, 4, 0xFFFF_FFFF)
    assert model.read("config", 0x20, 4) == 0xFFFF_C00C  # 16 KiB 64-bit prefetchable
    model.write("config", 0x18, 4, 0xFFFF_FFFF)
    assert model.read("config", 0x18, 4) == 0  # unimplemented
    model.write("config", P.PCI_VENDOR_ID, 2, 0x1234)
    assert model.read("config", P.PCI_VENDOR_ID, 2) == 0x1AF4
    assert model.problems == []  # read-only config bits are ordinary PCI, not an error


def test_our_pci_walk_finds_every_virtio_capability_where_the_model_put_it(
        memory: GuestMemory) -> None:
    bus = VmmBus()
    model = VirtioPciDevice(RngDevice(), memory, msix_vectors=3)
    bus.add_pci(3, model)
    func = PciFunction(ConfigMechanism1(bus), PciAddress(0, 3))
    caps = {(c.cfg_type, c.bar, c.offset, c.length, c.notify_off_multiplier)
            for c in func.virtio_capabilities()}
    assert caps == {(P.VIRTIO_PCI_CAP_COMMON_CFG, 4, COMMON_OFFSET, 0x1000, 0),
                    (P.VIRTIO_PCI_CAP_ISR_CFG, 4, ISR_OFFSET, 0x1000, 0),
                    (P.VIRTIO_PCI_CAP_DEVICE_CFG, 4, DEVICE_OFFSET, 0x1000, 0),
                    (P.VIRTIO_PCI_CAP_NOTIFY_CFG, 4, NOTIFY_OFFSET, 0x1000, 4),
                    (P.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0)}
    msix = func.find_capability(P.PCI_CAP_ID_MSIX)
    assert msix is not None and func.read16(msix.offset + 2) & 0x7FF == 2  # table size - 1


def test_the_pci_cfg_window_reaches_the_common_configuration(memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioPciDevice(device, memory)
    cap = model.pci_cfg_cap
    model.write("config", cap + 4, 1, 4)  # BAR4
    model.write("config", cap + 8, 4, COMMON_OFFSET + P.VIRTIO_PCI_COMMON_NUMQ)
    model.write("config", cap + 12, 4, 2)
    assert model.read("config", cap + 16, 4) == device.num_queues
    model.write("config", cap + 8, 4, COMMON_OFFSET + P.VIRTIO_PCI_COMMON_STATUS)
    model.write("config", cap + 12, 4, 1)
    model.write("config", cap + 16, 4, S.ACKNOWLEDGE)
    assert device.status == S.ACKNOWLEDGE


# ---- legacy I/O layout --------------------------------------------------------------------


def test_legacy_queue_pfn_starts_a_contiguous_vring_and_0_stops_it(memory: GuestMemory) -> None:
    device = RngDevice(queue_size=64)
    model = VirtioPciDevice(device, memory, modern=False)
    model.write("bar0", P.VIRTIO_PCI_QUEUE_SEL, 2, 0)
    assert model.read("bar0", P.VIRTIO_PCI_QUEUE_NUM, 2) == 64
    model.write("bar0", P.VIRTIO_PCI_QUEUE_PFN, 4, RING >> 12)
    q = device.queues[0]
    layout = SP.LegacyLayout(64, 4096)
    assert (q.desc, q.avail, q.used, q.size) == (RING, RING + layout.avail,
                                                 RING + layout.used, 64)
    assert model.read("bar0", P.VIRTIO_PCI_QUEUE_PFN, 4) == RING >> 12
    model.write("bar0", P.VIRTIO_PCI_QUEUE_PFN, 4, 0)
    assert q.ring is None and model.read("bar0", P.VIRTIO_PCI_QUEUE_PFN, 4) == 0
    assert model.problems == []


def test_legacy_pfn_outside_memory_is_refused_and_recorded(memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioPciDevice(device, memory, modern=False)
    model.write("bar0", P.VIRTIO_PCI_QUEUE_PFN, 4, MEMORY >> 12)
    assert device.queues[0].ring is None
    assert "queue 0 not enabled" in model.problems[-1]


def test_legacy_isr_is_cleared_by_reading_it_and_lowers_the_line(memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioPciDevice(device, memory, modern=False)
    lines = Lines(model)
    device.notify_queue(0)
    assert lines.levels == [True]
    assert model.read("bar0", P.VIRTIO_PCI_ISR, 1) == P.VIRTIO_PCI_ISR_QUEUE
    assert lines.levels == [True, False]
    assert model.read("bar0", P.VIRTIO_PCI_ISR, 1) == 0


def test_intx_disable_in_the_command_register_holds_the_line_low(
        memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioPciDevice(device, memory, modern=False)
    lines = Lines(model)
    model.write("config", P.PCI_COMMAND, 2, 0x400)
    device.notify_queue(0)
    assert lines.levels == [] and model.isr == P.VIRTIO_PCI_ISR_QUEUE
    model.write("config", P.PCI_COMMAND, 2, 0)
    assert lines.levels == [True]  # pending ISR bit: the line rises once allowed


def test_legacy_msix_moves_the_config_to_24_and_delivers_recorded_vectors(
        memory: GuestMemory) -> None:
    device = ConsoleDevice(cols=80, rows=25)
    model = VirtioPciDevice(device, memory, modern=False, msix_vectors=2)
    lines = Lines(model)
    cols = device.read_config(0, 2)
    assert model.read("bar0", 20, 2) == int.from_bytes(cols, "little")  # config at 20
    control = model.msix_cap + 2
    model.write("config", control, 2, model.read("config", control, 2) | 0x8000)
    assert model.legacy_config_offset() == 24
    assert model.read("bar0", 24, 2) == int.from_bytes(cols, "little")
    model.write("bar0", P.VIRTIO_MSI_CONFIG_VECTOR, 2, 1)
    model.write("bar0", P.VIRTIO_MSI_QUEUE_VECTOR, 2, 0)  # queue 0 (selected) -> vector 0
    model.write("bar0", P.VIRTIO_MSI_QUEUE_VECTOR, 2, 7)  # no such vector
    assert model.read("bar0", P.VIRTIO_MSI_QUEUE_VECTOR, 2) == NO_VECTOR
    assert "vector 7 does not exist" in model.problems[-1]
    model.write("bar0", P.VIRTIO_MSI_QUEUE_VECTOR, 2, 0)
    for vector in (0, 1):  # unmask both table entries
        model.write("bar1", 16 * vector + 12, 4, 0)
    device.notify_queue(0)
    device.notify_config()
    assert lines.msi == [0, 1] and lines.levels == []  # no INTx with MSI-X on


def test_a_masked_msix_vector_is_held_pending_until_unmasked(memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioPciDevice(device, memory, msix_vectors=1)
    lines = Lines(model)
    control = model.msix_cap + 2
    model.write("config", control, 2, 0x8000)
    common(model, P.VIRTIO_PCI_COMMON_Q_MSIX, 2, 0)
    device.notify_queue(0)
    assert lines.msi == [] and model.read("bar1", 0x800, 4) == 1  # entry masked: pending
    model.write("bar1", 12, 4, 0)
    assert lines.msi == [0] and model.read("bar1", 0x800, 4) == 0


def test_legacy_register_of_the_wrong_width_is_refused(memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioPciDevice(device, memory, modern=False)
    model.write("bar0", P.VIRTIO_PCI_STATUS, 2, S.ACKNOWLEDGE)
    assert device.status == 0
    assert "2-byte legacy write at offset 18" in model.problems[-1]
    model.write("bar0", P.VIRTIO_PCI_HOST_FEATURES, 4, 0)
    assert "read-only legacy register" in model.problems[-1]


def test_the_write_only_legacy_notify_register_reads_as_all_ones(memory: GuestMemory) -> None:
    model = VirtioPciDevice(RngDevice(), memory, modern=False)
    assert model.read("bar0", P.VIRTIO_PCI_QUEUE_NOTIFY, 2) == 0xFFFF
    assert model.problems == []


def test_legacy_features_after_driver_ok_are_ignored(memory: GuestMemory) -> None:
    device = RngDevice(transport_features=0)
    model = VirtioPciDevice(device, memory, modern=False)
    model.write("bar0", P.VIRTIO_PCI_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER)
    model.write("bar0", P.VIRTIO_PCI_GUEST_FEATURES, 4, 0)
    model.write("bar0", P.VIRTIO_PCI_STATUS, 1, S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)
    model.write("bar0", P.VIRTIO_PCI_GUEST_FEATURES, 4, 1 << 28)
    assert device.driver_features == 0
    assert "after the features were final" in model.problems[-1]


# ---- modern common configuration -------------------------------------------------------


def test_64_bit_features_go_through_the_select_windows(memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioPciDevice(device, memory, legacy=False)
    words = []
    for word in (0, 1, 2):
        common(model, P.VIRTIO_PCI_COMMON_DFSELECT, 4, word)
        words.append(common(model, P.VIRTIO_PCI_COMMON_DF, 4))
    assert words[0] | words[1] << 32 == device.get_features() and words[2] == 0
    modern_bringup(model, F.bit(F.VERSION_1))
    assert device.driver_features == F.bit(F.VERSION_1)
    assert device.status & S.FEATURES_OK


def test_features_written_after_features_ok_are_ignored_and_recorded(
        memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioPciDevice(device, memory, legacy=False)
    modern_bringup(model, F.bit(F.VERSION_1))
    common(model, P.VIRTIO_PCI_COMMON_GFSELECT, 4, 0)
    common(model, P.VIRTIO_PCI_COMMON_GF, 4, F.bit(F.EVENT_IDX) & 0xFFFF_FFFF)
    assert device.driver_features == F.bit(F.VERSION_1)
    assert "after the features were final" in model.problems[-1]


@pytest.mark.parametrize("size", [0, 3, 100, 512])
def test_queue_of_size_0_or_not_a_power_of_two_or_too_big_is_not_enabled(
        memory: GuestMemory, size: int) -> None:
    device = RngDevice(queue_size=256)
    model = VirtioPciDevice(device, memory, legacy=False)
    modern_bringup(model, F.bit(F.VERSION_1))
    modern_queue(model, 0, size)
    assert common(model, P.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    assert device.queues[0].ring is None
    assert f"queue 0 not enabled: size {size}" in model.problems[-1]


def test_enabled_queue_fields_are_frozen_and_notify_kicks_by_offset(
        memory: GuestMemory) -> None:
    device = RngDevice(queue_size=16)
    model = VirtioPciDevice(device, memory, legacy=False)
    modern_bringup(model, F.bit(F.VERSION_1))
    modern_queue(model, 0, 16)
    assert common(model, P.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 1
    common(model, P.VIRTIO_PCI_COMMON_Q_SIZE, 2, 8)
    assert common(model, P.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 16
    assert "written while the queue is enabled" in model.problems[-1]
    notify_off = common(model, P.VIRTIO_PCI_COMMON_Q_NOFF, 2)
    model.write(BAR4, NOTIFY_OFFSET + 4 * notify_off + 4, 2, 1)  # queue 1: none
    assert "queue 1, which does not exist" in model.problems[-1]


def test_config_generation_follows_device_config_changes(memory: GuestMemory) -> None:
    device = ConsoleDevice(cols=80, rows=25)
    model = VirtioPciDevice(device, memory, legacy=False)
    before = common(model, P.VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    device.update_config(0, struct.pack("<H", 132))
    assert common(model, P.VIRTIO_PCI_COMMON_CFGGENERATION, 1) == (before + 1) & 0xFF
    assert model.read(BAR4, DEVICE_OFFSET, 2) == 132
    assert model.read(BAR4, DEVICE_OFFSET + 0x100, 4) == 0xFFFF_FFFF
    assert "outside the" in model.problems[-1]


def test_reset_returns_every_register_to_its_initial_value(memory: GuestMemory) -> None:
    device = RngDevice(queue_size=16)
    model = VirtioPciDevice(device, memory, legacy=False)
    modern_bringup(model, F.bit(F.VERSION_1))
    modern_queue(model, 0, 8)
    common(model, P.VIRTIO_PCI_COMMON_STATUS, 1, 0)
    assert common(model, P.VIRTIO_PCI_COMMON_STATUS, 1) == 0
    assert common(model, P.VIRTIO_PCI_COMMON_Q_SELECT, 2) == 0
    assert common(model, P.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 16
    assert common(model, P.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    assert common(model, P.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == 0
    assert device.queues[0].ring is None


# ---- virtio-mmio ----------------------------------------------------------------------------


def mmio(model: VirtioMmioDevice, offset: int, value: int | None = None) -> int:
    if value is None:
        return model.read("mmio", offset, 4)
    model.write("mmio", offset, 4, value)
    return 0


def test_mmio_identifies_itself(memory: GuestMemory) -> None:
    for version in (1, 2):
        model = VirtioMmioDevice(RngDevice(), memory, version=version)
        assert [mmio(model, o) for o in (0, 4, 8, 12)] == [
            M.VIRTIO_MMIO_MAGIC, version, 4, 0x1AF4]


def test_mmio_interrupt_status_stays_until_acknowledged(memory: GuestMemory) -> None:
    device = RngDevice()
    model = VirtioMmioDevice(device, memory)
    lines = Lines(model)
    device.notify_queue(0)
    device.notify_config()
    assert mmio(model, M.VIRTIO_MMIO_INTERRUPT_STATUS) == 3
    assert mmio(model, M.VIRTIO_MMIO_INTERRUPT_STATUS) == 3  # reading does not clear
    mmio(model, M.VIRTIO_MMIO_INTERRUPT_ACK, 1)
    assert mmio(model, M.VIRTIO_MMIO_INTERRUPT_STATUS) == 2 and lines.levels == [True]
    mmio(model, M.VIRTIO_MMIO_INTERRUPT_ACK, 2)
    assert lines.levels == [True, False]


def test_mmio_v2_queue_ready_starts_and_stops_the_queue(memory: GuestMemory) -> None:
    device = RngDevice(queue_size=16)
    model = VirtioMmioDevice(device, memory)
    mmio(model, M.VIRTIO_MMIO_QUEUE_SEL, 0)
    assert mmio(model, M.VIRTIO_MMIO_QUEUE_NUM_MAX) == 16
    mmio(model, M.VIRTIO_MMIO_QUEUE_NUM, 8)
    for low, addr in ((M.VIRTIO_MMIO_QUEUE_DESC_LOW, RING),
                      (M.VIRTIO_MMIO_QUEUE_AVAIL_LOW, RING + 0x800),
                      (M.VIRTIO_MMIO_QUEUE_USED_LOW, RING + 0x1000)):
        mmio(model, low, addr)
    mmio(model, M.VIRTIO_MMIO_QUEUE_READY, 1)
    q = device.queues[0]
    assert (q.size, q.desc, q.avail, q.used) == (8, RING, RING + 0x800, RING + 0x1000)
    assert mmio(model, M.VIRTIO_MMIO_QUEUE_READY) == 1
    mmio(model, M.VIRTIO_MMIO_QUEUE_READY, 0)
    assert q.ring is None and model.problems == []


def test_mmio_refuses_narrow_accesses_and_reads_of_write_only_registers(
        memory: GuestMemory) -> None:
    model = VirtioMmioDevice(RngDevice(), memory)
    assert model.read("mmio", M.VIRTIO_MMIO_STATUS, 1) == 0
    assert "aligned 32-bit" in model.problems[-1]
    assert mmio(model, M.VIRTIO_MMIO_QUEUE_NOTIFY) == 0
    assert "a write-only register" in model.problems[-1]
    mmio(model, M.VIRTIO_MMIO_MAGIC_VALUE, 0)
    assert "a read-only register" in model.problems[-1]
    mmio(model, M.VIRTIO_MMIO_QUEUE_PFN, 1)  # a version 1 register
    assert "no register" in model.problems[-1]


def test_mmio_legacy_pfn_needs_the_guest_page_size(memory: GuestMemory) -> None:
    device = RngDevice(queue_size=16)
    model = VirtioMmioDevice(device, memory, version=1)
    mmio(model, M.VIRTIO_MMIO_QUEUE_NUM, 16)
    mmio(model, M.VIRTIO_MMIO_QUEUE_PFN, RING >> 12)
    assert device.queues[0].ring is None and "before the guest page size" in model.problems[-1]
    mmio(model, M.VIRTIO_MMIO_GUEST_PAGE_SIZE, 4096)
    mmio(model, M.VIRTIO_MMIO_QUEUE_PFN, RING >> 12)
    layout = SP.LegacyLayout(16, 4096)
    q = device.queues[0]
    assert (q.desc, q.avail, q.used) == (RING, RING + layout.avail, RING + layout.used)
    assert mmio(model, M.VIRTIO_MMIO_QUEUE_PFN) == RING >> 12


# ---- the driver transport and the trace ---------------------------------------------------


def test_the_mmio_driver_refuses_a_window_without_the_magic(memory: GuestMemory) -> None:
    bus = VmmBus()
    with pytest.raises(PeerError, match="magic 0xffffffff"):
        VirtioMmio(bus, 0xFEB0_0000, memory, Allocator(0x1000, 0x10000),
                   InterruptRouter(bus), 5)


def test_a_trace_records_each_access_with_the_value_read_or_written(
        memory: GuestMemory) -> None:
    model = VirtioMmioDevice(RngDevice(), memory)
    trace = RegisterTrace(model)
    trace.write("mmio", M.VIRTIO_MMIO_STATUS, 4, S.ACKNOWLEDGE)
    trace.read("mmio", M.VIRTIO_MMIO_STATUS, 4)
    assert [str(a) for a in trace.accesses] == ["w mmio+0x70/4 = 0x1", "r mmio+0x70/4 = 0x1"]


def test_a_driver_spamming_bad_accesses_cannot_grow_the_record_without_bound(
        memory: GuestMemory) -> None:
    model = VirtioMmioDevice(RngDevice(), memory)
    for _ in range(MAX_PROBLEMS + 500):
        model.write("mmio", M.VIRTIO_MMIO_MAGIC_VALUE, 4, 0)
    assert len(model.problems) == MAX_PROBLEMS
    assert model.problem_count == MAX_PROBLEMS + 500
