"""Sans-I/O virtqueues: memory is passed in, the ring never notifies, sleeps or opens files.

:mod:`pyvirtio.ring.queue` defines the interface devices and drivers use (DeviceRing,
DriverRing); :mod:`pyvirtio.ring.split` implements it for the split ring (DeviceQueue,
DriverQueue) and :mod:`pyvirtio.ring.packed` for the packed ring (PackedDeviceQueue,
PackedDriverQueue), with the same methods and semantics.
"""

from pyvirtio.ring.chain import DescriptorChain, gather, scatter
from pyvirtio.ring.errors import QueueFullError, QueueUsageError, RingError
from pyvirtio.ring.factory import device_ring, driver_ring, fresh_base, is_packed
from pyvirtio.ring.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.ring.queue import DeviceRing, DriverRing, ShortChain, WritableBuffer
from pyvirtio.ring.split import DeviceQueue, DriverQueue

__all__ = [
    "DescriptorChain",
    "DeviceQueue",
    "DeviceRing",
    "DriverQueue",
    "DriverRing",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "QueueFullError",
    "QueueUsageError",
    "RingError",
    "ShortChain",
    "WritableBuffer",
    "device_ring",
    "driver_ring",
    "fresh_base",
    "gather",
    "is_packed",
    "scatter",
]
