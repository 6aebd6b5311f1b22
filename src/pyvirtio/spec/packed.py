"""The packed virtqueue layout (VIRTIO 1.x §2.8; Linux ``uapi/linux/virtio_ring.h``).

One descriptor ring of ``struct pvirtq_desc`` written by both sides, plus two event
suppression structures: the driver's (written by the driver, read by the device) and the
device's. Availability and use are signalled by the AVAIL/USED flag bits compared against
each side's wrap counter.
"""

from __future__ import annotations

import struct
from functools import cache

from pyvirtio.spec import LE, Endian

# Bit numbers in pvirtq_desc.flags (NEXT/WRITE/INDIRECT share values with the split ring).
VRING_PACKED_DESC_F_AVAIL = 7
VRING_PACKED_DESC_F_USED = 15

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

# pvirtq_event_suppress.flags values
VRING_PACKED_EVENT_FLAG_ENABLE = 0
VRING_PACKED_EVENT_FLAG_DISABLE = 1
VRING_PACKED_EVENT_FLAG_DESC = 2
# In pvirtq_event_suppress.off_wrap, bit 15 is the wrap counter; bits 0-14 the offset.
VRING_PACKED_EVENT_F_WRAP_CTR = 15

PACKED_DESC_SIZE = 16
EVENT_SUPPRESS_SIZE = 4
MAX_QUEUE_SIZE = 32768


@cache
def desc_struct(endian: Endian = LE) -> struct.Struct:
    """``struct pvirtq_desc``: addr (u64), len (u32), id (u16), flags (u16)."""
    return struct.Struct(endian + "QIHH")


@cache
def event_suppress_struct(endian: Endian = LE) -> struct.Struct:
    """``struct pvirtq_event_suppress``: off_wrap (u16), flags (u16)."""
    return struct.Struct(endian + "HH")


def ring_size(num: int) -> int:
    return PACKED_DESC_SIZE * num


def is_valid_queue_size(num: int) -> bool:
    """Packed queue sizes need not be powers of two: 1..32768."""
    return 0 < num <= MAX_QUEUE_SIZE
