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
:class:`~pyvirtio.device.blk_fastpath.BlkFastLane` straight from the ring memory, with the
same checks and results; everything else takes the steps above. A vhost-user front-end
that negotiated INFLIGHT_SHMFD gets every popped and completed head reported to a
:class:`RequestTracker`, and a restarted back-end resubmits what its predecessor left in
flight (:meth:`BlkDevice.track_requests`).

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

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvirtio.device.base import LIVE_MASK, ConfigAccessError, VirtioDevice
from pyvirtio.device.blk_fastpath import BlkFastLane, LaneConfig
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.ring import DescriptorChain, DeviceRing, RingError
from pyvirtio.ring.chain import gather, scatter, split_segments
from pyvirtio.spec import LE, ids
from pyvirtio.spec import blk as B
from pyvirtio.spec import status as S

log = logging.getLogger("pyvirtio.device.blk")

SECTOR_SIZE = B.SECTOR_SIZE
_OUTHDR = B.outhdr_struct(LE)
_SEGMENT = B.discard_write_zeroes_struct(LE)
_OUTHDR_SIZE = B.OUTHDR_SIZE
_SEGMENT_SIZE = B.DISCARD_WRITE_ZEROES_SIZE

T_IN = B.VIRTIO_BLK_T_IN
T_OUT = B.VIRTIO_BLK_T_OUT
T_FLUSH = B.VIRTIO_BLK_T_FLUSH
T_GET_ID = B.VIRTIO_BLK_T_GET_ID
T_DISCARD = B.VIRTIO_BLK_T_DISCARD
T_WRITE_ZEROES = B.VIRTIO_BLK_T_WRITE_ZEROES
S_OK = B.VIRTIO_BLK_S_OK
S_IOERR = B.VIRTIO_BLK_S_IOERR
S_UNSUPP = B.VIRTIO_BLK_S_UNSUPP

#: request types whose data the device reads (everything else: the device writes the data)
_READABLE_DATA_TYPES = frozenset(
    {T_OUT, T_DISCARD, T_WRITE_ZEROES, B.VIRTIO_BLK_T_SECURE_ERASE}
)

# QEMU's defaults: a request of up to 2^22 - 1 sectors (just under 2 GiB).
DEFAULT_MAX_DISCARD_SECTORS = (1 << 22) - 1
DEFAULT_MAX_WRITE_ZEROES_SECTORS = (1 << 22) - 1
DEFAULT_MAX_DISCARD_SEG = 32
DEFAULT_MAX_WRITE_ZEROES_SEG = 32
DEFAULT_SIZE_MAX = 1 << 20
DEFAULT_SERIAL = "pyvirtio-blk"

FEATURE_NAMES = {
    B.VIRTIO_BLK_F_SIZE_MAX: "SIZE_MAX",
    B.VIRTIO_BLK_F_SEG_MAX: "SEG_MAX",
    B.VIRTIO_BLK_F_GEOMETRY: "GEOMETRY",
    B.VIRTIO_BLK_F_RO: "RO",
    B.VIRTIO_BLK_F_BLK_SIZE: "BLK_SIZE",
    B.VIRTIO_BLK_F_FLUSH: "FLUSH",
    B.VIRTIO_BLK_F_TOPOLOGY: "TOPOLOGY",
    B.VIRTIO_BLK_F_CONFIG_WCE: "CONFIG_WCE",
    B.VIRTIO_BLK_F_MQ: "MQ",
    B.VIRTIO_BLK_F_DISCARD: "DISCARD",
    B.VIRTIO_BLK_F_WRITE_ZEROES: "WRITE_ZEROES",
}

_ZEROS = bytes(64 << 10)


class RequestTracker(Protocol):
    """Follows the heads of a queue from pop to completion, so that what was in flight can
    be found again if this process dies (vhost-user INFLIGHT_SHMFD: the tracker writes a
    shared region the front-end keeps; see :mod:`pyvirtio.transport.vhost_user.inflight`)."""

    def popped(self, head: int) -> None:
        """``head`` was taken from the avail ring."""

    def completing(self, heads: Sequence[int]) -> None:
        """``heads`` are about to be published in the used ring (one used->idx store)."""

    def completed(self, heads: Sequence[int], used_idx: int) -> None:
        """``heads`` were published; used->idx is now ``used_idx``."""


