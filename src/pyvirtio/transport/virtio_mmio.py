"""virtio-mmio for pyvirtio's drivers: :class:`~pyvirtio.driver.base.ConfigOps` over a
virtio-mmio register window (§4.2), version 2 or the legacy version 1 (§4.2.4).

The window is reached through the :class:`~pyvirtio.transport.pci_bus.Mmio` protocol the
PCI side uses (QEMU's qtest, or an in-process bus), so this module is sans-I/O. Interrupts:
the device's line is high while InterruptStatus is non-zero; the handler reads it, writes the
bits back to InterruptACK and runs the callbacks, through the same
:class:`~pyvirtio.transport.virtio_pci.InterruptRouter` the PCI transports use (polling
InterruptStatus when there is no line).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyvirtio.driver.base import ConfigOps, NoSuchQueueError, Virtqueue
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverRing
from pyvirtio.spec import ids
from pyvirtio.spec import mmio as M
from pyvirtio.spec import split as SP
from pyvirtio.transport.pci_bus import Mmio, widest_access
from pyvirtio.transport.virtio_pci import InterruptRouter

log = logging.getLogger("pyvirtio.transport.virtio_mmio")

#: the guest page size a legacy driver announces (and its vring alignment)
LEGACY_PAGE_SIZE = 4096


class VirtioMmio(ConfigOps):
    """A virtio-mmio device at ``base`` on ``bus``; ``line`` is its interrupt line in
    ``router`` (None: poll InterruptStatus)."""

    kind = "virtio-mmio"

    def __init__(self, bus: Mmio, base: int, memory: GuestMemory, allocator: Allocator,
                 router: InterruptRouter, line: int | None = None) -> None:
        self.bus = bus
        self.base = base
        self.memory = memory
        self.allocator = allocator
        self.router = router
        self.line = line
        magic = self._read(M.VIRTIO_MMIO_MAGIC_VALUE)
        if magic != M.VIRTIO_MMIO_MAGIC:
            raise PeerError(f"virtio-mmio at 0x{base:x}: magic 0x{magic:x} is not 'virt'")
        self.version = self._read(M.VIRTIO_MMIO_VERSION)
        if self.version not in (1, 2):
            raise PeerError(f"virtio-mmio at 0x{base:x}: unknown version {self.version}")
        self.device_id = self._read(M.VIRTIO_MMIO_DEVICE_ID)
        if self.device_id == 0:
            raise PeerError(f"virtio-mmio at 0x{base:x}: no device behind it (device id 0)")
        self.vendor_id = self._read(M.VIRTIO_MMIO_VENDOR_ID)
        if self.version == 1:
            self._write(M.VIRTIO_MMIO_GUEST_PAGE_SIZE, LEGACY_PAGE_SIZE)
        self.vqs: dict[int, Virtqueue] = {}
        self._config_callback: Callable[[], None] | None = None
        self.kicks = 0
        self.interrupts = 0
        self.config_interrupts = 0
        router.register(line, self._interrupt)

    def __repr__(self) -> str:
        return (f"VirtioMmio(0x{self.base:x}, v{self.version}, {ids.name(self.device_id)}, "
                f"line={self.line})")

    def detach(self) -> None:
        self.router.unregister(self._interrupt)
        self.vqs.clear()

    def _read(self, offset: int) -> int:
        return self.bus.mmio_read(self.base + offset, 4)

    def _write(self, offset: int, value: int) -> None:
        self.bus.mmio_write(self.base + offset, 4, value)

    @property
    def legacy(self) -> bool:
        return self.version == 1

    def vring_layout_contiguous(self) -> int | None:
        return LEGACY_PAGE_SIZE if self.legacy else None

    # features and status
    def get_features(self) -> int:
        features = 0
        for word in (0, 1):
            self._write(M.VIRTIO_MMIO_DEVICE_FEATURES_SEL, word)
            features |= self._read(M.VIRTIO_MMIO_DEVICE_FEATURES) << (32 * word)
        return features

    def set_features(self, features: int) -> None:
        if features >> 64:
            raise LocalError(f"features 0x{features:x} do not fit in 64 bits")
        for word in (0, 1):
            self._write(M.VIRTIO_MMIO_DRIVER_FEATURES_SEL, word)
            self._write(M.VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * word) & 0xFFFF_FFFF)

    def get_status(self) -> int:
        return self._read(M.VIRTIO_MMIO_STATUS) & 0xFF

    def set_status(self, status: int) -> None:
        self._write(M.VIRTIO_MMIO_STATUS, status)
        if status == 0:
            self.get_status()  # as Linux: the read flushes the reset

    def reset(self) -> None:
        self.set_status(0)
        self.vqs.clear()

    # device configuration
    def read_config(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            size = widest_access(pos, end - pos)
            value = self.bus.mmio_read(self.base + M.VIRTIO_MMIO_CONFIG + pos, size)
            out += value.to_bytes(size, "little")
            pos += size
        return bytes(out)

    def write_config(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            size = widest_access(offset + pos, len(data) - pos)
            self.bus.mmio_write(self.base + M.VIRTIO_MMIO_CONFIG + offset + pos, size,
                                int.from_bytes(data[pos : pos + size], "little"))
            pos += size

    def generation(self) -> int:
        return 0 if self.legacy else self._read(M.VIRTIO_MMIO_CONFIG_GENERATION)

    # queues
    def queue_max_size(self, index: int) -> int:
        self._write(M.VIRTIO_MMIO_QUEUE_SEL, index)
        return self._read(M.VIRTIO_MMIO_QUEUE_NUM_MAX)

    def bind_queue(self, index: int, vq: Virtqueue) -> None:
        self.vqs[index] = vq

    def bind_config(self, callback: Callable[[], None] | None) -> None:
        self._config_callback = callback

    def setup_queue(self, index: int, ring: DriverRing) -> None:
        max_size = self.queue_max_size(index)  # also selects the queue
        if max_size == 0:
            raise NoSuchQueueError(f"virtio-mmio at 0x{self.base:x}: no queue {index}")
        if ring.size > max_size:
            raise LocalError(f"queue {index}: ring of {ring.size} exceeds the device's "
                             f"maximum {max_size}")
        ready_reg = M.VIRTIO_MMIO_QUEUE_PFN if self.legacy else M.VIRTIO_MMIO_QUEUE_READY
        if self._read(ready_reg):
            raise LocalError(f"queue {index} is already set up (reset the device first)")
        self._write(M.VIRTIO_MMIO_QUEUE_NUM, ring.size)
        if self.legacy:
            layout = SP.LegacyLayout(ring.size, LEGACY_PAGE_SIZE)
            base = ring.desc_addr
            if (base % LEGACY_PAGE_SIZE or ring.avail_addr != base + layout.avail
                    or ring.used_addr != base + layout.used):
                raise LocalError(f"queue {index}: legacy rings must be one contiguous "
                                 f"{LEGACY_PAGE_SIZE}-aligned vring")
            if base == 0:
                raise LocalError(f"queue {index}: a legacy ring cannot start in page 0 "
                                 "(QueuePFN 0 means no ring)")
            self._write(M.VIRTIO_MMIO_QUEUE_ALIGN, LEGACY_PAGE_SIZE)
            self._write(M.VIRTIO_MMIO_QUEUE_PFN, base // LEGACY_PAGE_SIZE)
            return
        for low, addr in ((M.VIRTIO_MMIO_QUEUE_DESC_LOW, ring.desc_addr),
                          (M.VIRTIO_MMIO_QUEUE_AVAIL_LOW, ring.avail_addr),
                          (M.VIRTIO_MMIO_QUEUE_USED_LOW, ring.used_addr)):
            self._write(low, addr & 0xFFFF_FFFF)
            self._write(low + 4, addr >> 32)
        self._write(M.VIRTIO_MMIO_QUEUE_READY, 1)

    def notify(self, index: int) -> None:
        self.kicks += 1
        self._write(M.VIRTIO_MMIO_QUEUE_NOTIFY, index)

    # interrupts
    def wait(self, timeout: float) -> bool:
        return self.router.wait(self.line, timeout)

    def _interrupt(self) -> bool:
        status = self._read(M.VIRTIO_MMIO_INTERRUPT_STATUS)
        if not status:
            return False
        self._write(M.VIRTIO_MMIO_INTERRUPT_ACK, status)
        self.interrupts += 1
        if status & M.VIRTIO_MMIO_INT_VRING:
            for index in sorted(self.vqs):
                vq = self.vqs[index]
                if vq.ring.has_used():
                    vq.interrupt()
        if status & M.VIRTIO_MMIO_INT_CONFIG:
            self.config_interrupts += 1
            if self._config_callback is not None:
                self._config_callback()
        return True


__all__ = ["VirtioMmio"]
