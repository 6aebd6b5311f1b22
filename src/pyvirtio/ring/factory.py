"""Which ring a queue runs on: the negotiated features decide (split or packed).

The one place that turns negotiated features into a ring object, for both ends, so that
devices, drivers and transports never name a ring format: RING_PACKED selects
:mod:`pyvirtio.ring.packed`, otherwise :mod:`pyvirtio.ring.split`; INDIRECT_DESC,
EVENT_IDX and IN_ORDER become the ring's options.
"""

from __future__ import annotations

from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring.packed import FRESH, PackedDeviceQueue, PackedDriverQueue
from pyvirtio.ring.queue import DeviceRing, DriverRing
from pyvirtio.ring.split import DeviceQueue, DriverQueue
from pyvirtio.spec import LE, Endian
from pyvirtio.spec import features as F
from pyvirtio.spec import packed as P
from pyvirtio.spec import split as SP


def is_packed(features: int) -> bool:
    """Whether ``features`` (negotiated) make every queue a packed ring."""
    return F.has(features, F.RING_PACKED)


def fresh_base(features: int) -> int:
    """The ring position a queue starts at (vhost-user SET_VRING_BASE for a new ring):
    avail index 0 for a split ring, position 0 with wrap counter 1 for a packed one."""
    return FRESH if is_packed(features) else 0


def driver_areas(features: int, size: int) -> tuple[tuple[int, int], ...]:
    """``(bytes, alignment)`` of the descriptor area, driver area and device area a driver
    allocates for a ring of ``size`` (VIRTIO 1.x §2.7, §2.8: the split ring's descriptor
    table, avail and used rings; the packed ring's descriptor ring and two event
    suppression structures)."""
    if is_packed(features):
        return ((P.ring_size(size), 16), (P.EVENT_SUPPRESS_SIZE, 4),
                (P.EVENT_SUPPRESS_SIZE, 4))
    return ((SP.desc_table_size(size), SP.DESC_ALIGN), (SP.avail_size(size), SP.AVAIL_ALIGN),
            (SP.used_size(size), 4096))


def device_ring(
    features: int,
    memory: GuestMemory,
    size: int,
    desc: int,
    driver_area: int,
    device_area: int,
    *,
    endian: Endian = LE,
    last_avail_idx: int | None = None,
    used_idx: int | None = None,
    name: str = "queue",
) -> DeviceRing:
    """The device side of a queue on the ring format ``features`` negotiated.
    ``last_avail_idx`` None starts a fresh ring (:func:`fresh_base`)."""
    start = fresh_base(features) if last_avail_idx is None else last_avail_idx
    cls = PackedDeviceQueue if is_packed(features) else DeviceQueue
    ring: DeviceRing = cls(memory, size, desc, driver_area, device_area,
                           event_idx=F.has(features, F.EVENT_IDX),
                           indirect=F.has(features, F.INDIRECT_DESC),
                           in_order=F.has(features, F.IN_ORDER), endian=endian,
                           last_avail_idx=start, used_idx=used_idx, name=name)
    return ring


def driver_ring(
    features: int,
    memory: GuestMemory,
    size: int,
    desc: int,
    driver_area: int,
    device_area: int,
    *,
    allocator: Allocator | None = None,
    name: str = "queue",
) -> DriverRing:
    """The driver side of a queue on the ring format ``features`` negotiated."""
    cls = PackedDriverQueue if is_packed(features) else DriverQueue
    ring: DriverRing = cls(memory, size, desc, driver_area, device_area,
                           event_idx=F.has(features, F.EVENT_IDX),
                           indirect=F.has(features, F.INDIRECT_DESC),
                           in_order=F.has(features, F.IN_ORDER), allocator=allocator,
                           name=name)
    return ring