class BlkFramingError(PeerError):
    """A chain that cannot be a blk request: the driver broke the framing rules, so the
    request cannot even be answered with a status byte."""


# ---- the parsed request -----------------------------------------------------------------


class BlkRequest:
    """One parsed request, ready for a back-end.

    ``data`` are zero-copy views of the data area (guest memory): the bytes to write for
    OUT, the buffer to fill for IN and GET_ID, the raw segment array for DISCARD and
    WRITE_ZEROES. After :meth:`BlkDevice.check` accepted it, ``offset``/``length`` are the
    byte range of an IN/OUT and ``ranges`` the ``(offset, length, unmap)`` byte ranges of a
    DISCARD/WRITE_ZEROES, all already inside the capacity. ``sync`` asks the back-end to make
    a modification stable (fdatasync) before reporting success: writethrough mode.
    """

    __slots__ = (
        "chain",
        "data",
        "data_len",
        "error",
        "length",
        "offset",
        "pad",
        "queue",
        "ranges",
        "ring",
        "sector",
        "status_view",
        "sync",
        "type",
    )

    def __init__(self, queue: int, chain: DescriptorChain, rtype: int, sector: int,
                 data: list[memoryview], data_len: int, status_view: memoryview,
                 pad: list[memoryview] | None) -> None:
        self.queue = queue
        self.chain = chain
        self.type = rtype
        self.sector = sector
        self.data = data
        self.data_len = data_len
        self.status_view = status_view
        self.pad = pad  # writable bytes before the status that this type does not fill
        self.offset = 0
        self.length = 0
        self.ranges: list[tuple[int, int, bool]] | None = None
        self.sync = False
        self.ring: DeviceRing | None = None
        self.error: OSError | None = None

    def __repr__(self) -> str:
        return (f"BlkRequest(queue={self.queue}, head={self.chain.head}, type={self.type}, "
                f"sector={self.sector}, data_len={self.data_len})")


def parse_request(queue: int, chain: DescriptorChain) -> BlkRequest:
    """Split a chain into header, data and status byte (no copies, no validation of the
    request's meaning). Raises :class:`BlkFramingError` for a chain without a writable
    status byte or with fewer than 16 readable header bytes."""
    writable = chain.writable
    if not writable:
        raise BlkFramingError(
            f"chain {chain.head} has no writable status byte "
            f"({chain.readable_len} readable bytes, 0 writable)"
        )
    readable = chain.readable
    first = readable[0] if readable else None
    if first is not None and len(first) >= _OUTHDR_SIZE:
        rtype, _ioprio, sector = _OUTHDR.unpack_from(first)
    elif chain.readable_len >= _OUTHDR_SIZE:
        rtype, _ioprio, sector = _OUTHDR.unpack(gather(readable, _OUTHDR_SIZE))
    else:
        raise BlkFramingError(
            f"chain {chain.head} has a {chain.readable_len}-byte request header, shorter "
            f"than the {_OUTHDR_SIZE}-byte virtio_blk_outhdr"
        )
    last = writable[-1]
    status_view = last if len(last) == 1 else last[-1:]
    if rtype in _READABLE_DATA_TYPES:
        # Data follows the header in the readable part.
        if first is not None and len(first) == _OUTHDR_SIZE:
            data = readable[1:]
        else:
            _, data = split_segments(readable, _OUTHDR_SIZE)
        data_len = chain.readable_len - _OUTHDR_SIZE
        pad = _before_status(writable, last) if chain.writable_len > 1 else None
    else:
        # Data (if any) is the writable part before the status byte.
        data = _before_status(writable, last)
        data_len = chain.writable_len - 1
        pad = None
    return BlkRequest(queue, chain, rtype, sector, data, data_len, status_view, pad)


