"""PCI bus and PC firmware, sans I/O: config space, BARs, capabilities, firmware duties.

Everything here talks to hardware through two small interfaces, so the same code runs over
QEMU's qtest (:class:`pyvirtio.io.qtest.QtestClient`), an in-memory fake in unit tests, or any
other bus that can do port and memory accesses:

* :class:`HostBus`: ``io_read/io_write(port, size[, value])`` and
  ``mmio_read/mmio_write(addr, size[, value])``;
* :class:`ConfigSpace`: ``read/write(address, offset, size[, value])`` of a function's
  configuration space, e.g. :class:`ConfigMechanism1` (ports 0xcf8/0xcfc) over a HostBus.

When no firmware has run (QEMU under qtest with a BIOS that only halts), no BAR has an
address, decoding and bus mastering are off, and the chipset routes no PCI interrupt.
:class:`PcFirmware` does what SeaBIOS would do for the functions we drive on ``-M pc``
(i440FX + PIIX3): size and assign BARs, enable I/O, memory and bus mastering, and route INTx
pins to ISA IRQs (GSIs), writing the chosen line into the Interrupt Line register as PC
firmware does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from pyvirtio.errors import LocalError, PeerError
from pyvirtio.spec import pci as P

# ---- the two bus interfaces -----------------------------------------------------------------


class PortIo(Protocol):
    """x86 port I/O, 1/2/4-byte accesses."""

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


class Mmio(Protocol):
    """Physical memory accesses that reach devices (1/2/4/8 bytes)."""

    def mmio_read(self, addr: int, size: int) -> int: ...

    def mmio_write(self, addr: int, size: int, value: int) -> None: ...


class HostBus(PortIo, Mmio, Protocol):
    """A host bridge: port I/O and memory accesses."""


@dataclass(frozen=True, order=True)
class PciAddress:
    """Bus/device/function of one PCI function."""

    bus: int
    device: int
    function: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.bus < 256 and 0 <= self.device < 32 and 0 <= self.function < 8):
            raise LocalError(f"invalid PCI address {self.bus}:{self.device}.{self.function}")

    @property
    def devfn(self) -> int:
        return self.device << 3 | self.function

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function}"


class ConfigSpace(Protocol):
    """Configuration space access (256 bytes per function here; no extended space)."""

    def read(self, address: PciAddress, offset: int, size: int) -> int: ...

    def write(self, address: PciAddress, offset: int, size: int, value: int) -> None: ...


CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_SPACE_SIZE = 256


def _check_access(offset: int, size: int, limit: int = CONFIG_SPACE_SIZE) -> None:
    if size not in (1, 2, 4) or offset < 0 or offset + size > limit or offset % size:
        raise LocalError(f"bad config space access: {size} bytes at 0x{offset:x}")


class ConfigMechanism1:
    """PCI configuration mechanism #1: write the enable bit, bus, devfn and dword offset to
    port 0xCF8, then access the selected dword (or a byte/word of it) at 0xCFC-0xCFF."""

    def __init__(self, io: PortIo) -> None:
        self.io = io

    @staticmethod
    def config_address(address: PciAddress, offset: int) -> int:
        return 0x8000_0000 | address.bus << 16 | address.devfn << 8 | (offset & 0xFC)

    def read(self, address: PciAddress, offset: int, size: int) -> int:
        _check_access(offset, size)
        self.io.io_write(CONFIG_ADDRESS_PORT, 4, self.config_address(address, offset))
        return self.io.io_read(CONFIG_DATA_PORT + (offset & 3), size)

    def write(self, address: PciAddress, offset: int, size: int, value: int) -> None:
        _check_access(offset, size)
        self.io.io_write(CONFIG_ADDRESS_PORT, 4, self.config_address(address, offset))
        self.io.io_write(CONFIG_DATA_PORT + (offset & 3), size, value)


# ---- functions, capabilities, BARs -----------------------------------------------------------


@dataclass(frozen=True)
class Capability:
    """One entry of the standard capability list."""

    offset: int
    cap_id: int
    next: int


@dataclass
class Bar:
    """A base address register as sized by :meth:`PciFunction.probe_bars`.

    ``index`` is the BAR number (0-5); a 64-bit BAR also uses ``index + 1``. ``address`` is
    what is programmed now (0: unassigned).
    """

    index: int
    io: bool
    size: int
    is_64: bool = False
    prefetchable: bool = False
    address: int = 0

    @property
    def kind(self) -> str:
        if self.io:
            return "io"
        return "mem64" if self.is_64 else "mem32"


@dataclass(frozen=True)
class VirtioPciCap:
    """A virtio vendor capability (``struct virtio_pci_cap``, §4.1.4): where in which BAR one
    configuration structure lives. ``notify_off_multiplier`` only for the notify cap."""

    cap_offset: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    notify_off_multiplier: int = 0


#: the longest capability list a 256-byte config space can hold (48 dwords after 0x40)
MAX_CAPABILITIES = 48


class PciFunction:
    """One function's configuration space, with the header fields and walks a driver or a
    firmware needs. Malformed device data (capability loops, pointers into the header,
    impossible BARs) raise :class:`PeerError` naming the function and offset."""

    def __init__(self, config: ConfigSpace, address: PciAddress) -> None:
        self.config = config
        self.address = address
        self.bars: dict[int, Bar] = {}

    def __repr__(self) -> str:
        return f"PciFunction({self.address})"

    # raw access
    def read8(self, offset: int) -> int:
        return self.config.read(self.address, offset, 1) & 0xFF

    def read16(self, offset: int) -> int:
        return self.config.read(self.address, offset, 2) & 0xFFFF

    def read32(self, offset: int) -> int:
        return self.config.read(self.address, offset, 4) & 0xFFFF_FFFF

    def write8(self, offset: int, value: int) -> None:
        self.config.write(self.address, offset, 1, value & 0xFF)

    def write16(self, offset: int, value: int) -> None:
        self.config.write(self.address, offset, 2, value & 0xFFFF)

    def write32(self, offset: int, value: int) -> None:
        self.config.write(self.address, offset, 4, value & 0xFFFF_FFFF)

    def read_bytes(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``, read as aligned dwords."""
        start = offset & ~3
        end = offset + length
        out = bytearray()
        for off in range(start, end, 4):
            out += self.read32(off).to_bytes(4, "little")
        return bytes(out[offset - start : offset - start + length])

    # header fields
    @property
    def vendor_id(self) -> int:
        return self.read16(P.PCI_VENDOR_ID)

    @property
    def device_id(self) -> int:
        return self.read16(P.PCI_DEVICE_ID)

    @property
    def present(self) -> bool:
        return self.vendor_id not in (0xFFFF, 0x0000)

    @property
    def revision(self) -> int:
        return self.read8(P.PCI_REVISION_ID)

    @property
    def class_code(self) -> int:
        """Base class, subclass, programming interface as one 24-bit number."""
        return self.read32(P.PCI_CLASS_REVISION) >> 8

    @property
    def header_type(self) -> int:
        return self.read8(P.PCI_HEADER_TYPE) & 0x7F

    @property
    def multifunction(self) -> bool:
        return bool(self.read8(P.PCI_HEADER_TYPE) & 0x80)

    @property
    def subsystem_vendor_id(self) -> int:
        return self.read16(P.PCI_SUBSYSTEM_VENDOR_ID_OFF)

    @property
    def subsystem_id(self) -> int:
        return self.read16(P.PCI_SUBSYSTEM_ID)

    @property
    def command(self) -> int:
        return self.read16(P.PCI_COMMAND)

    @command.setter
    def command(self, value: int) -> None:
        self.write16(P.PCI_COMMAND, value)

    def enable(self, io: bool = True, memory: bool = True, master: bool = True) -> None:
        """Turn on I/O and memory decoding and bus mastering (DMA), as firmware does."""
        bits = ((P.PCI_COMMAND_IO if io else 0) | (P.PCI_COMMAND_MEMORY if memory else 0)
                | (P.PCI_COMMAND_MASTER if master else 0))
        self.command = self.command | bits

    @property
    def interrupt_pin(self) -> int:
        """1 = INTA# ... 4 = INTD#; 0 = the function uses no INTx pin."""
        return self.read8(P.PCI_INTERRUPT_PIN)

    @property
    def interrupt_line(self) -> int:
        """What firmware wrote as the routed IRQ (0xFF: unknown / not connected)."""
        return self.read8(P.PCI_INTERRUPT_LINE)

    @interrupt_line.setter
    def interrupt_line(self, value: int) -> None:
        self.write8(P.PCI_INTERRUPT_LINE, value)

    # capabilities
    def capabilities(self) -> list[Capability]:
        """Walk the standard capability list (§ PCI 3.0 6.7), refusing loops and pointers
        into the 64-byte header."""
        if not self.read16(P.PCI_STATUS) & P.PCI_STATUS_CAP_LIST:
            return []
        caps: list[Capability] = []
        seen: set[int] = set()
        ptr = self.read8(P.PCI_CAPABILITY_LIST) & 0xFC
        while ptr:
            if ptr < 0x40 or ptr > CONFIG_SPACE_SIZE - 4:
                raise PeerError(f"PCI {self.address}: capability pointer 0x{ptr:x} points "
                                "outside the device-specific config space")
            if ptr in seen or len(caps) >= MAX_CAPABILITIES:
                raise PeerError(f"PCI {self.address}: capability list loops at 0x{ptr:x}")
            seen.add(ptr)
            word = self.read16(ptr)
            cap = Capability(ptr, word & 0xFF, (word >> 8) & 0xFC)
            caps.append(cap)
            ptr = cap.next
        return caps

    def find_capability(self, cap_id: int) -> Capability | None:
        for cap in self.capabilities():
            if cap.cap_id == cap_id:
                return cap
        return None

    def virtio_capabilities(self) -> list[VirtioPciCap]:
        """Every virtio vendor capability, in list order (§4.1.4)."""
        out = []
        for cap in self.capabilities():
            if cap.cap_id != P.PCI_CAP_ID_VNDR:
                continue
            cap_len = self.read8(cap.offset + 2)
            if cap_len < P.VIRTIO_PCI_CAP_SIZE or cap.offset + cap_len > CONFIG_SPACE_SIZE:
                # Not a virtio structure (or a broken one): skip as Linux does.
                continue
            raw = self.read_bytes(cap.offset, P.VIRTIO_PCI_CAP_SIZE)
            _, _, _, cfg_type, bar, cap_id, offset, length = P.VIRTIO_PCI_CAP.unpack(raw)
            multiplier = 0
            if cfg_type == P.VIRTIO_PCI_CAP_NOTIFY_CFG:
                if cap_len < P.VIRTIO_PCI_NOTIFY_CAP_SIZE:
                    raise PeerError(f"PCI {self.address}: notify capability at "
                                    f"0x{cap.offset:x} is {cap_len} bytes, needs "
                                    f"{P.VIRTIO_PCI_NOTIFY_CAP_SIZE}")
                multiplier = self.read32(cap.offset + P.VIRTIO_PCI_CAP_SIZE)
            out.append(VirtioPciCap(cap.offset, cfg_type, bar, cap_id, offset, length,
                                    multiplier))
        return out

    # BARs
    def probe_bars(self) -> list[Bar]:
        """Size every BAR of a type 0 header by writing all-ones and reading back (decoding
        is off meanwhile, then restored, as are the BAR values). Result in :attr:`bars`."""
        if self.header_type != 0:
            raise LocalError(f"PCI {self.address}: header type {self.header_type} is not 0")
        saved_command = self.command
        self.command = saved_command & ~(P.PCI_COMMAND_IO | P.PCI_COMMAND_MEMORY)
        bars: list[Bar] = []
        try:
            index = 0
            while index < 6:
                bar = self._probe_bar(index)
                if bar is not None:
                    bars.append(bar)
                index += 2 if bar is not None and bar.is_64 else 1
        finally:
            self.command = saved_command
        self.bars = {bar.index: bar for bar in bars}
        return bars

    def _probe_bar(self, index: int) -> Bar | None:
        reg = P.PCI_BASE_ADDRESS_0 + 4 * index
        original = self.read32(reg)
        self.write32(reg, 0xFFFF_FFFF)
        mask = self.read32(reg)
        self.write32(reg, original)
        if mask == 0:
            return None
        if original & P.PCI_BASE_ADDRESS_SPACE_IO:
            bits = mask & ~0x3
            if not bits & 0xFFFF_0000:
                bits |= 0xFFFF_0000  # 16-bit I/O decoders read the upper half as zero
            size = (~bits & 0xFFFF_FFFF) + 1
            return Bar(index, io=True, size=size, address=original & ~0x3)
        mem_type = (original >> 1) & 0x3
        prefetch = bool(original & 0x8)
        if mem_type == 2:
            if index == 5:
                raise PeerError(f"PCI {self.address}: BAR5 claims to be 64-bit")
            high_reg = reg + 4
            high_orig = self.read32(high_reg)
            self.write32(high_reg, 0xFFFF_FFFF)
            high_mask = self.read32(high_reg)
            self.write32(high_reg, high_orig)
            bits = (high_mask << 32 | (mask & ~0xF)) & 0xFFFF_FFFF_FFFF_FFFF
            size = (~bits & 0xFFFF_FFFF_FFFF_FFFF) + 1
            address = high_orig << 32 | (original & ~0xF)
            return Bar(index, io=False, size=size, is_64=True, prefetchable=prefetch,
                       address=address)
        if mem_type != 0:
            raise PeerError(f"PCI {self.address}: BAR{index} has reserved memory type "
                            f"{mem_type}")
        size = (~(mask & ~0xF) & 0xFFFF_FFFF) + 1
        return Bar(index, io=False, size=size, prefetchable=prefetch,
                   address=original & ~0xF)

    def set_bar(self, bar: Bar, address: int) -> None:
        """Program ``bar`` to decode at ``address`` (naturally aligned)."""
        if address % bar.size:
            raise LocalError(f"PCI {self.address}: BAR{bar.index} address 0x{address:x} is "
                             f"not aligned to its size 0x{bar.size:x}")
        reg = P.PCI_BASE_ADDRESS_0 + 4 * bar.index
        self.write32(reg, address & 0xFFFF_FFFF)
        if bar.is_64:
            self.write32(reg + 4, address >> 32)
        elif address >> 32:
            raise LocalError(f"PCI {self.address}: 32-bit BAR{bar.index} cannot take "
                             f"0x{address:x}")
        bar.address = address

    def bar(self, index: int) -> Bar:
        """The sized BAR ``index`` (after :meth:`probe_bars`)."""
        try:
            return self.bars[index]
        except KeyError:
            raise PeerError(f"PCI {self.address}: BAR{index} is not implemented") from None


