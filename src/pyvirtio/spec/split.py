"""The split virtqueue layout (VIRTIO 1.x §2.7; Linux ``uapi/linux/virtio_ring.h``).

Three areas, each owned by one side::

    descriptor table  num * 16 bytes      (driver writes)   struct vring_desc
    avail ring        6 + 2 * num bytes   (driver writes)   flags, idx, ring[num], used_event
    used ring         6 + 8 * num bytes   (device writes)   flags, idx, ring[num], avail_event

Legacy transports place the three contiguously with the used ring aligned to ``align``
(4096 for legacy PCI); that total is :func:`vring_size`. VERSION_1 transports give each area
its own address with alignments 16, 2 and 4.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache

from pyvirtio.spec import LE, Endian

# struct vring_desc flags
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

# avail->flags and used->flags
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VRING_DESC_SIZE = 16
VRING_USED_ELEM_SIZE = 8
VRING_AVAIL_HEADER = 4  # flags, idx
VRING_USED_HEADER = 4  # flags, idx

# Minimum alignment of each area for VERSION_1 (§2.7, "Virtqueue Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
LEGACY_ALIGN = 4096
MAX_QUEUE_SIZE = 32768


@cache
def desc_struct(endian: Endian = LE) -> struct.Struct:
    """``struct vring_desc``: addr (u64), len (u32), flags (u16), next (u16)."""
    return struct.Struct(endian + "QIHH")


@cache
def used_elem_struct(endian: Endian = LE) -> struct.Struct:
    """``struct vring_used_elem``: id (u32), len (u32)."""
    return struct.Struct(endian + "II")


@cache
def u16_struct(endian: Endian = LE) -> struct.Struct:
    return struct.Struct(endian + "H")


def desc_table_size(num: int) -> int:
    return VRING_DESC_SIZE * num


def avail_size(num: int) -> int:
    """Bytes of the avail ring including the trailing ``used_event`` field."""
    return VRING_AVAIL_HEADER + 2 * num + 2


def used_size(num: int) -> int:
    """Bytes of the used ring including the trailing ``avail_event`` field."""
    return VRING_USED_HEADER + VRING_USED_ELEM_SIZE * num + 2


def used_event_offset(num: int) -> int:
    """Offset of ``used_event`` from the start of the avail ring."""
    return VRING_AVAIL_HEADER + 2 * num


def avail_event_offset(num: int) -> int:
    """Offset of ``avail_event`` from the start of the used ring."""
    return VRING_USED_HEADER + VRING_USED_ELEM_SIZE * num


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def vring_size(num: int, align: int = LEGACY_ALIGN) -> int:
    """Total bytes of a contiguous legacy vring (Linux ``vring_size()``)."""
    return align_up(desc_table_size(num) + avail_size(num), align) + used_size(num)


@dataclass(frozen=True)
class LegacyLayout:
    """Offsets of the three areas in a contiguous legacy vring (Linux ``vring_init()``)."""

    num: int
    align: int = LEGACY_ALIGN

    @property
    def desc(self) -> int:
        return 0

    @property
    def avail(self) -> int:
        return desc_table_size(self.num)

    @property
    def used(self) -> int:
        return align_up(self.avail + avail_size(self.num), self.align)

    @property
    def size(self) -> int:
        return vring_size(self.num, self.align)


def is_valid_queue_size(num: int) -> bool:
    """Split queue sizes are powers of two from 1 to 32768."""
    return 0 < num <= MAX_QUEUE_SIZE and num & (num - 1) == 0


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """Whether moving an index from ``old`` to ``new_idx`` crossed ``event_idx`` (mod 2^16).

    The EVENT_IDX rule: notify iff ``event_idx`` lies in the half-open window
    ``[old, new_idx)``. All arithmetic is on free-running 16-bit indices.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old) & 0xFFFF
