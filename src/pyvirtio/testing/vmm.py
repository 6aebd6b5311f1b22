"""An in-process machine: the bus a VMM would be, between our drivers and our register models.

:class:`VmmBus` is a :class:`~pyvirtio.transport.pci_bus.HostBus` and an
:class:`~pyvirtio.transport.virtio_pci.IntxLines`. It decodes PCI configuration mechanism #1
(ports 0xcf8/0xcfc) for the functions plugged into it, with a PIIX3 ISA bridge at 00:01.0 so
that :class:`~pyvirtio.transport.pci_bus.PcFirmware` routes INTx as on QEMU's ``-M pc``; it
routes port and memory accesses to whichever PCI BAR (as programmed, and only while the
command register enables decoding) or virtio-mmio window claims them, and reads of nothing
return all ones, as on a PC. Interrupt lines are the register models' levels (INTx through
the PIIX3's PIRQ routing, or the line a virtio-mmio device is wired to).

Interrupt delivery is serialised as on a machine whose CPU takes interrupts between
instructions: a line raised during a register access (a notification the device served at
once) is delivered when the outermost access returns, never inside a device that is still
working, and a handler's own accesses do not re-enter delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from pyvirtio.errors import LocalError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.transport.mmio_device import MMIO_WINDOW, VirtioMmioDevice
from pyvirtio.transport.pci_bus import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    PIIX3_ADDRESS,
    PIIX3_PIRQRC,
    PIIX3_VENDOR_DEVICE,
    PIRQ_DISABLED,
    HostBus,
    piix_pirq,
)
from pyvirtio.transport.pci_device import VirtioPciDevice
from pyvirtio.transport.register_model import Registers, all_ones
from pyvirtio.transport.virtio_mmio import VirtioMmio
from pyvirtio.transport.virtio_pci import InterruptRouter, VirtioPciTransport, discover

#: where :meth:`VmmBus.add_mmio` puts devices by default (QEMU microvm's first window)
MMIO_BASE = 0xFEB0_0000
#: where :func:`plug` puts a PCI function, and the line it wires a virtio-mmio device to
PCI_SLOT = 3
MMIO_LINE = 5


@dataclass
class _Slot:
    model: VirtioPciDevice
    regs: Registers


@dataclass
class _MmioWindow:
    base: int
    model: VirtioMmioDevice
    regs: Registers
    line: int


class VmmBus:
    """Port I/O, memory-mapped I/O and interrupt lines of one in-process machine."""

    def __init__(self) -> None:
        self.slots: dict[int, _Slot] = {}
        self.windows: list[_MmioWindow] = []
        self.piix = bytearray(256)
        self.piix[0:4] = (PIIX3_VENDOR_DEVICE[0] | PIIX3_VENDOR_DEVICE[1] << 16).to_bytes(
            4, "little")
        self.piix[0x0E] = 0x80  # multifunction, as the real one (IDE, USB, ACPI follow)
        for pirq in range(4):
            self.piix[PIIX3_PIRQRC + pirq] = PIRQ_DISABLED
        self._config_address = 0
        self._handlers: dict[int, Callable[[], bool]] = {}
        self._depth = 0
        self._delivering = False
        #: MSI-X messages received, as (slot, vector)
        self.msi: list[tuple[int, int]] = []
        #: lines found high that no handler claimed
        self.unclaimed = 0

    # ---- plugging ---------------------------------------------------------------------

    def add_pci(self, slot: int, model: VirtioPciDevice, regs: Registers | None = None) -> None:
        """Plug ``model`` in as function 0 of ``slot``; accesses go through ``regs`` (e.g. a
        :class:`~pyvirtio.transport.register_model.RegisterTrace` around it)."""
        if slot in self.slots or slot == PIIX3_ADDRESS.device or not 0 <= slot < 32:
            raise ValueError(f"PCI slot {slot} is taken or does not exist")
        self.slots[slot] = _Slot(model, model if regs is None else regs)
        model.on_irq = self._line_changed
        model.on_msi = lambda vector: self.msi.append((slot, vector))

    def add_mmio(self, model: VirtioMmioDevice, line: int, base: int | None = None,
                 regs: Registers | None = None) -> int:
        """Map ``model`` at ``base`` (default: the next free window), wired to ``line``."""
        if base is None:
            base = MMIO_BASE + MMIO_WINDOW * len(self.windows)
        self.windows.append(_MmioWindow(base, model, model if regs is None else regs, line))
        model.on_irq = self._line_changed
        return base

    def on_line(self, line: int, handler: Callable[[], bool]) -> None:
        """Call ``handler`` when ``line`` is high after an access (it returns whether it
        found its device pending)."""
        self._handlers[line] = handler

    # ---- interrupt lines --------------------------------------------------------------

    def pci_line(self, slot: int) -> int | None:
        """The ISA IRQ the PIIX3 routes ``slot``'s INTA# to (None: not routed)."""
        route = self.piix[PIIX3_PIRQRC + piix_pirq(slot, 1)]
        return None if route & PIRQ_DISABLED else route & 0x0F

    def irq_level(self, line: int) -> bool:
        for slot, entry in self.slots.items():
            if entry.model.irq_level and self.pci_line(slot) == line:
                return True
        return any(w.model.irq_level for w in self.windows if w.line == line)

    def wait_irq(self, lines: Collection[int], timeout: float) -> bool:
        # Nothing else runs in this process: a line that is low now stays low.
        return any(self.irq_level(line) for line in lines)

    def _line_changed(self, level: bool) -> None:
        if level and self._depth == 0:
            self._deliver()

    def _deliver(self) -> None:
        if self._delivering:
            return
        self._delivering = True
        try:
            progress = True
            while progress:
                progress = False
                for line, handler in list(self._handlers.items()):
                    if self.irq_level(line):
                        if handler():
                            progress = True
                        else:
                            self.unclaimed += 1
        finally:
            self._delivering = False

    def _access(self, fn: Callable[[], int]) -> int:
        self._depth += 1
        try:
            return fn()
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._deliver()

    # ---- configuration space ----------------------------------------------------------

    def _config_target(self) -> tuple[VirtioPciDevice | None, bytearray | None, int]:
        addr = self._config_address
        if not addr & 0x8000_0000 or (addr >> 16) & 0xFF or (addr >> 8) & 0x7:
            return None, None, 0  # disabled, another bus, or a function other than 0
        slot = (addr >> 11) & 0x1F
        offset = addr & 0xFC
        if slot == PIIX3_ADDRESS.device:
            return None, self.piix, offset
        entry = self.slots.get(slot)
        return (entry.model if entry else None), None, offset

    def _config_read(self, lane: int, size: int) -> int:
        model, raw, offset = self._config_target()
        if raw is not None:
            return int.from_bytes(raw[offset + lane : offset + lane + size], "little")
        if model is None:
            return all_ones(size)
        slot = (self._config_address >> 11) & 0x1F
        return self.slots[slot].regs.read("config", offset + lane, size)

    def _config_write(self, lane: int, size: int, value: int) -> None:
        model, raw, offset = self._config_target()
        if raw is not None:
            start = offset + lane
            for i in range(size):
                if PIIX3_PIRQRC <= start + i < PIIX3_PIRQRC + 4:
                    raw[start + i] = value >> (8 * i) & 0xFF
            return
        if model is not None:
            slot = (self._config_address >> 11) & 0x1F
            self.slots[slot].regs.write("config", offset + lane, size, value)

    # ---- decoding -----------------------------------------------------------------------

    def _claim(self, addr: int, size: int, io: bool) -> tuple[Registers, str, int] | None:
        for entry in self.slots.values():
            model = entry.model
            if not model.decodes(io):
                continue
            for index, bar in model.bars.items():
                if bar.io != io:
                    continue
                base = model.bar_address(index)
                if base and base <= addr and addr + size <= base + bar.size:
                    return entry.regs, f"bar{index}", addr - base
        if not io:
            for w in self.windows:
                if w.base <= addr and addr + size <= w.base + MMIO_WINDOW:
                    return w.regs, "mmio", addr - w.base
        return None

    def io_read(self, port: int, size: int) -> int:
        def op() -> int:
            if port == CONFIG_ADDRESS_PORT and size == 4:
                return self._config_address
            if CONFIG_DATA_PORT <= port < CONFIG_DATA_PORT + 4:
                return self._config_read(port - CONFIG_DATA_PORT, size)
            target = self._claim(port, size, io=True)
            if target is None:
                return all_ones(size)
            regs, space, offset = target
            return regs.read(space, offset, size)
        return self._access(op)

    def io_write(self, port: int, size: int, value: int) -> None:
        def op() -> int:
            if port == CONFIG_ADDRESS_PORT and size == 4:
                self._config_address = value & 0xFFFF_FFFF
            elif CONFIG_DATA_PORT <= port < CONFIG_DATA_PORT + 4:
                self._config_write(port - CONFIG_DATA_PORT, size, value)
            else:
                target = self._claim(port, size, io=True)
                if target is not None:
                    regs, space, offset = target
                    regs.write(space, offset, size, value)
            return 0
        self._access(op)

    def mmio_read(self, addr: int, size: int) -> int:
        def op() -> int:
            target = self._claim(addr, size, io=False)
            if target is None:
                return all_ones(size)
            regs, space, offset = target
            return regs.read(space, offset, size)
        return self._access(op)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        def op() -> int:
            target = self._claim(addr, size, io=False)
            if target is not None:
                regs, space, offset = target
                regs.write(space, offset, size, value)
            return 0
        self._access(op)


