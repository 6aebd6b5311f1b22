"""Sans-I/O virtqueues: memory is passed in, the ring never notifies, sleeps or opens files.

:mod:`pyvirtio.ring.split` holds the split ring's DriverQueue and DeviceQueue.
"""

from pyvirtio.ring.chain import DescriptorChain, gather, scatter
from pyvirtio.ring.errors import QueueFullError, QueueUsageError, RingError
from pyvirtio.ring.split import DeviceQueue, DriverQueue

__all__ = [
    "DescriptorChain",
    "DeviceQueue",
    "DriverQueue",
    "QueueFullError",
    "QueueUsageError",
    "RingError",
    "gather",
    "scatter",
]
