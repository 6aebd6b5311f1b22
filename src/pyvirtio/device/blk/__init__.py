"""The block device (virtio-blk, VIRTIO 1.x §5.2; Linux ``uapi/linux/virtio_blk.h``).

A request is one descriptor chain: a readable 16-byte header (type, ioprio, sector), then
data (writable for IN and GET_ID, readable for OUT, DISCARD and WRITE_ZEROES), then one
writable status byte, the *last* writable byte of the chain.

Three steps, kept apart so storage can be swapped and tested on its own:

1. :func:`parse_request` turns a chain into a :class:`BlkRequest` (zero-copy: the request
   holds memoryviews into guest memory). A chain that cannot carry a request at all (no
   writable status byte, header shorter than 16 bytes) raises :class:`BlkFramingError`; the
   device framework then breaks the queue and sets DEVICE_NEEDS_RESET, as QEMU does.
2. :meth:`BlkDevice.check` applies the protocol rules (capacity, read-only, alignment,
   discard limits, negotiated features) and answers IOERR / UNSUPP without touching storage.
3. A :class:`BlkBackend` runs what is left: synchronously (:meth:`BlkBackend.execute`, the
   fast path) or asynchronously (:meth:`BlkBackend.submit` with a completion callback, for a
   future io_uring or thread-pool back-end); the device then writes the status byte and
   returns the chain with its used length.

The common case skips the three steps' objects: Linux's reads and writes (a header, the
data and a status byte, on a back-end with a plain fd) are served by
:class:`~pyvirtio.device.blk.fastpath.BlkFastLane` straight from the ring memory, with the
same checks and results; everything else takes the steps above. Draining, batching,
interrupts, request tracking for reconnection and batch mode are the serving engine's
(:mod:`pyvirtio.device.engine`), as for every device.

The used length is always the whole writable part of the chain: on success the data area is
filled (IN, GET_ID); on failure, and for writable bytes the request type does not use, the
device zeroes them first. So "the first ``len`` writable bytes were written" (§2.7.8) holds
and the status byte is covered by ``len``.

Cache modes (§5.2.6.2): a write is made stable before completion ("writethrough": the
backend calls ``fdatasync`` after it) when CONFIG_WCE was negotiated and ``writeback`` is 0,
or when FLUSH was offered but neither FLUSH nor CONFIG_WCE were negotiated. Otherwise the
driver flushes explicitly. Offering no FLUSH at all (``flush=False``) makes the device fast
and unsafe across host crashes, which the spec allows only in that configuration.
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
