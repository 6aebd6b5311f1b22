"""The virtio-blk data path for the requests Linux sends all day, with nothing in between.

A Linux guest's read or write is a chain of exactly three descriptors (usually an indirect
table): the 16-byte header, the data and the status byte. :class:`BlkFastLane` serves such
chains straight from the ring memory the ring's batch pop describes: one ``struct`` unpack,
one ``os.preadv`` / ``os.pwritev`` between the image and guest memory, the status byte and
the used element written in place; no chain, request or list object per request. At queue
depth 1 over vhost-user that halves the Python work per request (what the benchmark against
qemu-storage-daemon measures).

The lane adds speed, not rules: it only decides that a chain is *ordinary* (length, range,
alignment, type), never that it is wrong; the first chain it does not take is un-popped and
everything from there goes to the ring's own pop and :meth:`BlkDevice.handle`, which give
the verdicts. It is the device's :meth:`~pyvirtio.device.base.VirtioDevice.fast_lane`: the
serving engine publishes what it completed and owns notification, tracking and batch mode.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pyvirtio.device.engine import Completion, RequestTracker
from pyvirtio.ring import DeviceRing
from pyvirtio.spec import blk as B

if TYPE_CHECKING:
    from pyvirtio.device.blk.device import BlkDevice

_T_IN = B.VIRTIO_BLK_T_IN
_T_OUT = B.VIRTIO_BLK_T_OUT
_HDR = B.outhdr_struct("<")
_preadv = os.preadv
_pwritev = os.pwritev
_hdr = _HDR.unpack_from

#: what :meth:`BlkDevice.lane_config` gives a lane at each drain: the back-end's fast fd,
#: its mapped image, the capacity in bytes, the block and sector alignment masks, whether
#: writes may complete without a sync, and the back-end
LaneConfig = tuple[int, "memoryview | None", int, int, int, bool, Any]


class BlkFastLane:
    """The fast path of a :class:`BlkDevice` (see the module doc); only for synchronous
    back-ends."""

    __slots__ = ("device",)

    def __init__(self, device: BlkDevice) -> None:
        self.device = device

    def serve(self, ring: DeviceRing, done: list[Completion],
              tracker: RequestTracker | None) -> bool:
        """Serve the short chains the ring hands out in a batch
        (:meth:`~pyvirtio.ring.split.DeviceQueue.pop_short`) into ``done``; stop at the
        first chain that is not an ordinary read or write, un-popped, for
        :meth:`BlkDevice.handle` (True), or when nothing is left (False)."""
        device = self.device
        (fd, image, size, lbs_mask, sector_mask, fast_write,
         backend) = device._lane_config or device.lane_config()
        reads = writes = bytes_read = bytes_written = 0
        append = done.append
        pop_short = ring.pop_short
        try:
            batch = pop_short()
            if batch:
                for i, (head, buf, o0, l0, o1, l1, w1, o2, l2) in enumerate(batch):
                    if l0 == 16 and l2 == 1:
                        rtype, _ioprio, sector = _hdr(buf, o0)
                        offset = sector << 9
                        if l1 & lbs_mask or sector & sector_mask or offset + l1 > size:
                            pass  # handle() answers IOERR
                        elif w1:
                            if rtype == _T_IN:
                                if tracker is not None:
                                    tracker.popped(head)
                                if image is not None:
                                    # size <= len(image): offset + l1 is inside it
                                    buf[o1 : o1 + l1] = image[offset : offset + l1]
                                    n = l1
                                else:
                                    try:
                                        n = (_preadv(fd, (buf[o1 : o1 + l1],), offset)
                                             if fd >= 0 else
                                             _readv(backend, offset, buf[o1 : o1 + l1], l1))
                                    except OSError:
                                        n = -1  # handle() retries and reports it
                                if n == l1:
                                    buf[o2] = 0
                                    append((head, l1 + 1))
                                    reads += 1
                                    bytes_read += l1
                                    continue
                        elif rtype == _T_OUT and fast_write:
                            if tracker is not None:
                                tracker.popped(head)
                            try:
                                n = (_pwritev(fd, (buf[o1 : o1 + l1],), offset) if fd >= 0
                                     else _writev(backend, offset, buf[o1 : o1 + l1], l1))
                            except OSError:
                                n = -1
                            if n == l1:
                                buf[o2] = 0
                                append((head, 1))
                                writes += 1
                                bytes_written += l1
                                continue
                    # anything else: un-popped (with the rest), for the general path
                    ring.rewind(len(batch) - i)
                    return True
            return ring.pending() != 0  # a chain that is not short: for handle()
        finally:
            if reads or writes:
                stats = device.stats
                stats.reads += reads
                stats.writes += writes
                stats.bytes_read += bytes_read
                stats.bytes_written += bytes_written


def _readv(backend: object, offset: int, view: memoryview, length: int) -> int:
    backend.readv(offset, (view,), length)  # type: ignore[attr-defined]
    return length


def _writev(backend: object, offset: int, view: memoryview, length: int) -> int:
    backend.writev(offset, (view,), length)  # type: ignore[attr-defined]
    return length
