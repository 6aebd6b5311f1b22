"""virtio-mmio, device side (§4.2): the register block of one virtio-mmio device.

:class:`VirtioMmioDevice` puts any :class:`~pyvirtio.device.base.VirtioDevice` behind the
0x200-byte register window (sans-I/O, see :mod:`pyvirtio.transport.register_model`; its one
space is ``"mmio"``). ``version=2`` is VIRTIO 1.x (ring addresses in low/high halves,
QueueReady, ConfigGeneration); ``version=1`` is the legacy layout (§4.2.4): GuestPageSize,
QueueAlign and QueuePFN for a contiguous vring, no QueueReady.

Registers are 32 bits wide and 32-bit aligned; the device configuration from 0x100 takes
1, 2 and 4-byte accesses. The interrupt line is high while InterruptStatus has a bit set;
the driver clears bits by writing them to InterruptACK.
"""

from __future__ import annotations

from pyvirtio.device.base import VirtioDevice
from pyvirtio.errors import LocalError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec import mmio as M
from pyvirtio.spec import split as SP
from pyvirtio.transport.register_model import RegisterModel, all_ones

MMIO_WINDOW = 0x200

_V2_ONLY = {M.VIRTIO_MMIO_QUEUE_READY, M.VIRTIO_MMIO_QUEUE_DESC_LOW,
            M.VIRTIO_MMIO_QUEUE_DESC_HIGH, M.VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            M.VIRTIO_MMIO_QUEUE_AVAIL_HIGH, M.VIRTIO_MMIO_QUEUE_USED_LOW,
            M.VIRTIO_MMIO_QUEUE_USED_HIGH, M.VIRTIO_MMIO_CONFIG_GENERATION}
_V1_ONLY = {M.VIRTIO_MMIO_GUEST_PAGE_SIZE, M.VIRTIO_MMIO_QUEUE_ALIGN,
            M.VIRTIO_MMIO_QUEUE_PFN}
_READABLE = {M.VIRTIO_MMIO_MAGIC_VALUE, M.VIRTIO_MMIO_VERSION, M.VIRTIO_MMIO_DEVICE_ID,
             M.VIRTIO_MMIO_VENDOR_ID, M.VIRTIO_MMIO_DEVICE_FEATURES,
             M.VIRTIO_MMIO_QUEUE_NUM_MAX, M.VIRTIO_MMIO_QUEUE_READY,
             M.VIRTIO_MMIO_INTERRUPT_STATUS, M.VIRTIO_MMIO_STATUS,
             M.VIRTIO_MMIO_CONFIG_GENERATION, M.VIRTIO_MMIO_QUEUE_PFN}
_WRITABLE = {M.VIRTIO_MMIO_DEVICE_FEATURES_SEL, M.VIRTIO_MMIO_DRIVER_FEATURES,
             M.VIRTIO_MMIO_DRIVER_FEATURES_SEL, M.VIRTIO_MMIO_GUEST_PAGE_SIZE,
             M.VIRTIO_MMIO_QUEUE_SEL, M.VIRTIO_MMIO_QUEUE_NUM, M.VIRTIO_MMIO_QUEUE_ALIGN,
             M.VIRTIO_MMIO_QUEUE_PFN, M.VIRTIO_MMIO_QUEUE_READY, M.VIRTIO_MMIO_QUEUE_NOTIFY,
             M.VIRTIO_MMIO_INTERRUPT_ACK, M.VIRTIO_MMIO_STATUS, M.VIRTIO_MMIO_QUEUE_DESC_LOW,
             M.VIRTIO_MMIO_QUEUE_DESC_HIGH, M.VIRTIO_MMIO_QUEUE_AVAIL_LOW,
             M.VIRTIO_MMIO_QUEUE_AVAIL_HIGH, M.VIRTIO_MMIO_QUEUE_USED_LOW,
             M.VIRTIO_MMIO_QUEUE_USED_HIGH}
_ADDRESS_FIELDS = {M.VIRTIO_MMIO_QUEUE_DESC_LOW: "desc", M.VIRTIO_MMIO_QUEUE_AVAIL_LOW: "avail",
                   M.VIRTIO_MMIO_QUEUE_USED_LOW: "used"}


