"""virtio-pci, device side: a PCI function's config space and BARs in front of any device.

:class:`VirtioPciDevice` is the register model of one virtio PCI function (sans-I/O, see
:mod:`pyvirtio.transport.register_model`). Its interfaces are chosen at construction:

* ``legacy``: the paper's layout in I/O BAR0 (§4.1.4.8): host/guest features (32 bits),
  queue PFN of a contiguous 4096-aligned vring, queue size fixed by the device, selector,
  notify, status, ISR cleared by reading it, then the MSI-X vector registers (only while
  MSI-X is enabled) and the device configuration at 20, or 24 with MSI-X enabled;
* ``modern``: VIRTIO 1.x (§4.1.4): vendor capabilities pointing into a 64-bit memory BAR4
  laid out as QEMU lays it out (common configuration at 0x0000, ISR at 0x1000, device
  configuration at 0x2000, notifications at 0x3000 with a multiplier of 4, 4 KiB each), 64
  feature bits through the select registers, queue_enable, config generation, and the
  VIRTIO_PCI_CAP_PCI_CFG access window;
* both (a transitional device, id 0x1000 + n) or one of them (legacy-only: revision 0;
  modern-only: id 0x1040 + virtio id, revision 1);
* ``msix_vectors``: an MSI-X capability with its table and PBA in memory BAR1. Vectors the
  driver assigns are recorded; with MSI-X enabled interrupts leave through
  :attr:`~pyvirtio.transport.register_model.RegisterModel.on_msi` and the legacy device
  configuration moves from 20 to 24.

The configuration space answers like hardware: read-only bits ignore writes (that is normal
PCI, not a driver error), BARs answer the sizing protocol, the command register decides
whether the BARs decode (:meth:`VirtioPciDevice.decodes`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvirtio.device.base import VirtioDevice
from pyvirtio.errors import LocalError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec import ids
from pyvirtio.spec import pci as P
from pyvirtio.spec import split as SP
from pyvirtio.transport.register_model import NO_VECTOR, RegisterModel, all_ones

CONFIG_SPACE_SIZE = 256

#: PCI class codes QEMU gives each virtio device type (base class, subclass, prog-if)
CLASS_CODES = {
    ids.NET: 0x020000,
    ids.BLOCK: 0x010000,
    ids.CONSOLE: 0x078000,
    ids.RNG: 0x00FF00,
    ids.BALLOON: 0x00FF00,
    ids.SCSI: 0x010000,
}

LEGACY_BAR = 0
MSIX_BAR = 1
MODERN_BAR = 4
MODERN_REGION = 0x1000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
MODERN_BAR_SIZE = 0x4000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_CTRL_MASKBIT = 1
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_COMMAND_INTX_DISABLE = 0x400
#: the command bits a driver may change: I/O, memory, bus master, INTx disable
COMMAND_WRITABLE = (P.PCI_COMMAND_IO | P.PCI_COMMAND_MEMORY | P.PCI_COMMAND_MASTER
                    | PCI_COMMAND_INTX_DISABLE)

# register widths by offset: the legacy I/O layout and the modern common configuration
LEGACY_WIDTHS = {
    P.VIRTIO_PCI_HOST_FEATURES: 4, P.VIRTIO_PCI_GUEST_FEATURES: 4, P.VIRTIO_PCI_QUEUE_PFN: 4,
    P.VIRTIO_PCI_QUEUE_NUM: 2, P.VIRTIO_PCI_QUEUE_SEL: 2, P.VIRTIO_PCI_QUEUE_NOTIFY: 2,
    P.VIRTIO_PCI_STATUS: 1, P.VIRTIO_PCI_ISR: 1,
}
LEGACY_MSIX_WIDTHS = {P.VIRTIO_MSI_CONFIG_VECTOR: 2, P.VIRTIO_MSI_QUEUE_VECTOR: 2}
COMMON_WIDTHS = {
    P.VIRTIO_PCI_COMMON_DFSELECT: 4, P.VIRTIO_PCI_COMMON_DF: 4,
    P.VIRTIO_PCI_COMMON_GFSELECT: 4, P.VIRTIO_PCI_COMMON_GF: 4,
    P.VIRTIO_PCI_COMMON_MSIX: 2, P.VIRTIO_PCI_COMMON_NUMQ: 2,
    P.VIRTIO_PCI_COMMON_STATUS: 1, P.VIRTIO_PCI_COMMON_CFGGENERATION: 1,
    P.VIRTIO_PCI_COMMON_Q_SELECT: 2, P.VIRTIO_PCI_COMMON_Q_SIZE: 2,
    P.VIRTIO_PCI_COMMON_Q_MSIX: 2, P.VIRTIO_PCI_COMMON_Q_ENABLE: 2,
    P.VIRTIO_PCI_COMMON_Q_NOFF: 2,
    P.VIRTIO_PCI_COMMON_Q_DESCLO: 4, P.VIRTIO_PCI_COMMON_Q_DESCHI: 4,
    P.VIRTIO_PCI_COMMON_Q_AVAILLO: 4, P.VIRTIO_PCI_COMMON_Q_AVAILHI: 4,
    P.VIRTIO_PCI_COMMON_Q_USEDLO: 4, P.VIRTIO_PCI_COMMON_Q_USEDHI: 4,
}
_ADDRESS_FIELDS = {
    P.VIRTIO_PCI_COMMON_Q_DESCLO: "desc", P.VIRTIO_PCI_COMMON_Q_AVAILLO: "avail",
    P.VIRTIO_PCI_COMMON_Q_USEDLO: "used",
}
_BAR_SPACES = {f"bar{i}": i for i in range(6)}
#: offset of pci_cfg_data in a VIRTIO_PCI_CAP_PCI_CFG capability
PCI_CFG_DATA = P.VIRTIO_PCI_CAP_SIZE


@dataclass(frozen=True)
class BarSpec:
    """One implemented BAR: its number, size and kind."""

    index: int
    size: int
    io: bool
    is_64: bool = False
    prefetchable: bool = False

    def flags(self) -> int:
        if self.io:
            return P.PCI_BASE_ADDRESS_SPACE_IO
        return ((P.PCI_BASE_ADDRESS_MEM_TYPE_64 if self.is_64 else 0)
                | (8 if self.prefetchable else 0))


def _pow2ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class VirtioPciDevice(RegisterModel):
    """``device`` as a virtio PCI function (see the module docstring)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, *, legacy: bool = True,
                 modern: bool = True, msix_vectors: int = 0, name: str | None = None) -> None:
        if not (legacy or modern):
            raise LocalError("a virtio PCI function needs the legacy or the modern interface")
        if not 0 <= msix_vectors <= 2048:
            raise LocalError(f"MSI-X supports 1-2048 vectors, not {msix_vectors}")
        super().__init__(device, memory, name or f"virtio-pci {device.name}")
        self.legacy = legacy
        self.modern = modern
        self.msix_vectors = msix_vectors
        virtio_id = device.device_id
        if legacy:
            pci_id = P.LEGACY_DEVICE_IDS.get(virtio_id)
            if pci_id is None:
                raise LocalError(f"{ids.name(virtio_id)} has no transitional PCI device id")
        else:
            pci_id = P.modern_device_id(virtio_id)
        self.bars: dict[int, BarSpec] = {}
        if legacy:
            regs = P.VIRTIO_PCI_CONFIG_OFF_MSIX if msix_vectors else (
                P.VIRTIO_PCI_CONFIG_OFF_NO_MSIX)
            self.bars[LEGACY_BAR] = BarSpec(LEGACY_BAR, _pow2ceil(regs + len(device.config)),
                                            io=True)
        if msix_vectors:
            self.bars[MSIX_BAR] = BarSpec(MSIX_BAR, MSIX_BAR_SIZE, io=False)
        if modern:
            self.bars[MODERN_BAR] = BarSpec(MODERN_BAR, MODERN_BAR_SIZE, io=False, is_64=True,
                                            prefetchable=True)
        self._ids = (pci_id, virtio_id)
        self._dfselect = 0
        self._gfselect = 0
        self.power_on_reset()

    def power_on_reset(self) -> None:
        """The function as at power-on (a PCI reset, not only a virtio one): config space
        with no BAR assigned and decoding off, MSI-X disabled with every entry masked, and
        the device reset."""
        self.space = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.msix_table = bytearray(MSIX_ENTRY_SIZE * self.msix_vectors)
        for vector in range(self.msix_vectors):  # entries start masked (PCI 3.0 6.8.2.9)
            self.msix_table[vector * MSIX_ENTRY_SIZE + 12] = MSIX_ENTRY_CTRL_MASKBIT
        self.msix_pending = 0
        self.msix_cap = 0
        self.pci_cfg_cap = 0
        self._build_config_space(*self._ids)
        self.reset()

    # ---- configuration space ----------------------------------------------------------

    def _build_config_space(self, pci_id: int, virtio_id: int) -> None:
        s, w = self.space, self.wmask
        struct.pack_into("<HH", s, P.PCI_VENDOR_ID, P.PCI_VENDOR_ID_REDHAT_QUMRANET, pci_id)
        struct.pack_into("<H", w, P.PCI_COMMAND, COMMAND_WRITABLE)
        class_code = CLASS_CODES.get(virtio_id, 0xFF0000)
        revision = 0 if self.legacy else 1
        struct.pack_into("<I", s, P.PCI_CLASS_REVISION, class_code << 8 | revision)
        struct.pack_into("<HH", s, P.PCI_SUBSYSTEM_VENDOR_ID_OFF, P.PCI_SUBSYSTEM_VENDOR_ID,
                         virtio_id)
        s[P.PCI_INTERRUPT_PIN] = 1
        w[P.PCI_INTERRUPT_LINE] = 0xFF
        for bar in self.bars.values():
            reg = P.PCI_BASE_ADDRESS_0 + 4 * bar.index
            low_flags = 0x3 if bar.io else 0xF
            struct.pack_into("<I", s, reg, bar.flags())
            struct.pack_into("<I", w, reg, ~(bar.size - 1) & ~low_flags & 0xFFFF_FFFF)
            if bar.is_64:
                struct.pack_into("<I", w, reg + 4, 0xFFFF_FFFF)
        caps: list[bytes] = []
        if self.modern:
            def vcap(cfg_type: int, offset: int, extra: bytes = b"") -> bytes:
                length = P.VIRTIO_PCI_CAP_SIZE + len(extra)
                return (P.VIRTIO_PCI_CAP.pack(P.PCI_CAP_ID_VNDR, 0, length, cfg_type,
                                              MODERN_BAR, 0, offset, MODERN_REGION) + extra)
            caps += [vcap(P.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET),
                     vcap(P.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET),
                     vcap(P.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET),
                     vcap(P.VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET,
                          struct.pack("<I", NOTIFY_OFF_MULTIPLIER)),
                     P.VIRTIO_PCI_CAP.pack(P.PCI_CAP_ID_VNDR, 0, P.VIRTIO_PCI_CAP_SIZE + 4,
                                           P.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0)
                     + bytes(4)]
        if self.msix_vectors:
            caps.append(struct.pack("<BBHII", P.PCI_CAP_ID_MSIX, 0, self.msix_vectors - 1,
                                    MSIX_TABLE_OFFSET | MSIX_BAR, MSIX_PBA_OFFSET | MSIX_BAR))
        pos, previous = 0x40, P.PCI_CAPABILITY_LIST
        for cap in caps:
            s[previous] = pos
            s[pos : pos + len(cap)] = cap
            if cap[0] == P.PCI_CAP_ID_MSIX:
                self.msix_cap = pos
                w[pos + 3] = 0xC0  # MSI-X enable and function mask
            elif cap[3] == P.VIRTIO_PCI_CAP_PCI_CFG:
                self.pci_cfg_cap = pos
                w[pos + 4] = 0xFF  # bar
                struct.pack_into("<II", w, pos + 8, 0xFFFF_FFFF, 0xFFFF_FFFF)  # offset, length
            previous = pos + 1
            pos += (len(cap) + 3) & ~3
        if caps:
            struct.pack_into("<H", s, P.PCI_STATUS, P.PCI_STATUS_CAP_LIST)

    def _config_space_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= CONFIG_SPACE_SIZE - size:
            self.problem(f"{size}-byte PCI config read at 0x{offset:x} is misaligned or "
                         "outside the 256-byte config space")
            return all_ones(size) if 0 < size <= 8 else 0
        if self.pci_cfg_cap and self.pci_cfg_cap + PCI_CFG_DATA <= offset < (
                self.pci_cfg_cap + PCI_CFG_DATA + 4):
            return self._pci_cfg_access(None)
        return int.from_bytes(self.space[offset : offset + size], "little")

    def _config_space_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= CONFIG_SPACE_SIZE - size:
            self.problem(f"{size}-byte PCI config write at 0x{offset:x} is misaligned or "
                         "outside the 256-byte config space")
            return
        if self.pci_cfg_cap and self.pci_cfg_cap + PCI_CFG_DATA <= offset < (
                self.pci_cfg_cap + PCI_CFG_DATA + 4):
            self._pci_cfg_access(value)
            return
        data = value.to_bytes(size, "little")
        for i, byte in enumerate(data):
            mask = self.wmask[offset + i]
            if mask:
                self.space[offset + i] = (self.space[offset + i] & ~mask) | (byte & mask)
        self._update_line()  # MSI-X or INTx disable may have changed
        if self.msix_cap and offset <= self.msix_cap + 3 < offset + size:
            self._msix_deliver_pending()  # the function mask may have been cleared

    def _pci_cfg_access(self, value: int | None) -> int:
        """VIRTIO_PCI_CAP_PCI_CFG (§4.1.4.9): pci_cfg_data reads or writes ``length`` bytes
        at ``offset`` of the BAR the capability names."""
        cap = self.pci_cfg_cap
        bar = self.space[cap + 4]
        offset, length = struct.unpack_from("<II", self.space, cap + 8)
        if length not in (1, 2, 4) or bar not in self.bars:
            self.problem(f"PCI config access window names BAR{bar}, {length} bytes: refused")
            return 0 if value is not None else all_ones(4)
        if value is None:
            return self._bar_read(bar, offset, length)
        self._bar_write(bar, offset, length, value & all_ones(length))
        return 0

    def bar_address(self, index: int) -> int:
        """Where BAR ``index`` decodes (0: not assigned)."""
        bar = self.bars[index]
        reg = P.PCI_BASE_ADDRESS_0 + 4 * index
        low = struct.unpack_from("<I", self.space, reg)[0] & (~0x3 if bar.io else ~0xF)
        if bar.is_64:
            low |= struct.unpack_from("<I", self.space, reg + 4)[0] << 32
        return low & 0xFFFF_FFFF_FFFF_FFFF

    def decodes(self, io: bool) -> bool:
        """Whether the command register enables I/O (``io``) or memory decoding."""
        command = struct.unpack_from("<H", self.space, P.PCI_COMMAND)[0]
        return bool(command & (P.PCI_COMMAND_IO if io else P.PCI_COMMAND_MEMORY))

    # ---- MSI-X --------------------------------------------------------------------------

    def _msix_control(self) -> int:
        if not self.msix_cap:
            return 0
        return int(struct.unpack_from("<H", self.space, self.msix_cap + 2)[0])

    def msix_enabled(self) -> bool:
        return bool(self._msix_control() & P.PCI_MSIX_FLAGS_ENABLE)

    def _vector_masked(self, vector: int) -> bool:
        return bool(self._msix_control() & PCI_MSIX_FLAGS_MASKALL
                    or self.msix_table[vector * MSIX_ENTRY_SIZE + 12] & MSIX_ENTRY_CTRL_MASKBIT)

    def msix_message(self, vector: int) -> tuple[int, int]:
        """The (address, data) the driver programmed for ``vector``."""
        addr, data = struct.unpack_from("<QI", self.msix_table, vector * MSIX_ENTRY_SIZE)
        return addr, data

    def line_enabled(self) -> bool:
        command = struct.unpack_from("<H", self.space, P.PCI_COMMAND)[0]
        return not (self.msix_enabled() or command & PCI_COMMAND_INTX_DISABLE)

    def _interrupt(self, isr_bit: int, vector: int) -> None:
        self.isr |= isr_bit
        if not self.msix_enabled():
            self._update_line()
        elif vector != NO_VECTOR:
            if self._vector_masked(vector):
                self.msix_pending |= 1 << vector
            else:
                self.on_msi(vector)

    def _msix_deliver_pending(self) -> None:
        if not self.msix_enabled():
            return
        for vector in range(self.msix_vectors):
            if self.msix_pending >> vector & 1 and not self._vector_masked(vector):
                self.msix_pending &= ~(1 << vector)
                self.on_msi(vector)

    def _vector(self, value: int, what: str) -> int:
        if value == NO_VECTOR or value < self.msix_vectors:
            return value
        self.problem(f"{what} vector {value} does not exist (the function has "
                     f"{self.msix_vectors}); NO_VECTOR recorded")
        return NO_VECTOR

    def _msix_read(self, offset: int, size: int) -> int:
        if offset < MSIX_PBA_OFFSET:
            if offset + size > len(self.msix_table):
                return 0
            return int.from_bytes(self.msix_table[offset : offset + size], "little")
        bit = (offset - MSIX_PBA_OFFSET) * 8
        return (self.msix_pending >> bit) & all_ones(size)

    def _msix_write(self, offset: int, size: int, value: int) -> None:
        if offset >= MSIX_PBA_OFFSET or offset + size > len(self.msix_table):
            self.problem(f"MSI-X write at BAR{MSIX_BAR}+0x{offset:x} outside the table")
            return
        self.msix_table[offset : offset + size] = value.to_bytes(size, "little")
        self._msix_deliver_pending()

    # ---- register access entry points ---------------------------------------------------

    def read(self, space: str, offset: int, size: int) -> int:
        if space == "config":
            return self._config_space_read(offset, size)
        bar = self._bar_of(space, offset, size)
        if bar is None:
            return all_ones(size) if 0 < size <= 8 else 0
        return self._bar_read(bar, offset, size)

    def write(self, space: str, offset: int, size: int, value: int) -> None:
        if space == "config":
            self._config_space_write(offset, size, value & all_ones(max(1, min(size, 8))))
            return
        bar = self._bar_of(space, offset, size)
        if bar is not None:
            self._bar_write(bar, offset, size, value & all_ones(size))

    def _bar_of(self, space: str, offset: int, size: int) -> int | None:
        index = _BAR_SPACES.get(space, -1)
        spec = self.bars.get(index)
        if spec is None:
            self.problem(f"access to {space}, which this function does not implement")
            return None
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= spec.size - size:
            self.problem(f"{size}-byte access at {space}+0x{offset:x} is misaligned, of a "
                         f"width no register has, or outside the BAR's 0x{spec.size:x} bytes")
            return None
        return index

    def _bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar == LEGACY_BAR and self.legacy:
            return self._legacy_read(offset, size)
        if bar == MSIX_BAR and self.msix_vectors:
            return self._msix_read(offset, size)
        region, rel = divmod(offset, MODERN_REGION)
        if region == 0:
            return self._common_read(rel, size)
        if region == 1:
            if rel != 0 or size != 1:
                self.problem(f"{size}-byte ISR read at +{rel}: the ISR is one byte")
                return 0
            return self.take_isr()
        if region == 2:
            return self.config_read(rel, size)
        return 0  # notifications read as 0

    def _bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar == LEGACY_BAR and self.legacy:
            self._legacy_write(offset, size, value)
        elif bar == MSIX_BAR and self.msix_vectors:
            self._msix_write(offset, size, value)
        else:
            region, rel = divmod(offset, MODERN_REGION)
            if region == 0:
                self._common_write(rel, size, value)
            elif region == 1:
                self.problem(f"write of 0x{value:x} to the read-only ISR")
            elif region == 2:
                self.config_write(rel, size, value)
            else:
                self._notify_write(rel, size, value)

    # ---- legacy I/O layout --------------------------------------------------------------

    def legacy_config_offset(self) -> int:
        return P.legacy_config_offset(self.msix_enabled())

    def _legacy_width(self, offset: int, size: int, op: str) -> bool:
        width = LEGACY_WIDTHS.get(offset)
        if width is None and self.msix_enabled():
            width = LEGACY_MSIX_WIDTHS.get(offset)
        if width == size:
            return True
        if width is None:
            self.problem(f"legacy {op} at offset {offset}: no register there")
        else:
            self.problem(f"{size}-byte legacy {op} at offset {offset}: the register is "
                         f"{width} bytes wide")
        return False

    def _legacy_read(self, offset: int, size: int) -> int:
        config = self.legacy_config_offset()
        if offset >= config:
            return self.config_read(offset - config, size)
        if not self._legacy_width(offset, size, "read"):
            return all_ones(size)
        q = self.queue()
        if offset == P.VIRTIO_PCI_HOST_FEATURES:
            return self.device.get_features() & 0xFFFF_FFFF
        if offset == P.VIRTIO_PCI_GUEST_FEATURES:
            return self.device.driver_features & 0xFFFF_FFFF
        if offset == P.VIRTIO_PCI_QUEUE_PFN:
            running = q is not None and self.queue_running(self.queue_sel)
            return q.desc >> P.VIRTIO_PCI_QUEUE_ADDR_SHIFT if q is not None and running else 0
        if offset == P.VIRTIO_PCI_QUEUE_NUM:
            return q.size if q is not None else 0
        if offset == P.VIRTIO_PCI_QUEUE_SEL:
            return self.queue_sel
        if offset == P.VIRTIO_PCI_QUEUE_NOTIFY:
            return all_ones(size)  # write-only: reads as nothing decoded (as QEMU's)
        if offset == P.VIRTIO_PCI_STATUS:
            return self.device.status & 0xFF
        if offset == P.VIRTIO_PCI_ISR:
            return self.take_isr()
        if offset == P.VIRTIO_MSI_CONFIG_VECTOR:
            return self.config_vector
        return q.vector if q is not None else NO_VECTOR  # VIRTIO_MSI_QUEUE_VECTOR

    def _legacy_write(self, offset: int, size: int, value: int) -> None:
        config = self.legacy_config_offset()
        if offset >= config:
            self.config_write(offset - config, size, value)
            return
        if not self._legacy_width(offset, size, "write"):
            return
        if offset == P.VIRTIO_PCI_GUEST_FEATURES:
            self.write_driver_features(value)
        elif offset == P.VIRTIO_PCI_QUEUE_PFN:
            self._legacy_pfn(value)
        elif offset == P.VIRTIO_PCI_QUEUE_SEL:
            self.queue_sel = value
        elif offset == P.VIRTIO_PCI_QUEUE_NOTIFY:
            self.kick(value)
        elif offset == P.VIRTIO_PCI_STATUS:
            self.write_status(value)
        elif offset == P.VIRTIO_MSI_CONFIG_VECTOR:
            self.config_vector = self._vector(value, "config")
        elif offset == P.VIRTIO_MSI_QUEUE_VECTOR:
            q = self.queue()
            if q is None:
                self.problem(f"queue vector written for queue {self.queue_sel}, which does "
                             "not exist")
            else:
                q.vector = self._vector(value, f"queue {self.queue_sel}")
        else:
            self.problem(f"write of 0x{value:x} to read-only legacy register at offset "
                         f"{offset}")

    def _legacy_pfn(self, pfn: int) -> None:
        index = self.queue_sel
        q = self.queue()
        if q is None:
            self.problem(f"queue PFN 0x{pfn:x} written for queue {index}, which does not "
                         "exist")
            return
        if pfn == 0:
            self.stop_queue(index)
            q.desc = q.avail = q.used = 0
            return
        if self.queue_running(index):
            self.problem(f"queue PFN 0x{pfn:x} written for queue {index}, which is running "
                         "(write 0 or reset first); ignored")
            return
        base = pfn << P.VIRTIO_PCI_QUEUE_ADDR_SHIFT
        layout = SP.LegacyLayout(q.size, P.VIRTIO_PCI_VRING_ALIGN)
        if self.start_queue(index, q.size, base, base + layout.avail, base + layout.used):
            q.desc, q.avail, q.used = base, base + layout.avail, base + layout.used

    # ---- modern common configuration, notifications -------------------------------------

    def _common_width(self, offset: int, size: int, op: str) -> bool:
        width = COMMON_WIDTHS.get(offset)
        if width == size:
            return True
        if width is None:
            self.problem(f"common configuration {op} at offset {offset}: no field there")
        else:
            self.problem(f"{size}-byte common configuration {op} at offset {offset}: the "
                         f"field is {width} bytes wide")
        return False

    def _common_read(self, offset: int, size: int) -> int:
        if not self._common_width(offset, size, "read"):
            return 0
        q = self.queue()
        if offset == P.VIRTIO_PCI_COMMON_DFSELECT:
            return self._dfselect
        if offset == P.VIRTIO_PCI_COMMON_DF:
            return self._feature_word(self.device.get_features(), self._dfselect)
        if offset == P.VIRTIO_PCI_COMMON_GFSELECT:
            return self._gfselect
        if offset == P.VIRTIO_PCI_COMMON_GF:
            return self._feature_word(self.device.driver_features, self._gfselect)
        if offset == P.VIRTIO_PCI_COMMON_MSIX:
            return self.config_vector
        if offset == P.VIRTIO_PCI_COMMON_NUMQ:
            return len(self.queues)
        if offset == P.VIRTIO_PCI_COMMON_STATUS:
            return self.device.status & 0xFF
        if offset == P.VIRTIO_PCI_COMMON_CFGGENERATION:
            return self.device.config_generation & 0xFF
        if offset == P.VIRTIO_PCI_COMMON_Q_SELECT:
            return self.queue_sel
        if q is None:
            return NO_VECTOR if offset == P.VIRTIO_PCI_COMMON_Q_MSIX else 0
        if offset == P.VIRTIO_PCI_COMMON_Q_SIZE:
            return q.size
        if offset == P.VIRTIO_PCI_COMMON_Q_MSIX:
            return q.vector
        if offset == P.VIRTIO_PCI_COMMON_Q_ENABLE:
            return int(self.queue_running(self.queue_sel))
        if offset == P.VIRTIO_PCI_COMMON_Q_NOFF:
            return self.queue_sel
        low = offset & ~7
        value: int = getattr(q, _ADDRESS_FIELDS[low])
        return value >> 32 if offset != low else value & 0xFFFF_FFFF

    @staticmethod
    def _feature_word(features: int, select: int) -> int:
        return (features >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if not self._common_width(offset, size, "write"):
            return
        if offset == P.VIRTIO_PCI_COMMON_DFSELECT:
            self._dfselect = value
        elif offset == P.VIRTIO_PCI_COMMON_GFSELECT:
            self._gfselect = value
        elif offset == P.VIRTIO_PCI_COMMON_GF:
            self.write_feature_word(self._gfselect, value)
        elif offset == P.VIRTIO_PCI_COMMON_MSIX:
            self.config_vector = self._vector(value, "config")
        elif offset == P.VIRTIO_PCI_COMMON_STATUS:
            self.write_status(value)
        elif offset == P.VIRTIO_PCI_COMMON_Q_SELECT:
            self.queue_sel = value
        elif offset in (P.VIRTIO_PCI_COMMON_DF, P.VIRTIO_PCI_COMMON_NUMQ,
                        P.VIRTIO_PCI_COMMON_CFGGENERATION, P.VIRTIO_PCI_COMMON_Q_NOFF):
            self.problem(f"write of 0x{value:x} to read-only common configuration field at "
                         f"offset {offset}")
        else:
            self._queue_field_write(offset, value)

    def _queue_field_write(self, offset: int, value: int) -> None:
        index = self.queue_sel
        q = self.queue()
        if q is None:
            self.problem(f"queue field at offset {offset} written for queue {index}, which "
                         "does not exist")
            return
        if offset == P.VIRTIO_PCI_COMMON_Q_MSIX:
            q.vector = self._vector(value, f"queue {index}")
            return
        running = self.queue_running(index)
        if offset == P.VIRTIO_PCI_COMMON_Q_ENABLE:
            if value != 1:
                self.problem(f"queue_enable {value} written for queue {index}: only 1 may "
                             "be written (a reset disables queues)")
            elif running:
                self.problem(f"queue {index} enabled twice")
            else:
                self.start_queue(index, q.size, q.desc, q.avail, q.used)
            return
        if running:
            self.problem(f"queue {index} field at offset {offset} written while the queue "
                         "is enabled; ignored")
            return
        if offset == P.VIRTIO_PCI_COMMON_Q_SIZE:
            q.size = value
            return
        low = offset & ~7
        field = _ADDRESS_FIELDS[low]
        old: int = getattr(q, field)
        if offset == low:
            setattr(q, field, (old & ~0xFFFF_FFFF) | value)
        else:
            setattr(q, field, (old & 0xFFFF_FFFF) | value << 32)

    def _notify_write(self, offset: int, size: int, value: int) -> None:
        index, rest = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if rest or size != 2:
            self.problem(f"{size}-byte notification at +{offset}: notifications are 2-byte "
                         f"writes at multiples of {NOTIFY_OFF_MULTIPLIER}")
            return
        if value != index:
            self.problem(f"notification at the address of queue {index} carries {value}")
        self.kick(index)

    def reset(self) -> None:
        super().reset()
        self._dfselect = self._gfselect = 0
