"""Driver-side register traces: what a driver did to a device's registers, on any machine.

:class:`BusRecorder` wraps the host bus a driver transport uses (QEMU's qtest client, or an
in-process :class:`~pyvirtio.testing.vmm.VmmBus`) and records every access that lands in a
watched register window as an :class:`~pyvirtio.transport.register_model.Access`, with the
address mapped back to (structure, offset) (see :meth:`BusRecorder.watch`).
Machine-specific addresses (where firmware put a BAR, which slot a device sits in, where a
device put its capabilities) drop out, so the same driver scenario on two machines gives
comparable traces. Accesses outside the windows (PCI configuration cycles, RAM) pass through
unrecorded.
"""

from __future__ import annotations

from pyvirtio.errors import LocalError
from pyvirtio.transport.mmio_device import MMIO_WINDOW
from pyvirtio.transport.pci_bus import HostBus, Window
from pyvirtio.transport.register_model import Access
from pyvirtio.transport.virtio_mmio import VirtioMmio
from pyvirtio.transport.virtio_pci import VirtioPciLegacy, VirtioPciModern, VirtioPciTransport


class BusRecorder:
    """A :class:`~pyvirtio.transport.pci_bus.HostBus` recording accesses to watched windows
    in :attr:`accesses` (while :attr:`recording`)."""

    def __init__(self, inner: HostBus) -> None:
        self.inner = inner
        #: (port I/O?, base, size, space name)
        self.windows: list[tuple[bool, int, int, str]] = []
        self.accesses: list[Access] = []
        self.recording = True

    def watch(self, transport: VirtioPciTransport | VirtioMmio) -> None:
        """Record accesses to ``transport``'s register windows from now on, by structure:
        ``"mmio"``, ``"legacy"`` (the I/O BAR of the legacy layout), or the modern
        capabilities ``"common"``, ``"notify"``, ``"isr"``, ``"device"``; offsets are from
        the structure's start, wherever the device put it."""
        if isinstance(transport, VirtioMmio):
            self.windows.append((False, transport.base, MMIO_WINDOW, "mmio"))
        elif isinstance(transport, VirtioPciLegacy):
            self._add(transport.regs, "legacy")
        elif isinstance(transport, VirtioPciModern):
            for window, name in ((transport.common, "common"),
                                 (transport.notify_area, "notify"),
                                 (transport.isr, "isr"), (transport.device_cfg, "device")):
                if window is not None:
                    self._add(window, name)
        else:
            raise LocalError(f"cannot watch {transport!r}")

    def _add(self, window: Window, name: str) -> None:
        self.windows.append((window.io, window.base, window.length, name))

    def _record(self, io: bool, addr: int, size: int, value: int, write: bool) -> None:
        if not self.recording:
            return
        for w_io, base, length, space in self.windows:
            if w_io == io and base <= addr < base + length:
                self.accesses.append(Access(space, addr - base, size, value, write))
                return

    def io_read(self, port: int, size: int) -> int:
        value = self.inner.io_read(port, size)
        self._record(True, port, size, value, False)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        self._record(True, port, size, value, True)
        self.inner.io_write(port, size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        value = self.inner.mmio_read(addr, size)
        self._record(False, addr, size, value, False)
        return value

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self._record(False, addr, size, value, True)
        self.inner.mmio_write(addr, size, value)


__all__ = ["BusRecorder"]