class VirtioMmioDevice(RegisterModel):
    """``device`` as a virtio-mmio device of register layout ``version`` (2 or 1)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, *, version: int = 2,
                 name: str | None = None) -> None:
        if version not in (1, 2):
            raise LocalError(f"virtio-mmio versions are 1 (legacy) and 2, not {version}")
        super().__init__(device, memory, name or f"virtio-mmio {device.name}")
        self.version = version
        self._dfselect = 0
        self._gfselect = 0
        self.guest_page_size = 0
        self._align: list[int] = [SP.LEGACY_ALIGN] * len(self.queues)
        self._num: list[int] = [0] * len(self.queues)

    def _register(self, offset: int, size: int, op: str) -> bool:
        """Whether ``offset`` names a register of this version that allows ``op``."""
        if size != 4 or offset % 4:
            self.problem(f"{size}-byte {op} at 0x{offset:x}: registers take aligned 32-bit "
                         "accesses")
            return False
        other = _V1_ONLY if self.version == 2 else _V2_ONLY
        allowed = _READABLE if op == "read" else _WRITABLE
        if offset in other or offset not in allowed:
            kind = "no register" if offset in other or offset not in (
                _READABLE | _WRITABLE) else ("a write-only register" if op == "read"
                                             else "a read-only register")
            self.problem(f"{op} at 0x{offset:x}: {kind} there (version {self.version})")
            return False
        return True

    def read(self, space: str, offset: int, size: int) -> int:
        if space != "mmio" or not 0 <= offset <= MMIO_WINDOW - size or size not in (1, 2, 4):
            self.problem(f"{size}-byte read at {space}+0x{offset:x} outside the register "
                         "window")
            return 0
        if offset >= M.VIRTIO_MMIO_CONFIG:
            if offset % size:
                self.problem(f"misaligned {size}-byte config read at 0x{offset:x}")
                return all_ones(size)
            return self.config_read(offset - M.VIRTIO_MMIO_CONFIG, size)
        if not self._register(offset, size, "read"):
            return 0
        q = self.queue()
        if offset == M.VIRTIO_MMIO_MAGIC_VALUE:
            return M.VIRTIO_MMIO_MAGIC
        if offset == M.VIRTIO_MMIO_VERSION:
            return self.version
        if offset == M.VIRTIO_MMIO_DEVICE_ID:
            return self.device.device_id
        if offset == M.VIRTIO_MMIO_VENDOR_ID:
            return self.device.vendor_id
        if offset == M.VIRTIO_MMIO_DEVICE_FEATURES:
            features = self.device.get_features()
            return (features >> (32 * self._dfselect)) & 0xFFFF_FFFF if self._dfselect < 2 else 0
        if offset == M.VIRTIO_MMIO_QUEUE_NUM_MAX:
            return q.size if q is not None else 0
        if offset == M.VIRTIO_MMIO_QUEUE_READY:
            return int(q is not None and self.queue_running(self.queue_sel))
        if offset == M.VIRTIO_MMIO_QUEUE_PFN:
            if q is None or not self.queue_running(self.queue_sel) or not self.guest_page_size:
                return 0
            return q.desc // self.guest_page_size
        if offset == M.VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.isr
        if offset == M.VIRTIO_MMIO_STATUS:
            return self.device.status & 0xFF
        return self.device.config_generation & 0xFFFF_FFFF  # CONFIG_GENERATION

    def write(self, space: str, offset: int, size: int, value: int) -> None:
        if space != "mmio" or not 0 <= offset <= MMIO_WINDOW - size or size not in (1, 2, 4):
            self.problem(f"{size}-byte write at {space}+0x{offset:x} outside the register "
                         "window")
            return
        value &= all_ones(size)
        if offset >= M.VIRTIO_MMIO_CONFIG:
            if offset % size:
                self.problem(f"misaligned {size}-byte config write at 0x{offset:x}")
                return
            self.config_write(offset - M.VIRTIO_MMIO_CONFIG, size, value)
            return
        if not self._register(offset, size, "write"):
            return
        if offset == M.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self._dfselect = value
        elif offset == M.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self._gfselect = value
        elif offset == M.VIRTIO_MMIO_DRIVER_FEATURES:
            self.write_feature_word(self._gfselect, value)
        elif offset == M.VIRTIO_MMIO_GUEST_PAGE_SIZE:
            if value == 0 or value & (value - 1):
                self.problem(f"guest page size {value} is not a power of two; ignored")
            else:
                self.guest_page_size = value
        elif offset == M.VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == M.VIRTIO_MMIO_QUEUE_NOTIFY:
            self.kick(value)
        elif offset == M.VIRTIO_MMIO_INTERRUPT_ACK:
            self.isr &= ~value
            self._update_line()
        elif offset == M.VIRTIO_MMIO_STATUS:
            self.write_status(value)
        else:
            self._queue_write(offset, value)

    def _queue_write(self, offset: int, value: int) -> None:
        index = self.queue_sel
        q = self.queue()
        if q is None:
            self.problem(f"queue register 0x{offset:x} written for queue {index}, which does "
                         "not exist")
            return
        running = self.queue_running(index)
        if offset == M.VIRTIO_MMIO_QUEUE_READY:
            if value == 0:
                if running:
                    self.stop_queue(index)
            elif running:
                self.problem(f"queue {index} made ready twice")
            else:
                self.start_queue(index, self._num[index], q.desc, q.avail, q.used)
            return
        if offset == M.VIRTIO_MMIO_QUEUE_PFN:
            self._legacy_pfn(index, value)
            return
        if running:
            self.problem(f"queue {index} register 0x{offset:x} written while the queue runs; "
                         "ignored")
            return
        if offset == M.VIRTIO_MMIO_QUEUE_NUM:
            self._num[index] = value
        elif offset == M.VIRTIO_MMIO_QUEUE_ALIGN:
            if value == 0 or value & (value - 1):
                self.problem(f"queue {index} alignment {value} is not a power of two; ignored")
            else:
                self._align[index] = value
        else:
            low = offset & ~7
            field = _ADDRESS_FIELDS[low]
            old: int = getattr(q, field)
            if offset == low:
                setattr(q, field, (old & ~0xFFFF_FFFF) | value)
            else:
                setattr(q, field, (old & 0xFFFF_FFFF) | value << 32)

    def _legacy_pfn(self, index: int, pfn: int) -> None:
        q = self.queues[index]
        if pfn == 0:
            self.stop_queue(index)
            q.desc = q.avail = q.used = 0
            return
        if self.queue_running(index):
            self.problem(f"queue PFN 0x{pfn:x} written for queue {index}, which is running "
                         "(write 0 or reset first); ignored")
            return
        if not self.guest_page_size:
            self.problem(f"queue PFN 0x{pfn:x} written for queue {index} before the guest "
                         "page size; ignored")
            return
        size = self._num[index]
        base = pfn * self.guest_page_size
        layout = SP.LegacyLayout(size, self._align[index])
        if self.start_queue(index, size, base, base + layout.avail, base + layout.used):
            q.desc, q.avail, q.used = base, base + layout.avail, base + layout.used

    def reset(self) -> None:
        super().reset()
        self._dfselect = self._gfselect = 0
        self._align = [SP.LEGACY_ALIGN] * len(self.queues)
        self._num = [0] * len(self.queues)
