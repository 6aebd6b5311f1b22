"""Shared helpers for the ring tests: a driver queue and a device queue on one ring."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DeviceQueue, DriverQueue
from pyvirtio.ring.packed import FRESH, PackedDeviceQueue, PackedDriverQueue
from pyvirtio.spec import LE, Endian
from pyvirtio.spec import packed as P
from pyvirtio.spec import split as S

U16 = struct.Struct("<H")
DESC = struct.Struct("<QIHH")
ELEM = struct.Struct("<II")


@dataclass
class RingPair:
    """Both ends of one split ring in fresh guest memory. ``alloc`` hands out the rest of
    memory (indirect tables, buffers)."""

    memory: GuestMemory
    alloc: Allocator
    driver: DriverQueue
    device: DeviceQueue

    # Raw views of the shared ring fields, read the way the other side would.
    def avail_flags(self) -> int:
        return int.from_bytes(self.memory.read(self.driver.avail_addr, 2), "little")

    def avail_idx(self) -> int:
        return int.from_bytes(self.memory.read(self.driver.avail_addr + 2, 2), "little")

    def used_event(self) -> int:
        off = S.used_event_offset(self.driver.size)
        return int.from_bytes(self.memory.read(self.driver.avail_addr + off, 2), "little")

    def used_flags(self) -> int:
        return int.from_bytes(self.memory.read(self.driver.used_addr, 2), "little")

    def used_idx(self) -> int:
        return int.from_bytes(self.memory.read(self.driver.used_addr + 2, 2), "little")

    def avail_event(self) -> int:
        off = S.avail_event_offset(self.driver.size)
        return int.from_bytes(self.memory.read(self.driver.used_addr + off, 2), "little")

    def desc(self, index: int) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = DESC.unpack(self.memory.read(self.driver.desc_addr
                                                                + 16 * index, 16))
        return addr, length, flags, nxt

    def avail_entry(self, slot: int) -> int:
        return int.from_bytes(self.memory.read(self.driver.avail_addr + 4 + 2 * slot, 2),
                              "little")

    def used_elem(self, slot: int) -> tuple[int, int]:
        head, length = ELEM.unpack(self.memory.read(self.driver.used_addr + 4 + 8 * slot, 8))
        return head, length

    def write_used(self, slot: int, head: int, length: int, idx: int | None = None) -> None:
        """Play a hostile device: write a used element (and optionally used->idx) directly."""
        self.memory.write(self.driver.used_addr + 4 + 8 * slot, ELEM.pack(head, length))
        if idx is not None:
            self.memory.write(self.driver.used_addr + 2, U16.pack(idx))

    def close(self) -> None:
        self.memory.close()


def make_pair(size: int, *, event_idx: bool = False, indirect: bool = False,
              start_idx: int = 0, memory_size: int = 1 << 20, endian: Endian = LE,
              device_indirect: bool | None = None) -> RingPair:
    """A ring of ``size`` at the bottom of fresh memory, both ends started on it (the
    device at ``start_idx`` too)."""
    memory = GuestMemory.anonymous(memory_size)
    alloc = Allocator(0, memory_size)
    desc = alloc.alloc(S.desc_table_size(size), S.DESC_ALIGN)
    avail = alloc.alloc(S.avail_size(size), S.AVAIL_ALIGN)
    used = alloc.alloc(S.used_size(size), 4096)
    driver = DriverQueue(memory, size, desc, avail, used, event_idx=event_idx,
                         indirect=indirect, allocator=alloc, endian=endian,
                         start_idx=start_idx, name="drv")
    device = DeviceQueue(memory, size, desc, avail, used, event_idx=event_idx,
                         indirect=indirect if device_indirect is None else device_indirect,
                         endian=endian, last_avail_idx=start_idx, name="dev")
    return RingPair(memory, alloc, driver, device)


@dataclass
class AnyPair:
    """Both ends of one ring of either format in fresh guest memory (``fmt`` is "split" or
    "packed"); the same calls drive both."""

    fmt: str
    memory: GuestMemory
    alloc: Allocator
    driver: DriverQueue | PackedDriverQueue
    device: DeviceQueue | PackedDeviceQueue

    def close(self) -> None:
        self.memory.close()


def make_any_pair(fmt: str, size: int, *, event_idx: bool = False, indirect: bool = False,
                  in_order: bool = False, start: int | None = None,
                  memory_size: int = 1 << 20) -> AnyPair:
    """A ring of ``fmt`` at the bottom of fresh memory, both ends started on it. ``start``:
    split, the free-running index (default 0); packed, ``position | wrap << 15`` (default
    a fresh ring)."""
    memory = GuestMemory.anonymous(memory_size)
    alloc = Allocator(0, memory_size)
    driver: DriverQueue | PackedDriverQueue
    device: DeviceQueue | PackedDeviceQueue
    if fmt == "split":
        desc = alloc.alloc(S.desc_table_size(size), S.DESC_ALIGN)
        avail = alloc.alloc(S.avail_size(size), S.AVAIL_ALIGN)
        used = alloc.alloc(S.used_size(size), 4096)
        s = start or 0
        driver = DriverQueue(memory, size, desc, avail, used, event_idx=event_idx,
                             indirect=indirect, in_order=in_order, allocator=alloc,
                             start_idx=s, name="drv")
        device = DeviceQueue(memory, size, desc, avail, used, event_idx=event_idx,
                             indirect=indirect, in_order=in_order, last_avail_idx=s,
                             name="dev")
    else:
        desc = alloc.alloc(P.ring_size(size), 16)
        drv_area = alloc.alloc(P.EVENT_SUPPRESS_SIZE, 4)
        dev_area = alloc.alloc(P.EVENT_SUPPRESS_SIZE, 4)
        s = FRESH if start is None else start
        driver = PackedDriverQueue(memory, size, desc, drv_area, dev_area, event_idx=event_idx,
                                   indirect=indirect, in_order=in_order, allocator=alloc,
                                   start_idx=s, name="drv")
        device = PackedDeviceQueue(memory, size, desc, drv_area, dev_area,
                                   event_idx=event_idx, indirect=indirect, in_order=in_order,
                                   last_avail_idx=s, name="dev")
    return AnyPair(fmt, memory, alloc, driver, device)