def _before_status(writable: list[memoryview], last: memoryview) -> list[memoryview]:
    """The writable views without the final status byte."""
    if len(last) == 1:
        return writable[:-1]
    return [*writable[:-1], last[:-1]]


def zero_views(views: Sequence[memoryview]) -> None:
    """Fill views with zero bytes (error paths only: it copies from a shared zero block)."""
    zlen = len(_ZEROS)
    for view in views:
        n = len(view)
        pos = 0
        while pos < n:
            take = min(zlen, n - pos)
            view[pos : pos + take] = _ZEROS[:take]
            pos += take


# ---- storage back-ends ------------------------------------------------------------------

#: callback an asynchronous back-end calls when a request is done: (request, status)
Completion = Callable[[BlkRequest, int], None]


class BlkBackend:
    """The storage behind a :class:`BlkDevice`.

    A back-end sees only requests the device already validated: byte offsets and lengths
    inside :attr:`size`, aligned to :attr:`block_size`. It raises ``OSError`` for storage
    failures; :meth:`execute` turns those into IOERR (the guest sees an I/O error, the
    process keeps running).

    Synchronous back-ends implement the five primitives (:meth:`readv`, :meth:`writev`,
    :meth:`flush`, :meth:`discard`, :meth:`write_zeroes`). An asynchronous one (io_uring,
    a thread pool) sets :attr:`asynchronous`, overrides :meth:`submit` to start the I/O and
    calls ``done(request, status)`` later from the event loop's thread, and makes
    :meth:`drain` wait for everything in flight (called on device reset, before guest memory
    may go away).
    """

    #: whether :meth:`submit` completes later (True) or :meth:`execute` answers at once
    asynchronous: bool = False
    read_only: bool = False
    #: the smallest unit of I/O (offsets and lengths are multiples); >= 512, a power of two
    block_size: int = SECTOR_SIZE
    #: physical block size (a hint for the guest: TOPOLOGY)
    physical_block_size: int = SECTOR_SIZE
    #: whether discard can give space back (otherwise discards succeed as no-ops)
    can_discard: bool = False
    #: a file descriptor the device may ``os.preadv``/``os.pwritev`` directly for any
    #: validated IN/OUT request (no alignment constraints beyond the block size, no
    #: bookkeeping in :meth:`readv`/:meth:`writev`), or -1: the device's inline fast path
    #: for reads and writes uses it, everything else goes through :meth:`execute`
    fast_fd: int = -1
    #: the whole image mapped read-only, if the back-end serves reads as copies from it
    #: (the fast path copies IN data straight from here); None: read with readv
    read_map: memoryview | None = None

    @property
    def size(self) -> int:
        """Bytes of storage exposed (a multiple of :attr:`block_size`)."""
        raise NotImplementedError

    def refresh_size(self) -> int:
        """Re-read the size of the storage (it was resized); returns :attr:`size`."""
        return self.size

    def readv(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        """Fill ``views`` (``length`` bytes in total) from ``offset``."""
        raise NotImplementedError

    def writev(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        """Store ``views`` (``length`` bytes in total) at ``offset``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make every completed write stable."""
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        """Give back the space of a range (its contents become unspecified)."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeroes; ``unmap`` allows deallocating it."""
        raise NotImplementedError

    def execute(self, req: BlkRequest) -> int:
        """Run a validated request now; returns the status byte."""
        try:
            rtype = req.type
            if rtype == T_IN:
                self.readv(req.offset, req.data, req.length)
                return S_OK
            if rtype == T_OUT:
                self.writev(req.offset, req.data, req.length)
            elif rtype == T_FLUSH:
                self.flush()
                return S_OK
            elif rtype == T_DISCARD:
                for offset, length, _ in req.ranges or ():
                    self.discard(offset, length)
            elif rtype == T_WRITE_ZEROES:
                for offset, length, unmap in req.ranges or ():
                    self.write_zeroes(offset, length, unmap)
            else:
                return S_UNSUPP
            if req.sync:
                self.flush()
            return S_OK
        except OSError as exc:
            req.error = exc
            log.warning("blk back-end: %s of %s failed: %s", _type_name(req.type), req, exc)
            return S_IOERR

    def submit(self, req: BlkRequest, done: Completion) -> None:
        """Start a request and call ``done(req, status)`` when it finishes. The default
        runs it synchronously."""
        done(req, self.execute(req))

    def drain(self) -> None:
        """Wait until no request is in flight (device reset). Synchronous: nothing to do."""

    def close(self) -> None:
        """Release the storage."""


def _type_name(rtype: int) -> str:
    return {
        T_IN: "read",
        T_OUT: "write",
        T_FLUSH: "flush",
        T_GET_ID: "get-id",
        T_DISCARD: "discard",
        T_WRITE_ZEROES: "write-zeroes",
    }.get(rtype, f"type {rtype}")


# ---- the device -------------------------------------------------------------------------


@dataclass
class BlkStats:
    """Counters of completed requests, for tests and benchmarks."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    get_ids: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    ioerr: int = 0
    unsupp: int = 0
    batch_ticks: int = 0  # looks at a ring in batch mode (see blk_fastpath)


class BlkDevice(VirtioDevice):
    """virtio-blk over a :class:`BlkBackend` (or the path of a raw image file).

    Given a path, the device opens it as a raw image (``blk_file.FileBackend``, with
    ``read_only`` and ``direct`` for O_DIRECT) and closes it in :meth:`close`.
    ``num_queues`` > 1 offers MQ; every queue is served independently by the same back-end.
    ``writeback`` is the cache mode after reset when the driver negotiates CONFIG_WCE (it
    may change it through the config byte). ``read_only`` forces RO even on a writable
    back-end. ``flush=False`` offers no FLUSH (and then no CONFIG_WCE): writes are never
    synced, fast and unsafe. ``blk_size`` raises the logical block size (never below the
    back-end's). The discard and write-zeroes limits are published in config space and
    enforced: a request beyond them gets IOERR. ``batch_interval`` (seconds; needs a
    reactor) lets a queue that is kept busy switch from kicks to looking at its ring every
    ``batch_interval`` (batch mode, see :mod:`pyvirtio.device.blk_fastpath`). Every argument
    is JSON-friendly, so the device can be built in a child process (``ProcessDevicePair``).
    """

    device_id = ids.BLOCK
    feature_names = FEATURE_NAMES
    #: serve common reads and writes through :class:`BlkFastLane` (off: every request goes
    #: through :meth:`handle`, the reference behaviour the fast path is tested against)
    fast_path = True

    def __init__(
        self,
        backend: BlkBackend | str | os.PathLike[str],
        *,
        num_queues: int = 1,
        read_only: bool = False,
        direct: bool = False,
        serial: str | bytes = DEFAULT_SERIAL,
        writeback: bool = True,
        flush: bool = True,
        config_wce: bool = True,
        discard: bool = True,
        write_zeroes: bool = True,
        size_max: int = DEFAULT_SIZE_MAX,
        seg_max: int | None = None,
        blk_size: int | None = None,
        opt_io_size: int = 0,
        max_discard_sectors: int = DEFAULT_MAX_DISCARD_SECTORS,
        max_discard_seg: int = DEFAULT_MAX_DISCARD_SEG,
        max_write_zeroes_sectors: int = DEFAULT_MAX_WRITE_ZEROES_SECTORS,
        max_write_zeroes_seg: int = DEFAULT_MAX_WRITE_ZEROES_SEG,
        mmap_reads: bool = False,
        batch_interval: float | None = None,
        **kwargs: object,
    ) -> None:
        if num_queues < 1 or num_queues > 0xFFFF:
            raise LocalError(f"num_queues must be in 1..65535, not {num_queues}")
        if config_wce and not flush:
            # §5.2.5.2: CONFIG_WCE MUST NOT be offered without FLUSH.
            raise LocalError("CONFIG_WCE requires FLUSH")
        if isinstance(backend, BlkBackend):
            self.backend = backend
            self._owns_backend = False
        else:
            from pyvirtio.device.backends.blk_file import FileBackend

            self.backend = FileBackend(backend, read_only=read_only, direct=direct,
                                       mmap_reads=mmap_reads)
            self._owns_backend = True
        be = self.backend
        self.read_only = read_only or be.read_only
        lbs = max(blk_size or SECTOR_SIZE, be.block_size)
        if lbs < SECTOR_SIZE or lbs & (lbs - 1) or lbs % be.block_size:
            self.close()
            raise LocalError(f"block size {lbs} must be a power of two >= 512 and a multiple "
                             f"of the back-end's {be.block_size}")
        self.block_size = lbs
        #: seconds between looks at a ring in batch mode (see
        #: :mod:`pyvirtio.device.blk_fastpath`); None or 0: always kick-driven
        self.batch_interval = batch_interval
        self._lbs_mask = lbs - 1
        self._sector_mask = lbs // SECTOR_SIZE - 1
        offer_discard = discard and not self.read_only
        offer_wz = write_zeroes and not self.read_only
        features = (
            _bit(B.VIRTIO_BLK_F_SEG_MAX)
            | _bit(B.VIRTIO_BLK_F_BLK_SIZE)
            | _bit(B.VIRTIO_BLK_F_TOPOLOGY)
            | (_bit(B.VIRTIO_BLK_F_SIZE_MAX) if size_max else 0)
            | (_bit(B.VIRTIO_BLK_F_FLUSH) if flush else 0)
            | (_bit(B.VIRTIO_BLK_F_CONFIG_WCE) if config_wce else 0)
            | (_bit(B.VIRTIO_BLK_F_RO) if self.read_only else 0)
            | (_bit(B.VIRTIO_BLK_F_MQ) if num_queues > 1 else 0)
            | (_bit(B.VIRTIO_BLK_F_DISCARD) if offer_discard else 0)
            | (_bit(B.VIRTIO_BLK_F_WRITE_ZEROES) if offer_wz else 0)
        )
        super().__init__(num_queues, features, config_size=B.CONFIG_SIZE,
                         **kwargs)  # type: ignore[arg-type]
        queue_size = self.queues[0].max_size
        serial_bytes = serial.encode() if isinstance(serial, str) else bytes(serial)
        self.serial = serial_bytes[: B.VIRTIO_BLK_ID_BYTES]
        self.default_writeback = writeback
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg
        pbs = max(be.physical_block_size, lbs)
        self._size = 0
        self._writethrough = True  # until features are known, the safe mode
        self.stats = BlkStats()
        # Per queue: who records popped/completed heads (vhost-user inflight tracking), and
        # heads to run again before anything new (a restarted back-end's resubmissions).
        self._trackers: list[RequestTracker | None] = [None] * num_queues
        self._resubmit: dict[int, list[int]] = {}
        self._lanes: list[BlkFastLane | None] = [None] * num_queues
        # What the fast lanes read at every kick, rebuilt after anything in it changed.
        self._lane_config: LaneConfig | None = None
        B.config_struct(LE).pack_into(
            self.config, 0,
            0,  # capacity, set below
            size_max,
            seg_max if seg_max is not None else max(queue_size - 2, 1),
            0, 0, 0,  # geometry (not offered)
            lbs,
            (pbs // lbs).bit_length() - 1,  # physical_block_exp
            0,  # alignment_offset
            1,  # min_io_size, in logical blocks
            opt_io_size,
            1 if writeback else 0,
            num_queues,
            max_discard_sectors,
            max_discard_seg,
            max(pbs // SECTOR_SIZE, 1),  # discard_sector_alignment
            max_write_zeroes_sectors,
            max_write_zeroes_seg,
            1 if be.can_discard else 0,  # write_zeroes_may_unmap
            0, 0, 0,  # secure erase (not offered)
        )
        self._set_capacity(notify=False)

    # ---- capacity and cache mode --------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors."""
        return self._size // SECTOR_SIZE

    def _set_capacity(self, notify: bool) -> None:
        size = self.backend.refresh_size()
        size -= size & self._lbs_mask  # whole logical blocks only
        self._size = size
        self._lane_config = None
        self.update_config(B.CFG_CAPACITY, (size // SECTOR_SIZE).to_bytes(8, "little"),
                           notify=notify)

    def update_capacity(self) -> None:
        """Re-read the back-end's size (after a resize) and tell the driver."""
        self._set_capacity(notify=True)

    @property
    def writeback(self) -> bool:
        """The cache mode in the config byte (True: writeback)."""
        return bool(self.config[B.CFG_WRITEBACK])

    @property
    def writethrough(self) -> bool:
        """Whether every modification is made stable before it completes."""
        return self._writethrough

    def _update_cache_mode(self) -> None:
        self._lane_config = None
        offered_flush = bool(self.offered_features >> B.VIRTIO_BLK_F_FLUSH & 1)
        if not offered_flush:
            self._writethrough = False  # no FLUSH offered: explicitly unsafe (spec note)
        elif self.has_feature(B.VIRTIO_BLK_F_CONFIG_WCE):
            self._writethrough = not self.config[B.CFG_WRITEBACK]
        else:
            self._writethrough = not self.has_feature(B.VIRTIO_BLK_F_FLUSH)

    def on_features_ok(self) -> None:
        if self.has_feature(B.VIRTIO_BLK_F_CONFIG_WCE):
            if not self.has_feature(B.VIRTIO_BLK_F_FLUSH):
                self.config[B.CFG_WRITEBACK] = 0  # §5.2.5.2: MUST start writethrough
        else:
            # Not configurable: show the mode the spec implies.
            self.config[B.CFG_WRITEBACK] = 1 if self.has_feature(B.VIRTIO_BLK_F_FLUSH) else 0
        self._update_cache_mode()

    def on_config_write(self, offset: int, data: bytes) -> None:
        if (offset == B.CFG_WRITEBACK and len(data) == 1
                and self.has_feature(B.VIRTIO_BLK_F_CONFIG_WCE)):
            self.config[B.CFG_WRITEBACK] = 1 if data[0] else 0
            self._update_cache_mode()
            self.log.info("%s: cache mode %s", self.name,
                          "writethrough" if self._writethrough else "writeback")
            return
        raise ConfigAccessError(
            f"{self.name}: config write at offset {offset} +{len(data)}: only the 1-byte "
            f"writeback field (offset {B.CFG_WRITEBACK}) is writable, and only with "
            "CONFIG_WCE"
        )

    def on_reset(self) -> None:
        self._lane_config = None
        self._lanes = [None] * len(self.queues)
        self._trackers = [None] * len(self.queues)
        self._resubmit.clear()
        self.backend.drain()
        self.config[B.CFG_WRITEBACK] = 1 if self.default_writeback else 0
        self._writethrough = True

    def close(self) -> None:
        """Close the back-end if the device opened it (given a path)."""
        self._lane_config = None
        if self._owns_backend:
            self.backend.close()

    # ---- the request loop ---------------------------------------------------------------

    def kick(self, index: int) -> None:
        # The data path's entry: straight to the queue's fast lane when it has one.
        lanes = self._lanes
        if (0 <= index < len(lanes) and not self._resubmit
                and self.status & LIVE_MASK == S.DRIVER_OK):
            lane = lanes[index]
            if lane is not None and lane.ring is self.queues[index].ring:
                lane.run()
                return
        super().kick(index)

    def process_queue(self, index: int, ring: DeviceRing) -> None:
        """Drain ``ring`` (replaces the framework's loop; same contract and results).

        Requests a restarted back-end must resubmit (:meth:`track_requests`) go first.
        Then, on a synchronous back-end, :class:`~pyvirtio.device.blk_fastpath.BlkFastLane`
        serves the common reads and writes straight from the ring memory and hands
        everything else to :meth:`handle`; with :attr:`fast_path` off or an asynchronous
        back-end, every chain is popped and handled one by one (the framework's loop).
        Either way the driver is interrupted at most once per kick, if it asked to be.
        """
        if index in self._resubmit and not self._process_resubmitted(index, ring):
            return
        if self.fast_path and not self.backend.asynchronous:
            lane = self._lanes[index]
            if lane is None or lane.ring is not ring:
                lane = self._lanes[index] = BlkFastLane(self, index, ring)
            lane.run()
        else:
            super().process_queue(index, ring)

    def _process_resubmitted(self, index: int, ring: DeviceRing) -> bool:
        """Run the chains of the heads to resubmit; False if the queue is unusable now."""
        heads = self._resubmit.pop(index)
        queue = self.queues[index]
        pushed = False
        try:
            for head in heads:
                chain = ring.resume(head)
                written = self.handle(index, chain)
                if queue.ring is not ring:
                    return False
                if written is not None:
                    self.complete_chain(index, ring, chain, written)
                    pushed = True
        except (RingError, PeerError) as exc:
            self.queue_failed(index, ring, exc)
            return False
        finally:
            if pushed and queue.ring is ring and ring.needs_notification():
                self.notify_queue(index)
        return True

    def chain_popped(self, index: int, chain: DescriptorChain) -> None:
        tracker = self._trackers[index]
        if tracker is not None:
            tracker.popped(chain.head)

    def complete_chain(self, index: int, ring: DeviceRing, chain: DescriptorChain,
                       written: int) -> None:
        tracker = self._trackers[index]
        if tracker is None:
            ring.push(chain, written)
            return
        heads = (chain.head,)
        tracker.completing(heads)
        ring.push(chain, written)
        tracker.completed(heads, ring.used_idx)

    def lane_config(self) -> LaneConfig:
        """The settings the fast lanes need, as one tuple (cached until one changes)."""
        config = self._lane_config
        if config is None:
            be = self.backend
            config = self._lane_config = (
                self._trackers, be.fast_fd, be.read_map, self._size, self._lbs_mask,
                self._sector_mask, not self.read_only and not self._writethrough, be)
        return config

    def track_requests(self, index: int, tracker: RequestTracker | None,
                       resubmit: Sequence[int] = ()) -> None:
        """Report every head popped from / returned to queue ``index`` to ``tracker``
        (None: stop), and run the chains ``resubmit`` (heads popped by a previous back-end
        that never completed them) again before anything new, at the next kick."""
        if not 0 <= index < len(self._trackers):
            raise LocalError(f"{self.name}: queue {index} does not exist")
        self._trackers[index] = tracker
        self._lane_config = None
        if resubmit:
            self._resubmit[index] = list(resubmit)
        else:
            self._resubmit.pop(index, None)

    def on_queue_stopped(self, index: int, ring: DeviceRing) -> None:
        self._trackers[index] = None
        self._lane_config = None
        self._resubmit.pop(index, None)
        self._lanes[index] = None

    # ---- requests -----------------------------------------------------------------------

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        req = parse_request(queue, chain)
        status = self.check(req)
        if status is None:
            backend = self.backend
            if backend.asynchronous:
                req.ring = self.queues[queue].ring
                backend.submit(req, self._complete_async)
                return None
            status = backend.execute(req)
        return self.finish(req, status)

    def check(self, req: BlkRequest) -> int | None:
        """Apply the protocol rules. Returns the status to answer now (IOERR, UNSUPP, or OK
        for requests the device answers itself), or None when the back-end must run it
        (``offset``/``length``/``ranges``/``sync`` are then set)."""
        rtype = req.type
        if rtype == T_IN or rtype == T_OUT:
            if rtype == T_OUT:
                if self.read_only:
                    return S_IOERR
                req.sync = self._writethrough
            length = req.data_len
            sector = req.sector
            offset = sector * SECTOR_SIZE  # Python ints never wrap: no 64-bit overflow
            if (length & self._lbs_mask or sector & self._sector_mask
                    or offset + length > self._size):
                return S_IOERR
            req.offset = offset
            req.length = length
            return None
        if rtype == T_FLUSH:
            return None
        if rtype == T_GET_ID:
            return S_OK  # answered by finish()
        if rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
            return self._check_segments(req)
        return S_UNSUPP

    def _check_segments(self, req: BlkRequest) -> int | None:
        discard = req.type == T_DISCARD
        feature = B.VIRTIO_BLK_F_DISCARD if discard else B.VIRTIO_BLK_F_WRITE_ZEROES
        if not self.has_feature(feature):
            return S_IOERR if self.read_only else S_UNSUPP
        if self.read_only:
            return S_IOERR
        if req.data_len == 0 or req.data_len % _SEGMENT_SIZE:
            return S_IOERR
        count = req.data_len // _SEGMENT_SIZE
        if discard:
            max_seg, max_sectors = self.max_discard_seg, self.max_discard_sectors
            allowed_flags = 0
        else:
            max_seg, max_sectors = self.max_write_zeroes_seg, self.max_write_zeroes_sectors
            allowed_flags = B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        if count > max_seg:
            return S_IOERR  # checked first: a hostile driver cannot make us parse megabytes
        raw = gather(req.data)
        ranges: list[tuple[int, int, bool]] = []
        status: int | None = None
        for i in range(count):
            sector, num, flags = _SEGMENT.unpack_from(raw, i * _SEGMENT_SIZE)
            if flags & ~allowed_flags:
                return S_UNSUPP  # a MUST, whatever else is wrong (§5.2.6.2)
            offset = sector * SECTOR_SIZE
            length = num * SECTOR_SIZE
            if (num > max_sectors or offset + length > self._size
                    or sector & self._sector_mask or num & self._sector_mask):
                status = S_IOERR
            ranges.append((offset, length, bool(flags & B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
        if status is not None:
            return status  # nothing was touched: all segments are checked before any runs
        req.ranges = ranges
        req.sync = self._writethrough
        return None

    def finish(self, req: BlkRequest, status: int) -> int:
        """Fill what the device owes the driver, write the status byte, count, and return
        the used length (the whole writable part of the chain)."""
        stats = self.stats
        rtype = req.type
        if status == S_OK:
            if rtype == T_IN:
                stats.reads += 1
                stats.bytes_read += req.length
            elif rtype == T_OUT:
                stats.writes += 1
                stats.bytes_written += req.length
            elif rtype == T_GET_ID:
                stats.get_ids += 1
                zero_views(req.data)
                scatter(req.data, self.serial)
            else:
                if rtype == T_FLUSH:
                    stats.flushes += 1
                    if req.data_len:
                        zero_views(req.data)  # writable bytes a flush does not use
                elif rtype == T_DISCARD:
                    stats.discards += 1
                elif rtype == T_WRITE_ZEROES:
                    stats.write_zeroes += 1
                if (rtype != T_FLUSH and self.config[B.CFG_WRITE_ZEROES_MAY_UNMAP]
                        and not self.backend.can_discard):
                    # The back-end just learnt it cannot punch holes: say so (§5.2.6.2).
                    self.update_config(B.CFG_WRITE_ZEROES_MAY_UNMAP, b"\0")
        else:
            if status == S_UNSUPP:
                stats.unsupp += 1
            else:
                stats.ioerr += 1
            if rtype not in _READABLE_DATA_TYPES and req.data_len:
                zero_views(req.data)  # never leave stale guest bytes claimed as written
        if req.pad is not None:
            zero_views(req.pad)
        req.status_view[0] = status
        return req.chain.writable_len

    def _complete_async(self, req: BlkRequest, status: int) -> None:
        ring = self.ring(req.queue)
        if ring is None or ring is not req.ring:
            # The queue was reset or restarted while the I/O ran: the chain belongs to a
            # ring that no longer exists. Dropping it is what a reset means.
            self.log.info("%s: dropping completion of %r for a queue that was reset",
                          self.name, req)
            return
        tracker = self._trackers[req.queue]
        if tracker is None:
            self.complete(req.queue, req.chain, self.finish(req, status))
            return
        heads = (req.chain.head,)
        tracker.completing(heads)
        self.complete(req.queue, req.chain, self.finish(req, status))
        tracker.completed(heads, ring.used_idx)


def _bit(n: int) -> int:
    return 1 << n


__all__ = [
    "BlkBackend",
    "BlkDevice",
    "BlkFramingError",
    "BlkRequest",
    "BlkStats",
    "Completion",
    "RequestTracker",
    "parse_request",
    "zero_views",
]
