"""The sans-I/O PCI pieces against a small in-memory PCI bus.

The fake bus decodes configuration mechanism #1 (ports 0xcf8/0xcfc) like a host bridge and
gives each function a 256-byte config space whose BARs answer the sizing protocol (writes are
masked to the BAR's size) and whose capability list is built byte by byte. The acceptance of
this code is the integration test against QEMU (tests/integration/test_qtest_drivers.py);
these tests pin down the parsing and firmware rules, including malformed config spaces.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Collection
from dataclasses import dataclass, field

import pytest

from pyvirtio.errors import LocalError, PeerError
from pyvirtio.spec import ids
from pyvirtio.spec import pci as P
from pyvirtio.transport.pci_bus import (
    PIIX3_ADDRESS,
    PIIX3_PIRQRC,
    AddressWindow,
    ConfigMechanism1,
    PcFirmware,
    PciAddress,
    PciFunction,
    Window,
    bar_window,
    piix_pirq,
    scan_bus,
)
from pyvirtio.transport.virtio_pci import InterruptRouter, identify, select_virtio_caps

# ---- the fake bus ------------------------------------------------------------------------


@dataclass
class FakeBar:
    size: int
    io: bool = False
    is_64: bool = False
    prefetch: bool = False

    def flags(self) -> int:
        if self.io:
            return P.PCI_BASE_ADDRESS_SPACE_IO
        return (P.PCI_BASE_ADDRESS_MEM_TYPE_64 if self.is_64 else 0) | (8 if self.prefetch
                                                                        else 0)


@dataclass
class FakeFunction:
    """One function's config space with BAR write masks."""

    vendor: int
    device: int
    subsystem_vendor: int = 0x1AF4
    subsystem: int = 0
    pin: int = 1
    multifunction: bool = False
    bars: dict[int, FakeBar] = field(default_factory=dict)
    space: bytearray = field(default_factory=lambda: bytearray(256))
    accesses: int = 0

    def __post_init__(self) -> None:
        s = self.space
        struct.pack_into("<HH", s, 0, self.vendor, self.device)
        s[P.PCI_HEADER_TYPE] = 0x80 if self.multifunction else 0
        struct.pack_into("<HH", s, P.PCI_SUBSYSTEM_VENDOR_ID_OFF, self.subsystem_vendor,
                         self.subsystem)
        s[P.PCI_INTERRUPT_PIN] = self.pin
        s[P.PCI_INTERRUPT_LINE] = 0
        for index, bar in self.bars.items():
            struct.pack_into("<I", s, 0x10 + 4 * index, bar.flags())

    def add_caps(self, caps: list[tuple[int, bytes]], first: int = 0x40) -> None:
        """Lay out capabilities ``(cap_id, body after id/next)`` back to back from
        ``first`` (4-byte aligned) and link them."""
        s = self.space
        struct.pack_into("<H", s, P.PCI_STATUS, P.PCI_STATUS_CAP_LIST)
        s[P.PCI_CAPABILITY_LIST] = first
        offset = first
        for i, (cap_id, body) in enumerate(caps):
            nxt = (offset + 2 + len(body) + 3) & ~3 if i + 1 < len(caps) else 0
            s[offset] = cap_id
            s[offset + 1] = nxt
            s[offset + 2 : offset + 2 + len(body)] = body
            offset = nxt

    def read(self, offset: int, size: int) -> int:
        self.accesses += 1
        return int.from_bytes(self.space[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        data = bytearray(value.to_bytes(size, "little"))
        for i in range(size):
            self._write_byte(offset + i, data[i])

    def _write_byte(self, offset: int, byte: int) -> None:
        if 0x10 <= offset < 0x28:
            index, lane = divmod(offset - 0x10, 4)
            reg = bytearray(self.space[0x10 + 4 * index : 0x14 + 4 * index])
            reg[lane] = byte
            value = int.from_bytes(reg, "little")
            value = self._bar_mask(index, value)
            self.space[0x10 + 4 * index : 0x14 + 4 * index] = value.to_bytes(4, "little")
            return
        if offset in (0, 1, 2, 3, P.PCI_HEADER_TYPE, P.PCI_INTERRUPT_PIN,
                      P.PCI_SUBSYSTEM_VENDOR_ID_OFF, P.PCI_SUBSYSTEM_ID):
            return  # read-only
        self.space[offset] = byte

    def _bar_mask(self, index: int, value: int) -> int:
        bar = self.bars.get(index)
        if bar is None:
            high = self.bars.get(index - 1)
            if high is not None and high.is_64:
                # upper half of a 64-bit BAR: bits below the size are hard-wired to zero
                return value & ~((high.size >> 32) - 1) & 0xFFFFFFFF if high.size >> 32 \
                    else value
            return 0  # unimplemented BAR reads as zero
        if bar.io:
            return (value & ~(bar.size - 1) & 0xFFFF) | bar.flags()
        return (value & ~(bar.size - 1) & 0xFFFFFFF0 & 0xFFFFFFFF) | bar.flags()


class FakeBus:
    """A host bridge with ports 0xcf8/0xcfc decoding to the functions on bus 0."""

    def __init__(self, functions: dict[PciAddress, FakeFunction]) -> None:
        self.functions = functions
        self.address = 0
        self.mmio: dict[int, int] = {}
        self.io_ports: dict[int, int] = {}

    def _selected(self) -> tuple[FakeFunction | None, int]:
        if not self.address & 0x8000_0000:
            return None, 0
        bus = (self.address >> 16) & 0xFF
        devfn = (self.address >> 8) & 0xFF
        addr = PciAddress(bus, devfn >> 3, devfn & 7)
        return self.functions.get(addr), self.address & 0xFC

    def io_read(self, port: int, size: int) -> int:
        if port == 0xCF8 and size == 4:
            return self.address
        if 0xCFC <= port < 0xD00:
            func, reg = self._selected()
            if func is None:
                return (1 << (8 * size)) - 1
            return func.read(reg + (port - 0xCFC), size)
        return self.io_ports.get(port, 0)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == 0xCF8 and size == 4:
            self.address = value
            return
        if 0xCFC <= port < 0xD00:
            func, reg = self._selected()
            if func is not None:
                func.write(reg + (port - 0xCFC), size, value)
            return
        self.io_ports[port] = value

    def mmio_read(self, addr: int, size: int) -> int:
        return self.mmio.get(addr, 0)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.mmio[addr] = value


def virtio_cap(cfg_type: int, bar: int, offset: int, length: int,
               multiplier: int | None = None) -> tuple[int, bytes]:
    """A virtio vendor capability body (after cap_vndr and cap_next)."""
    cap_len = P.VIRTIO_PCI_CAP_SIZE if multiplier is None else P.VIRTIO_PCI_NOTIFY_CAP_SIZE
    body = struct.pack("<BBBB2xII", cap_len, cfg_type, bar, 0, offset, length)
    if multiplier is not None:
        body += struct.pack("<I", multiplier)
    return P.PCI_CAP_ID_VNDR, body


def modern_rng(slot: int = 3) -> tuple[PciAddress, FakeFunction]:
    func = FakeFunction(0x1AF4, P.modern_device_id(ids.RNG), subsystem=0x1100,
                        bars={1: FakeBar(0x1000), 4: FakeBar(0x4000, is_64=True,
                                                              prefetch=True)})
    func.add_caps([
        (P.PCI_CAP_ID_MSIX, bytes(10)),
        virtio_cap(P.VIRTIO_PCI_CAP_COMMON_CFG, 4, 0x0, 0x1000),
        virtio_cap(P.VIRTIO_PCI_CAP_ISR_CFG, 4, 0x1000, 0x1000),
        virtio_cap(P.VIRTIO_PCI_CAP_DEVICE_CFG, 4, 0x2000, 0x1000),
        virtio_cap(P.VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 0x1000, multiplier=4),
        virtio_cap(P.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0),
    ], first=0x98)
    return PciAddress(0, slot), func


def legacy_blk(slot: int = 2) -> tuple[PciAddress, FakeFunction]:
    func = FakeFunction(0x1AF4, P.LEGACY_DEVICE_IDS[ids.BLOCK], subsystem=ids.BLOCK,
                        bars={0: FakeBar(0x80, io=True), 1: FakeBar(0x1000)})
    func.add_caps([(P.PCI_CAP_ID_MSIX, bytes(10))])
    return PciAddress(0, slot), func


def piix3() -> tuple[PciAddress, FakeFunction]:
    func = FakeFunction(0x8086, 0x7000, pin=0, multifunction=True)
    for i in range(4):
        func.space[PIIX3_PIRQRC + i] = 0x80
    return PIIX3_ADDRESS, func


def make_bus(*entries: tuple[PciAddress, FakeFunction]) -> tuple[FakeBus, ConfigMechanism1]:
    bus = FakeBus(dict(entries))
    return bus, ConfigMechanism1(bus)


# ---- configuration mechanism #1 ----------------------------------------------------------


def test_mechanism1_selects_function_and_dword_then_uses_the_byte_lane() -> None:
    addr, func = legacy_blk(slot=5)
    bus, config = make_bus((addr, func))
    assert config.read(addr, P.PCI_INTERRUPT_PIN, 1) == 1
    assert bus.address == 0x8000_0000 | (5 << 11) | 0x3C
    assert config.read(addr, P.PCI_SUBSYSTEM_ID, 2) == ids.BLOCK
    config.write(addr, P.PCI_INTERRUPT_LINE, 1, 11)
    assert func.space[P.PCI_INTERRUPT_LINE] == 11
    assert func.space[P.PCI_INTERRUPT_PIN] == 1  # the neighbouring byte is untouched


def test_mechanism1_refuses_unaligned_or_oversized_accesses() -> None:
    addr, func = legacy_blk()
    _, config = make_bus((addr, func))
    with pytest.raises(LocalError):
        config.read(addr, 0x3D, 2)
    with pytest.raises(LocalError):
        config.read(addr, 0x100, 1)
    with pytest.raises(LocalError):
        config.read(addr, 0, 8)


def test_scan_finds_present_functions_and_multifunction_siblings() -> None:
    piix_addr, piix = piix3()
    ide = FakeFunction(0x8086, 0x7010, pin=0)
    blk_addr, blk = legacy_blk(slot=2)
    _, config = make_bus((piix_addr, piix), (PciAddress(0, 1, 1), ide), (blk_addr, blk),
                         (PciAddress(0, 2, 3), FakeFunction(0x1AF4, 0x1005)))
    found = [f.address for f in scan_bus(config)]
    # 00:02.3 is invisible: 00:02.0 is not multifunction.
    assert found == [piix_addr, PciAddress(0, 1, 1), blk_addr]


# ---- capabilities -------------------------------------------------------------------------


def test_capability_walk_follows_the_list_in_order() -> None:
    addr, func = modern_rng()
    _, config = make_bus((addr, func))
    caps = PciFunction(config, addr).capabilities()
    assert [c.cap_id for c in caps] == [P.PCI_CAP_ID_MSIX] + [P.PCI_CAP_ID_VNDR] * 5
    assert caps[0].offset == 0x98
    assert caps[-1].next == 0


def test_virtio_capabilities_are_parsed_with_bar_offset_length_and_multiplier() -> None:
    addr, func = modern_rng()
    _, config = make_bus((addr, func))
    pf = PciFunction(config, addr)
    caps = pf.virtio_capabilities()
    by_type = {c.cfg_type: c for c in caps}
    assert set(by_type) == {1, 2, 3, 4, 5}
    notify = by_type[P.VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert (notify.bar, notify.offset, notify.length, notify.notify_off_multiplier) == (
        4, 0x3000, 0x1000, 4)
    assert by_type[P.VIRTIO_PCI_CAP_DEVICE_CFG].offset == 0x2000


def test_select_virtio_caps_takes_the_first_usable_cap_of_each_type() -> None:
    addr, func = modern_rng()
    # Prepend a common cfg naming BAR 2 (unimplemented) and append a second common cfg.
    func.add_caps([
        virtio_cap(P.VIRTIO_PCI_CAP_COMMON_CFG, 2, 0x0, 0x1000),
        virtio_cap(P.VIRTIO_PCI_CAP_COMMON_CFG, 4, 0x100, 0x100),
        virtio_cap(P.VIRTIO_PCI_CAP_COMMON_CFG, 4, 0x800, 0x100),
        virtio_cap(P.VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 0x1000, multiplier=2),
        virtio_cap(P.VIRTIO_PCI_CAP_ISR_CFG, 4, 0x1000, 0x10),
    ])
    _, config = make_bus((addr, func))
    pf = PciFunction(config, addr)
    pf.probe_bars()
    chosen = select_virtio_caps(pf)
    assert chosen[P.VIRTIO_PCI_CAP_COMMON_CFG].offset == 0x100
    assert chosen[P.VIRTIO_PCI_CAP_NOTIFY_CFG].notify_off_multiplier == 2


def test_capability_loop_is_a_peer_error_naming_the_function() -> None:
    addr, func = modern_rng()
    func.space[0x98 + 1] = 0x98  # the first capability points at itself
    _, config = make_bus((addr, func))
    with pytest.raises(PeerError, match=r"00:03\.0.*loops at 0x98"):
        PciFunction(config, addr).capabilities()


def test_capability_pointer_into_the_header_is_a_peer_error() -> None:
    addr, func = modern_rng()
    func.space[P.PCI_CAPABILITY_LIST] = 0x10
    _, config = make_bus((addr, func))
    with pytest.raises(PeerError, match="capability pointer 0x10"):
        PciFunction(config, addr).capabilities()


def test_short_notify_capability_is_a_peer_error() -> None:
    func = FakeFunction(0x1AF4, 0x1044)
    func.add_caps([virtio_cap(P.VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0, 0x100)])  # 16 bytes only
    where = PciAddress(0, 4)
    _, config = make_bus((where, func))
    with pytest.raises(PeerError, match="notify capability"):
        PciFunction(config, where).virtio_capabilities()


def test_no_cap_list_status_bit_means_no_capabilities() -> None:
    func = FakeFunction(0x1AF4, 0x1000, subsystem=1)
    func.space[P.PCI_CAPABILITY_LIST] = 0x40  # ignored: status bit clear
    where = PciAddress(0, 6)
    _, config = make_bus((where, func))
    assert PciFunction(config, where).capabilities() == []


# ---- BARs -----------------------------------------------------------------------------------


def test_probe_bars_sizes_io_mem32_and_mem64_and_restores_state() -> None:
    func = FakeFunction(0x1AF4, 0x1001, subsystem=2, bars={
        0: FakeBar(0x40, io=True), 1: FakeBar(0x1000), 2: FakeBar(0x4000, is_64=True,
                                                                prefetch=True)})
    func.space[P.PCI_COMMAND] = P.PCI_COMMAND_IO | P.PCI_COMMAND_MASTER
    where = PciAddress(0, 2)
    _, config = make_bus((where, func))
    pf = PciFunction(config, where)
    bars = pf.probe_bars()
    assert [(b.index, b.kind, b.size, b.prefetchable) for b in bars] == [
        (0, "io", 0x40, False), (1, "mem32", 0x1000, False), (2, "mem64", 0x4000, True)]
    assert 4 not in pf.bars  # BAR3 is the upper half of BAR2, BAR4/5 unimplemented
    assert pf.command == P.PCI_COMMAND_IO | P.PCI_COMMAND_MASTER
    assert pf.read32(0x10) == P.PCI_BASE_ADDRESS_SPACE_IO  # original value back


def test_set_bar_writes_both_halves_of_a_64_bit_bar_and_checks_alignment() -> None:
    func = FakeFunction(0x1AF4, 0x1041, bars={4: FakeBar(0x4000, is_64=True)})
    where = PciAddress(0, 2)
    _, config = make_bus((where, func))
    pf = PciFunction(config, where)
    (bar,) = pf.probe_bars()
    pf.set_bar(bar, 0xE000_4000)
    assert pf.read32(0x20) & ~0xF == 0xE000_4000
    assert pf.read32(0x24) == 0
    with pytest.raises(LocalError, match="not aligned"):
        pf.set_bar(bar, 0xE000_1000)


# ---- firmware --------------------------------------------------------------------------------


def test_piix_swizzle_rotates_pins_by_slot() -> None:
    assert [piix_pirq(1, pin) for pin in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert [piix_pirq(slot, 1) for slot in (2, 3, 4, 5, 6)] == [1, 2, 3, 0, 1]
    with pytest.raises(LocalError):
        piix_pirq(2, 0)


def test_firmware_assigns_aligned_bars_routes_pirqs_and_enables_the_function() -> None:
    piix_addr, piix = piix3()
    blk_addr, blk = legacy_blk(slot=2)
    rng_addr, rng = modern_rng(slot=3)
    _, config = make_bus((piix_addr, piix), (blk_addr, blk), (rng_addr, rng))
    firmware = PcFirmware()
    funcs = {}
    for addr in (blk_addr, rng_addr):
        pf = PciFunction(config, addr)
        firmware.setup(pf)
        funcs[addr] = pf
    assert bytes(piix.space[PIIX3_PIRQRC : PIIX3_PIRQRC + 4]) == bytes(firmware.pirq_irqs)
    blk_pf, rng_pf = funcs[blk_addr], funcs[rng_addr]
    assert blk_pf.bar(0).address == 0xC000
    for pf in (blk_pf, rng_pf):
        for bar in pf.bars.values():
            assert bar.address % bar.size == 0
            if not bar.io:
                assert 0xE000_0000 <= bar.address < 0xFEC0_0000
        assert pf.command & 7 == 7  # I/O, memory, bus master
    # slot 2 INTA -> PIRQB -> second route, slot 3 INTA -> PIRQC -> third route
    assert blk_pf.interrupt_line == firmware.pirq_irqs[1]
    assert rng_pf.interrupt_line == firmware.pirq_irqs[2]
    # no two BARs overlap
    spans = sorted((b.io, b.address, b.address + b.size)
                   for pf in (blk_pf, rng_pf) for b in pf.bars.values())
    for (io1, _, end1), (io2, start2, _) in itertools.pairwise(spans):
        assert io1 != io2 or end1 <= start2


def test_firmware_refuses_a_board_without_piix3() -> None:
    blk_addr, blk = legacy_blk()
    _, config = make_bus((blk_addr, blk))
    with pytest.raises(LocalError, match="PIIX3"):
        PcFirmware().setup(PciFunction(config, blk_addr))


def test_address_window_runs_out_with_a_local_error() -> None:
    window = AddressWindow(0x1000, 0x3000)
    assert window.alloc(0x1000, 0x1000) == 0x1000
    assert window.alloc(0x10, 0x1000) == 0x2000
    with pytest.raises(LocalError, match="no room"):
        window.alloc(0x1000, 0x1000)


# ---- identification and windows ------------------------------------------------------------


def test_identify_tells_transitional_from_modern_devices() -> None:
    blk_addr, blk = legacy_blk()
    rng_addr, rng = modern_rng()
    other = FakeFunction(0x1AF4, 0x0001)  # a Red Hat PCI device that is not virtio
    _, config = make_bus((blk_addr, blk), (rng_addr, rng), (PciAddress(0, 7), other))
    legacy = identify(PciFunction(config, blk_addr))
    modern = identify(PciFunction(config, rng_addr))
    assert legacy is not None and modern is not None
    assert (legacy.virtio_id, legacy.legacy_interface, legacy.modern_interface) == (
        ids.BLOCK, True, False)
    assert (modern.virtio_id, modern.legacy_interface, modern.modern_interface) == (
        ids.RNG, False, True)
    assert identify(PciFunction(config, PciAddress(0, 7))) is None


def test_window_bounds_and_widest_aligned_accesses() -> None:
    bus = FakeBus({})
    window = Window(bus, io=True, base=0xC000, length=0x20, name="legacy")
    window.write_bytes(0x13, b"\x01\x02\x03\x04\x05")
    # byte at 0x13, then a dword at 0x14
    assert bus.io_ports == {0xC013: 0x01, 0xC014: 0x05040302}
    with pytest.raises(LocalError, match="outside"):
        window.read(0x1E, 4)


def test_bar_window_outside_the_bar_is_a_peer_error() -> None:
    addr, func = modern_rng()
    bus, config = make_bus((addr, func))
    pf = PciFunction(config, addr)
    pf.probe_bars()
    pf.set_bar(pf.bar(4), 0xE000_0000)
    with pytest.raises(PeerError, match="outside the BAR"):
        bar_window(bus, pf, 4, 0x3000, 0x2000, "notification area")


# ---- interrupt routing -----------------------------------------------------------------------


class FakeLines:
    """Level-triggered lines whose levels the test sets."""

    def __init__(self) -> None:
        self.levels: dict[int, bool] = {}
        self.waits = 0

    def irq_level(self, line: int) -> bool:
        return self.levels.get(line, False)

    def wait_irq(self, lines: Collection[int], timeout: float) -> bool:
        self.waits += 1
        return any(self.levels.get(n, False) for n in lines)


def test_router_runs_every_handler_sharing_the_asserted_line() -> None:
    lines = FakeLines()
    router = InterruptRouter(lines)
    calls: list[str] = []

    def quiet() -> bool:
        calls.append("quiet")
        return False

    def busy() -> bool:
        calls.append("busy")
        lines.levels[11] = False  # acknowledging lowers the line
        return True

    router.register(11, quiet)
    router.register(11, busy)

    def other() -> bool:
        calls.append("other")
        return True

    router.register(10, other)
    lines.levels[11] = True
    assert router.wait(11, timeout=1.0)
    assert calls == ["quiet", "busy"]


def test_router_times_out_when_the_line_stays_low() -> None:
    lines = FakeLines()
    router = InterruptRouter(lines)
    router.register(11, lambda: True)
    assert not router.wait(11, timeout=0.0)


def test_router_without_lines_polls_handlers() -> None:
    router = InterruptRouter(None)
    answers = iter([False, False, True])
    router.register(11, lambda: next(answers))
    assert router.wait(11, timeout=5.0)
