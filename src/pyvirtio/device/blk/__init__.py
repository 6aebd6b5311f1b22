"""The block device (virtio-blk, VIRTIO 1.x §5.2; Linux ``uapi/linux/virtio_blk.h``).

A request is one chain: a readable 16-byte header, the data, and one writable status byte
(the chain's last). :meth:`BlkDevice.handle` takes three steps, kept apart so that storage
can be swapped and tested alone: :func:`parse_request` (zero-copy; a chain that cannot even
carry a status byte raises :class:`BlkFramingError`, which breaks the queue, as in QEMU),
:meth:`BlkDevice.check` (the protocol rules: IOERR / UNSUPP without touching storage), then
a :class:`BlkBackend` (synchronous ``execute`` or asynchronous ``submit``). Linux's plain
reads and writes skip the three objects: :class:`BlkFastLane` serves them straight from the
ring, with the same checks and results.

The used length is always the whole writable part: bytes a request does not fill (and the
data of a failed one) are zeroed, so "the first ``len`` bytes were written" (§2.7.8) holds.
Writes are made stable before completion (writethrough) when CONFIG_WCE was negotiated and
``writeback`` is 0, or when FLUSH was offered but neither FLUSH nor CONFIG_WCE negotiated;
``flush=False`` offers no FLUSH and never syncs (fast, unsafe across host crashes: the spec
allows it only then).
"""

from pyvirtio.device.blk.backend import (
    SECTOR_SIZE,
    BlkBackend,
    BlkFramingError,
    BlkRequest,
    Completion,
    parse_request,
    zero_views,
)
from pyvirtio.device.blk.device import BlkDevice, BlkStats
from pyvirtio.device.blk.fastpath import BlkFastLane
from pyvirtio.device.blk.file import FileBackend
from pyvirtio.device.engine import RequestTracker

__all__ = [
    "SECTOR_SIZE",
    "BlkBackend",
    "BlkDevice",
    "BlkFastLane",
    "BlkFramingError",
    "BlkRequest",
    "BlkStats",
    "Completion",
    "FileBackend",
    "RequestTracker",
    "parse_request",
    "zero_views",
]
