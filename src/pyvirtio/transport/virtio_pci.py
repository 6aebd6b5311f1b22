"""virtio-pci for pyvirtio's drivers: :class:`~pyvirtio.driver.base.ConfigOps` over PCI.

Two register layouts, one per class:

* :class:`VirtioPciLegacy`, the paper's interface (§4.1.4.8): one I/O BAR with fixed
  registers, 32 feature bits, one page-frame number per queue for a contiguous 4096-aligned
  vring whose size the device fixes, and an ISR register that is cleared by reading it.
* :class:`VirtioPciModern`, VIRTIO 1.x (§4.1.4): vendor capabilities locate the common
  configuration, notification area, ISR and device configuration inside memory BARs;
  64 feature bits through select registers, three ring addresses per queue, queue_enable,
  per-queue notify offsets scaled by ``notify_off_multiplier``, a config generation.

Interrupts are INTx, as without MSI-X: the device raises its (level-triggered) line while an
ISR bit is set. :class:`InterruptRouter` does what a kernel does with a shared line: when the
line is high, every handler registered on it runs; each reads its device's ISR (which
acknowledges and lowers the line) and calls the callbacks of queues with used buffers.
Without an interrupt source, :meth:`ConfigOps.wait` polls the ISR instead.

All register access goes through the bus interfaces of :mod:`pyvirtio.transport.pci_bus`, so
this module is sans-I/O: QEMU's qtest (:mod:`pyvirtio.io.qtest`) is one bus among possible
others.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from pyvirtio.driver.base import ConfigOps, NoSuchQueueError, Virtqueue
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverRing
from pyvirtio.spec import ids
from pyvirtio.spec import pci as P
from pyvirtio.spec import split as SP
from pyvirtio.transport.pci_bus import (
    ConfigMechanism1,
    HostBus,
    PcFirmware,
    PciFunction,
    VirtioPciCap,
    Window,
    bar_window,
    scan_bus,
)

log = logging.getLogger("pyvirtio.transport.virtio_pci")

#: how long a modern device may take to report reset complete (§4.1.4.3.2)
RESET_TIMEOUT = 5.0


class IntxLines(Protocol):
    """A source of level-triggered interrupt lines (QEMU's intercepted ioapic inputs)."""

    def irq_level(self, line: int) -> bool: ...

    def wait_irq(self, lines: Collection[int], timeout: float) -> bool: ...


Handler = Callable[[], bool]


class InterruptRouter:
    """Runs every handler on an interrupt line when the line is asserted (shared INTx).

    A handler returns whether its device had something pending. ``lines`` None (or a
    transport without a line) means polling: the handlers are simply called until one
    reports work or the time is up.
    """

    def __init__(self, lines: IntxLines | None) -> None:
        self.lines = lines
        self._handlers: dict[int | None, list[Handler]] = {}
        self.spurious = 0

    def register(self, line: int | None, handler: Handler) -> None:
        if self.lines is None:
            line = None
        self._handlers.setdefault(line, []).append(handler)

    def unregister(self, handler: Handler) -> None:
        for handlers in self._handlers.values():
            if handler in handlers:
                handlers.remove(handler)

    def _run(self, line: int | None) -> bool:
        handled = False
        for handler in list(self._handlers.get(line, ())):
            handled |= handler()  # every handler runs: a shared line may carry several
        return handled

    def wait(self, line: int | None, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``line`` to carry an interrupt some handler
        claims; True once one did."""
        deadline = time.monotonic() + timeout
        if self.lines is None or line is None:
            key = None if self.lines is None else line
            if not self._handlers.get(key):
                return False  # nothing registered could ever claim an interrupt
            while True:
                if self._run(key):
                    return True
                if time.monotonic() >= deadline:
                    return False
        while True:
            remaining = deadline - time.monotonic()
            if not self.lines.wait_irq((line,), max(0.0, remaining)):
                return False
            if self._run(line):
                return True
            # High, yet no handler's device is pending: some device we do not drive holds
            # the line. Keep waiting, but without spinning on the protocol.
            self.spurious += 1
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)


class VirtioPciTransport(ConfigOps):
    """What the two layouts share: queue binding, interrupt handling, bookkeeping."""

    kind = "virtio-pci"

    def __init__(self, func: PciFunction, host: HostBus, memory: GuestMemory,
                 allocator: Allocator, router: InterruptRouter, virtio_id: int,
                 line: int | None) -> None:
        self.func = func
        self.host = host
        self.memory = memory
        self.allocator = allocator
        self.router = router
        self.device_id = virtio_id
        self.vendor_id = func.subsystem_vendor_id
        self.line = line
        self.vqs: dict[int, Virtqueue] = {}
        #: called on a configuration-change interrupt
        self.on_config_change: Callable[[], None] | None = None
        self.kicks = 0
        self.interrupts = 0
        self.config_interrupts = 0
        router.register(line, self._interrupt)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.func.address}, {ids.name(self.device_id)}, "
                f"line={self.line})")

    def detach(self) -> None:
        """Stop receiving interrupts (the transport is being thrown away)."""
        self.router.unregister(self._interrupt)
        self.vqs.clear()

    # shared ConfigOps parts
    def bind_queue(self, index: int, vq: Virtqueue) -> None:
        self.vqs[index] = vq

    def bind_config(self, callback: Callable[[], None] | None) -> None:
        self.on_config_change = callback

    def reset(self) -> None:
        self.set_status(0)
        self.vqs.clear()

    def wait(self, timeout: float) -> bool:
        return self.router.wait(self.line, timeout)

    @abc.abstractmethod
    def acked_features(self) -> int:
        """The driver features as the device latched them (read back from the device)."""

    @abc.abstractmethod
    def read_isr(self) -> int:
        """Read (and thereby clear) the ISR status; deasserts INTx."""

    def _interrupt(self) -> bool:
        isr = self.read_isr()
        if not isr:
            return False
        self.interrupts += 1
        if isr & P.VIRTIO_PCI_ISR_QUEUE:
            for index in sorted(self.vqs):
                vq = self.vqs[index]
                if vq.ring.has_used():  # as Linux's vring_interrupt: no work, no callback
                    vq.interrupt()
        if isr & P.VIRTIO_PCI_ISR_CONFIG:
            self.config_interrupts += 1
            if self.on_config_change is not None:
                self.on_config_change()
        return True


class VirtioPciLegacy(VirtioPciTransport):
    """The legacy (paper) register layout in I/O BAR0."""

    kind = "legacy"

    def __init__(self, func: PciFunction, host: HostBus, memory: GuestMemory,
                 allocator: Allocator, router: InterruptRouter, virtio_id: int,
                 line: int | None) -> None:
        bar = func.bar(0)
        if not bar.io:
            raise PeerError(f"PCI {func.address}: legacy virtio BAR0 is not an I/O BAR")
        msix = func.find_capability(P.PCI_CAP_ID_MSIX)
        msix_enabled = msix is not None and bool(
            func.read16(msix.offset + P.PCI_MSIX_FLAGS) & P.PCI_MSIX_FLAGS_ENABLE)
        self.config_offset = P.legacy_config_offset(msix_enabled)
        if bar.size < self.config_offset:
            raise PeerError(f"PCI {func.address}: legacy BAR0 has only {bar.size} bytes")
        self.regs = bar_window(host, func, 0, 0, bar.size, "legacy registers")
        super().__init__(func, host, memory, allocator, router, virtio_id, line)

    @property
    def legacy(self) -> bool:
        return True

    def vring_layout_contiguous(self) -> int | None:
        return P.VIRTIO_PCI_VRING_ALIGN

    def get_features(self) -> int:
        return self.regs.read(P.VIRTIO_PCI_HOST_FEATURES, 4)

    def set_features(self, features: int) -> None:
        if features >> 32:
            raise LocalError(f"legacy virtio-pci has 32 feature bits, not 0x{features:x}")
        self.regs.write(P.VIRTIO_PCI_GUEST_FEATURES, 4, features)

    def acked_features(self) -> int:
        """The driver features as the device latched them (read back from the device)."""
        return self.regs.read(P.VIRTIO_PCI_GUEST_FEATURES, 4)

    def get_status(self) -> int:
        return self.regs.read(P.VIRTIO_PCI_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.regs.write(P.VIRTIO_PCI_STATUS, 1, status)
        if status == 0:
            self.get_status()  # Linux flushes the reset with a read, so do we

    def read_config(self, offset: int, length: int) -> bytes:
        return self.regs.read_bytes(self.config_offset + offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        self.regs.write_bytes(self.config_offset + offset, data)

    def generation(self) -> int:
        return 0

    def queue_max_size(self, index: int) -> int:
        self.regs.write(P.VIRTIO_PCI_QUEUE_SEL, 2, index)
        return self.regs.read(P.VIRTIO_PCI_QUEUE_NUM, 2)

    def setup_queue(self, index: int, ring: DriverRing) -> None:
        self.regs.write(P.VIRTIO_PCI_QUEUE_SEL, 2, index)
        num = self.regs.read(P.VIRTIO_PCI_QUEUE_NUM, 2)
        if num == 0:
            raise NoSuchQueueError(f"PCI {self.func.address}: device has no queue {index}")
        if ring.size != num:
            raise LocalError(f"queue {index}: legacy devices fix the queue size at {num}, "
                             f"the ring has {ring.size}")
        layout = SP.LegacyLayout(num, P.VIRTIO_PCI_VRING_ALIGN)
        base = ring.desc_addr
        if (base % P.VIRTIO_PCI_VRING_ALIGN or ring.avail_addr != base + layout.avail
                or ring.used_addr != base + layout.used):
            raise LocalError(f"queue {index}: legacy rings must be one contiguous "
                             f"{P.VIRTIO_PCI_VRING_ALIGN}-aligned vring")
        pfn = base >> P.VIRTIO_PCI_QUEUE_ADDR_SHIFT
        if pfn == 0:
            raise LocalError(f"queue {index}: a legacy ring cannot start in page 0 (QUEUE_PFN "
                             "0 means no ring)")
        if pfn >> 32:
            raise LocalError(f"queue {index}: ring at 0x{base:x} is beyond the 44-bit reach "
                             "of QUEUE_PFN")
        self.regs.write(P.VIRTIO_PCI_QUEUE_PFN, 4, pfn)

    def notify(self, index: int) -> None:
        self.kicks += 1
        self.regs.write(P.VIRTIO_PCI_QUEUE_NOTIFY, 2, index)

    def read_isr(self) -> int:
        return self.regs.read(P.VIRTIO_PCI_ISR, 1)


class VirtioPciModern(VirtioPciTransport):
    """The VIRTIO 1.x capability layout."""

    kind = "modern"

    def __init__(self, func: PciFunction, host: HostBus, memory: GuestMemory,
                 allocator: Allocator, router: InterruptRouter, virtio_id: int,
                 line: int | None) -> None:
        caps = select_virtio_caps(func)
        common = caps.get(P.VIRTIO_PCI_CAP_COMMON_CFG)
        notify = caps.get(P.VIRTIO_PCI_CAP_NOTIFY_CFG)
        isr = caps.get(P.VIRTIO_PCI_CAP_ISR_CFG)
        missing = [name for name, cap in (("common", common), ("notify", notify),
                                          ("isr", isr)) if cap is None]
        if missing or common is None or notify is None or isr is None:
            raise PeerError(f"PCI {func.address}: modern virtio device lacks the "
                            f"{', '.join(missing)} capability")
        if common.length < P.VIRTIO_PCI_COMMON_CFG_SIZE:
            raise PeerError(f"PCI {func.address}: common configuration is {common.length} "
                            f"bytes, needs {P.VIRTIO_PCI_COMMON_CFG_SIZE}")
        if isr.length < 1:
            raise PeerError(f"PCI {func.address}: ISR capability has length 0")
        self.common = _cap_window(host, func, common, "common configuration")
        self.notify_area = _cap_window(host, func, notify, "notification area")
        self.isr = _cap_window(host, func, isr, "ISR")
        self.notify_off_multiplier = notify.notify_off_multiplier
        device = caps.get(P.VIRTIO_PCI_CAP_DEVICE_CFG)
        self.device_cfg: Window | None = (
            _cap_window(host, func, device, "device configuration") if device else None)
        self._notify_offsets: dict[int, int] = {}
        super().__init__(func, host, memory, allocator, router, virtio_id, line)

    def get_features(self) -> int:
        features = 0
        for word in (0, 1):
            self.common.write(P.VIRTIO_PCI_COMMON_DFSELECT, 4, word)
            features |= self.common.read(P.VIRTIO_PCI_COMMON_DF, 4) << (32 * word)
        return features

    def set_features(self, features: int) -> None:
        if features >> 64:
            raise LocalError(f"features 0x{features:x} do not fit in 64 bits")
        for word in (0, 1):
            self.common.write(P.VIRTIO_PCI_COMMON_GFSELECT, 4, word)
            self.common.write(P.VIRTIO_PCI_COMMON_GF, 4, features >> (32 * word) & 0xFFFFFFFF)

    def acked_features(self) -> int:
        """The driver features as the device latched them (read back from the device)."""
        features = 0
        for word in (0, 1):
            self.common.write(P.VIRTIO_PCI_COMMON_GFSELECT, 4, word)
            features |= self.common.read(P.VIRTIO_PCI_COMMON_GF, 4) << (32 * word)
        return features

    def get_status(self) -> int:
        return self.common.read(P.VIRTIO_PCI_COMMON_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.common.write(P.VIRTIO_PCI_COMMON_STATUS, 1, status)
        if status == 0:
            # §4.1.4.3.2: the reset is complete when device_status reads back 0.
            deadline = time.monotonic() + RESET_TIMEOUT
            while self.get_status() != 0:
                if time.monotonic() > deadline:
                    raise PeerError(f"PCI {self.func.address}: device did not complete "
                                    f"reset within {RESET_TIMEOUT} s")
            self._notify_offsets.clear()

    def _device_cfg(self) -> Window:
        if self.device_cfg is None:
            raise LocalError(f"PCI {self.func.address}: device has no device configuration")
        return self.device_cfg

    def read_config(self, offset: int, length: int) -> bytes:
        return self._device_cfg().read_bytes(offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        self._device_cfg().write_bytes(offset, data)

    def generation(self) -> int:
        return self.common.read(P.VIRTIO_PCI_COMMON_CFGGENERATION, 1)

    def num_queues(self) -> int:
        return self.common.read(P.VIRTIO_PCI_COMMON_NUMQ, 2)

    def queue_max_size(self, index: int) -> int:
        if index >= self.num_queues():
            return 0
        self.common.write(P.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        return self.common.read(P.VIRTIO_PCI_COMMON_Q_SIZE, 2)

    def setup_queue(self, index: int, ring: DriverRing) -> None:
        c = self.common
        max_size = self.queue_max_size(index)  # also selects the queue
        if max_size == 0:
            raise NoSuchQueueError(f"PCI {self.func.address}: device has no queue {index}")
        if ring.size > max_size:
            raise LocalError(f"queue {index}: ring of {ring.size} exceeds the device's "
                             f"maximum {max_size}")
        if c.read(P.VIRTIO_PCI_COMMON_Q_ENABLE, 2):
            raise LocalError(f"queue {index} is already enabled (reset the device first)")
        c.write(P.VIRTIO_PCI_COMMON_Q_SIZE, 2, ring.size)
        for lo, addr in ((P.VIRTIO_PCI_COMMON_Q_DESCLO, ring.desc_addr),
                         (P.VIRTIO_PCI_COMMON_Q_AVAILLO, ring.avail_addr),
                         (P.VIRTIO_PCI_COMMON_Q_USEDLO, ring.used_addr)):
            # 64-bit fields as two 32-bit halves (the common config decodes 1-4 bytes).
            c.write(lo, 4, addr & 0xFFFFFFFF)
            c.write(lo + 4, 4, addr >> 32)
        notify_off = c.read(P.VIRTIO_PCI_COMMON_Q_NOFF, 2) * self.notify_off_multiplier
        if notify_off + 2 > self.notify_area.length:
            raise PeerError(f"PCI {self.func.address}: queue {index} notify offset "
                            f"0x{notify_off:x} lies outside the "
                            f"0x{self.notify_area.length:x}-byte notification area")
        self._notify_offsets[index] = notify_off
        c.write(P.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)

    def notify(self, index: int) -> None:
        self.kicks += 1
        offset = self._notify_offsets.get(index)
        if offset is None:
            raise LocalError(f"queue {index} is not set up")
        self.notify_area.write(offset, 2, index)

    def read_isr(self) -> int:
        return self.isr.read(0, 1)


def _cap_window(host: HostBus, func: PciFunction, cap: VirtioPciCap, name: str) -> Window:
    return bar_window(host, func, cap.bar, cap.offset, cap.length, name)


def select_virtio_caps(func: PciFunction) -> dict[int, VirtioPciCap]:
    """The capability a driver uses for each structure type: the first one naming an
    implemented BAR (§4.1.4: later ones are alternatives the driver may ignore)."""
    chosen: dict[int, VirtioPciCap] = {}
    for cap in func.virtio_capabilities():
        if cap.cfg_type in chosen or cap.bar > 5 or cap.bar not in func.bars:
            continue
        chosen[cap.cfg_type] = cap
    return chosen


# ---- discovery ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VirtioPciInfo:
    """What a scan learned about one virtio PCI function.

    ``legacy_interface``: the device id is transitional (0x1000-0x103f, virtio type in the
    subsystem id) so BAR0 holds the legacy registers. ``modern_interface``: it has the
    virtio capabilities (0x1040 + type devices always do; transitional ones may).
    """

    function: PciFunction
    virtio_id: int
    legacy_interface: bool
    modern_interface: bool

    def __str__(self) -> str:
        kinds = [k for k, on in (("legacy", self.legacy_interface),
                                 ("modern", self.modern_interface)) if on]
        return (f"{self.function.address} virtio {ids.name(self.virtio_id)} "
                f"({'+'.join(kinds)})")


def identify(func: PciFunction) -> VirtioPciInfo | None:
    """Classify ``func`` as a virtio device, or None if it is not one."""
    if func.vendor_id != P.PCI_VENDOR_ID_REDHAT_QUMRANET:
        return None
    device_id = func.device_id
    if P.LEGACY_DEVICE_ID_MIN <= device_id <= P.LEGACY_DEVICE_ID_MAX:
        virtio_id = func.subsystem_id
        legacy = True
    elif P.MODERN_DEVICE_ID_BASE <= device_id < P.MODERN_DEVICE_ID_BASE + 0x40:
        virtio_id = device_id - P.MODERN_DEVICE_ID_BASE
        legacy = False
    else:
        return None  # another Red Hat device (e.g. a PCI bridge or ivshmem)
    modern = any(cap.cfg_type == P.VIRTIO_PCI_CAP_COMMON_CFG
                 for cap in func.virtio_capabilities())
    return VirtioPciInfo(func, virtio_id, legacy, modern)


def attach(info: VirtioPciInfo, host: HostBus, memory: GuestMemory, allocator: Allocator,
           router: InterruptRouter, line: int | None,
           prefer_modern: bool = True) -> VirtioPciTransport:
    """A transport for ``info``'s function, whose BARs are already assigned and enabled."""
    use_modern = info.modern_interface and (prefer_modern or not info.legacy_interface)
    cls: type[VirtioPciTransport] = VirtioPciModern if use_modern else VirtioPciLegacy
    if not use_modern and not info.legacy_interface:
        raise PeerError(f"PCI {info.function.address}: neither legacy nor modern interface")
    return cls(info.function, host, memory, allocator, router, info.virtio_id, line)


def discover(host: HostBus, memory: GuestMemory, allocator: Allocator, *,
             lines: IntxLines | None = None, prefer_modern: bool = True,
             firmware: PcFirmware | None = None, bus: int = 0) -> list[VirtioPciTransport]:
    """Scan ``bus`` through ports 0xcf8/0xcfc, set up every virtio function as firmware
    would (``firmware``, default :class:`PcFirmware`) and return one transport each, in
    slot order. Transports share one :class:`InterruptRouter` over ``lines``."""
    config = ConfigMechanism1(host)
    firmware = firmware or PcFirmware()
    router = InterruptRouter(lines)
    transports: list[VirtioPciTransport] = []
    for func in scan_bus(config, bus):
        info = identify(func)
        if info is None:
            continue
        firmware.setup(func)
        line = func.interrupt_line
        transport = attach(info, host, memory, allocator, router,
                           None if line == 0xFF else line, prefer_modern)
        log.info("found %s -> %r", info, transport)
        transports.append(transport)
    return transports


__all__ = [
    "InterruptRouter",
    "IntxLines",
    "VirtioPciInfo",
    "VirtioPciLegacy",
    "VirtioPciModern",
    "VirtioPciTransport",
    "attach",
    "discover",
    "identify",
    "select_virtio_caps",
]
