"""Sans-I/O virtqueues: memory is passed in, the ring never notifies, sleeps or opens files.

:mod:`pyvirtio.ring.split` holds the split ring's DriverQueue and DeviceQueue;
:mod:`pyvirtio.ring.packed` the packed ring's PackedDriverQueue and PackedDeviceQueue, with
the same methods and semantics.
"""

from pyvirtio.ring.chain import DescriptorChain, gather, scatter
from pyvirtio.ring.errors import QueueFullError, QueueUsageError, RingError
from pyvirtio.ring.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.ring.split import DeviceQueue, DriverQueue

__all__ = [
    "DescriptorChain",
    "DeviceQueue",
    "DriverQueue",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "QueueFullError",
    "QueueUsageError",
    "RingError",
    "gather",
    "scatter",
]