def plug(model: VirtioPciDevice | VirtioMmioDevice, memory: GuestMemory, allocator: Allocator,
         regs: Registers | None = None, *, prefer_modern: bool = True,
         wrap: Callable[[VmmBus], HostBus] | None = None,
         ) -> tuple[VmmBus, VirtioPciTransport | VirtioMmio]:
    """A machine with ``model`` on a fresh :class:`VmmBus` (accesses through ``regs`` if
    given), found and set up as a driver would find it: a PCI scan and firmware setup
    (``prefer_modern``: take the modern interface of a transitional function), or the
    virtio-mmio window. Returns the bus and our driver transport, interrupts wired. ``wrap``
    makes the host bus the driver uses from the machine's (a recorder, for instance)."""
    bus = VmmBus()
    host: HostBus = wrap(bus) if wrap is not None else bus
    transport: VirtioPciTransport | VirtioMmio
    if isinstance(model, VirtioPciDevice):
        bus.add_pci(PCI_SLOT, model, regs)
        found = discover(host, memory, allocator, lines=bus, prefer_modern=prefer_modern)
        if len(found) != 1:
            raise LocalError(f"the machine shows {len(found)} virtio functions, not 1")
        transport = found[0]
    else:
        base = bus.add_mmio(model, MMIO_LINE, regs=regs)
        transport = VirtioMmio(host, base, memory, allocator, InterruptRouter(bus), MMIO_LINE)
    if transport.line is not None:
        bus.on_line(transport.line, lambda: transport.wait(0.0))
    return bus, transport


__all__ = ["MMIO_BASE", "VmmBus", "plug"]