def scan_bus(config: ConfigSpace, bus: int = 0) -> Iterator[PciFunction]:
    """Every present function on ``bus`` (functions 1-7 only on multifunction devices)."""
    for device in range(32):
        func = PciFunction(config, PciAddress(bus, device, 0))
        if not func.present:
            continue
        yield func
        if func.multifunction:
            for fn in range(1, 8):
                sub = PciFunction(config, PciAddress(bus, device, fn))
                if sub.present:
                    yield sub


# ---- BAR windows ------------------------------------------------------------------------------


class Window:
    """A bounds-checked view of ``length`` bytes of I/O or memory space at ``base`` (one
    configuration structure inside a BAR)."""

    __slots__ = ("base", "bus", "io", "length", "name")

    def __init__(self, bus: HostBus, io: bool, base: int, length: int, name: str) -> None:
        self.bus = bus
        self.io = io
        self.base = base
        self.length = length
        self.name = name

    def __repr__(self) -> str:
        space = "io" if self.io else "mem"
        return f"Window({self.name}, {space} 0x{self.base:x}+0x{self.length:x})"

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > self.length:
            raise LocalError(f"{self.name}: {size}-byte access at 0x{offset:x} is outside its "
                             f"0x{self.length:x} bytes")

    def read(self, offset: int, size: int) -> int:
        self._check(offset, size)
        if self.io:
            return self.bus.io_read(self.base + offset, size)
        return self.bus.mmio_read(self.base + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        if self.io:
            self.bus.io_write(self.base + offset, size, value)
        else:
            self.bus.mmio_write(self.base + offset, size, value)

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Bytes read with the widest naturally aligned accesses (4, 2, 1)."""
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            size = widest_access(pos, end - pos)
            out += self.read(pos, size).to_bytes(size, "little")
            pos += size
        return bytes(out)

    def write_bytes(self, offset: int, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            size = widest_access(offset + pos, end - pos)
            self.write(offset + pos, size, int.from_bytes(data[pos : pos + size], "little"))
            pos += size


def widest_access(offset: int, remaining: int) -> int:
    """The widest naturally aligned access (4, 2 or 1 bytes) at ``offset`` that fits in
    ``remaining`` bytes: how drivers read and write device configuration."""
    for size in (4, 2):
        if remaining >= size and offset % size == 0:
            return size
    return 1


def bar_window(bus: HostBus, func: PciFunction, bar_index: int, offset: int, length: int,
               name: str) -> Window:
    """The window ``offset..offset+length`` of ``func``'s (assigned) BAR ``bar_index``."""
    bar = func.bar(bar_index)
    if bar.address == 0:
        raise LocalError(f"PCI {func.address}: BAR{bar_index} has no address assigned")
    if offset < 0 or length < 0 or offset + length > bar.size:
        raise PeerError(f"PCI {func.address}: {name} at BAR{bar_index}+0x{offset:x} "
                        f"(0x{length:x} bytes) lies outside the BAR's 0x{bar.size:x} bytes")
    return Window(bus, bar.io, bar.address + offset, length, f"{func.address} {name}")


# ---- firmware: resources and interrupt routing -------------------------------------------


@dataclass
class AddressWindow:
    """Bump allocation of naturally aligned BAR ranges from ``[base, limit)``."""

    base: int
    limit: int
    next: int = field(init=False)

    def __post_init__(self) -> None:
        self.next = self.base

    def alloc(self, size: int, align: int) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.limit:
            raise LocalError(f"no room for 0x{size:x} bytes in 0x{self.base:x}-"
                             f"0x{self.limit:x} (next free 0x{self.next:x})")
        self.next = addr + size
        return addr


#: PIIX3 PIRQ route control registers PIRQRC[A-D] (config space of the ISA bridge 00:01.0)
PIIX3_PIRQRC = 0x60
PIIX3_ADDRESS = PciAddress(0, 1, 0)
PIIX3_VENDOR_DEVICE = (0x8086, 0x7000)
PIRQ_DISABLED = 0x80


def piix_pirq(slot: int, pin: int) -> int:
    """Which PIRQ (0 = A) the i440FX board wires slot ``slot``'s INTx ``pin`` (1 = INTA#)
    to: the pins rotate by slot (QEMU's pc machine, and the classic PIIX board layout)."""
    if not 1 <= pin <= 4:
        raise LocalError(f"INTx pin must be 1-4, not {pin}")
    return (pin - 1 + slot - 1) & 3


@dataclass
class PcFirmware:
    """The firmware's job for PCI functions of QEMU's ``-M pc`` when no BIOS ran.

    ``pirq_irqs`` are the ISA IRQs (= GSIs = ioapic inputs) PIRQ A-D are routed to: four
    distinct lines, so devices in different slots rarely share one. IRQ 9 (ACPI SCI) and
    the legacy devices' lines are avoided.
    """

    io: AddressWindow = field(default_factory=lambda: AddressWindow(0xC000, 0x10000))
    mem: AddressWindow = field(
        default_factory=lambda: AddressWindow(0xE000_0000, 0xFEC0_0000))
    pirq_irqs: tuple[int, int, int, int] = (10, 11, 5, 7)
    _routed: bool = False

    def route_pirqs(self, config: ConfigSpace) -> None:
        """Program the PIIX3's PIRQ routing (once); a no-op on other chipsets."""
        if self._routed:
            return
        piix = PciFunction(config, PIIX3_ADDRESS)
        if (piix.vendor_id, piix.device_id) != PIIX3_VENDOR_DEVICE:
            raise LocalError(f"no PIIX3 at {PIIX3_ADDRESS} (found "
                             f"{piix.vendor_id:04x}:{piix.device_id:04x}); PcFirmware "
                             "is for QEMU's -M pc")
        for pirq, irq in enumerate(self.pirq_irqs):
            piix.write8(PIIX3_PIRQRC + pirq, irq)
        self._routed = True

    def intx_line(self, func: PciFunction) -> int | None:
        """The GSI ``func``'s INTx pin reaches once PIRQs are routed (None: no pin)."""
        pin = func.interrupt_pin
        if pin == 0:
            return None
        if pin > 4:
            raise PeerError(f"PCI {func.address}: interrupt pin {pin} is not INTA-INTD")
        return self.pirq_irqs[piix_pirq(func.address.device, pin)]

    def setup(self, func: PciFunction) -> list[Bar]:
        """Size and assign every BAR, route INTx and write Interrupt Line, then enable I/O,
        memory and bus mastering. Returns the BARs."""
        self.route_pirqs(func.config)
        bars = func.probe_bars()
        for bar in bars:
            if bar.io:
                addr = self.io.alloc(bar.size, max(bar.size, 4))
            else:
                # Page alignment keeps each device's registers on pages of their own.
                addr = self.mem.alloc(bar.size, max(bar.size, 4096))
            func.set_bar(bar, addr)
        line = self.intx_line(func)
        func.interrupt_line = 0xFF if line is None else line
        func.enable(io=True, memory=True, master=True)
        return bars


__all__ = [
    "AddressWindow",
    "Bar",
    "Capability",
    "ConfigMechanism1",
    "ConfigSpace",
    "HostBus",
    "Mmio",
    "PcFirmware",
    "PciAddress",
    "PciFunction",
    "PortIo",
    "VirtioPciCap",
    "Window",
    "bar_window",
    "piix_pirq",
    "scan_bus",
    "widest_access",
]
