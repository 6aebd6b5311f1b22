"""The virtio-blk device: features, config space, cache modes and the protocol rules over a
:class:`~pyvirtio.device.blk.backend.BlkBackend` (see :mod:`pyvirtio.device.blk`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyvirtio.device.base import ConfigAccessError, VirtioDevice
from pyvirtio.device.blk.backend import (
    _READABLE_DATA_TYPES,
    _SEGMENT,
    _SEGMENT_SIZE,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR_SIZE,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkBackend,
    BlkRequest,
    parse_request,
    zero_views,
)
from pyvirtio.device.blk.fastpath import BlkFastLane, LaneConfig
from pyvirtio.device.blk.file import FileBackend
from pyvirtio.device.engine import FastLane
from pyvirtio.errors import LocalError
from pyvirtio.ring import DescriptorChain, DeviceRing
from pyvirtio.ring.chain import gather, scatter
from pyvirtio.spec import LE, ids
from pyvirtio.spec import blk as B
from pyvirtio.spec import features as F

# QEMU's defaults: a request of up to 2^22 - 1 sectors (just under 2 GiB).
DEFAULT_MAX_DISCARD_SECTORS = (1 << 22) - 1
DEFAULT_MAX_WRITE_ZEROES_SECTORS = (1 << 22) - 1
DEFAULT_MAX_DISCARD_SEG = 32
DEFAULT_MAX_WRITE_ZEROES_SEG = 32
DEFAULT_SIZE_MAX = 1 << 20
DEFAULT_SERIAL = "pyvirtio-blk"


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


class BlkDevice(VirtioDevice):
    """virtio-blk over a :class:`BlkBackend`, or over the raw image at a path (a
    :class:`~pyvirtio.device.blk.file.FileBackend` with ``read_only``, ``direct`` (O_DIRECT)
    and ``mmap_reads``, closed by :meth:`close`). ``num_queues`` > 1 offers MQ, one back-end
    serving all. ``writeback``: the cache mode after reset under CONFIG_WCE (the driver may
    change it). ``read_only`` forces RO. ``flush=False`` (with ``config_wce=False``) never
    syncs. ``blk_size`` raises the logical block size above the back-end's. The discard and
    write-zeroes limits are published in config space and enforced (IOERR beyond them).
    FLUSH, DISCARD and WRITE_ZEROES are offered only where the back-end supports them
    (:attr:`~BlkBackend.supports_flush` ...), RO also where the back-end is read-only.
    ``batch_interval``: batch mode (:mod:`pyvirtio.device.engine`; needs a reactor). Every
    argument is JSON-friendly, so the device can be built in a child process.
    """

    device_id = ids.BLOCK
    feature_names = F.names_in(vars(B), "VIRTIO_BLK_F_")
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
            self.backend = FileBackend(backend, read_only=read_only, direct=direct,
                                       mmap_reads=mmap_reads)
            self._owns_backend = True
        be = self.backend
        self.read_only = read_only or be.read_only
        # Offer only what the storage can do (CONFIG_WCE goes with FLUSH).
        flush = flush and be.supports_flush
        config_wce = config_wce and flush
        discard = discard and be.supports_discard
        write_zeroes = write_zeroes and be.supports_write_zeroes
        lbs = max(blk_size or SECTOR_SIZE, be.block_size)
        if lbs < SECTOR_SIZE or lbs & (lbs - 1) or lbs % be.block_size:
            self.close()
            raise LocalError(f"block size {lbs} must be a power of two >= 512 and a multiple "
                             f"of the back-end's {be.block_size}")
        self.block_size = lbs
        self.batch_interval = batch_interval  # batch mode: see pyvirtio.device.engine
        self._lbs_mask = lbs - 1
        self._sector_mask = lbs // SECTOR_SIZE - 1
        offer_discard = discard and not self.read_only
        offer_wz = write_zeroes and not self.read_only
        features = (
            F.mask(B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_BLK_SIZE, B.VIRTIO_BLK_F_TOPOLOGY)
            | (F.bit(B.VIRTIO_BLK_F_SIZE_MAX) if size_max else 0)
            | (F.bit(B.VIRTIO_BLK_F_FLUSH) if flush else 0)
            | (F.bit(B.VIRTIO_BLK_F_CONFIG_WCE) if config_wce else 0)
            | (F.bit(B.VIRTIO_BLK_F_RO) if self.read_only else 0)
            | (F.bit(B.VIRTIO_BLK_F_MQ) if num_queues > 1 else 0)
            | (F.bit(B.VIRTIO_BLK_F_DISCARD) if offer_discard else 0)
            | (F.bit(B.VIRTIO_BLK_F_WRITE_ZEROES) if offer_wz else 0)
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
        self.backend.drain()
        self.config[B.CFG_WRITEBACK] = 1 if self.default_writeback else 0
        self._writethrough = True

    def close(self) -> None:
        """Close the back-end if the device opened it (given a path)."""
        self._lane_config = None
        if self._owns_backend:
            self.backend.close()

    # ---- the request loop ---------------------------------------------------------------

    def fast_lane(self, index: int, ring: DeviceRing) -> FastLane | None:
        """On a synchronous back-end, :class:`~pyvirtio.device.blk.fastpath.BlkFastLane`
        serves the common reads and writes straight from the ring memory and leaves
        everything else to :meth:`handle`; with :attr:`fast_path` off or an asynchronous
        back-end, every chain goes through :meth:`handle`."""
        if not self.fast_path or self.backend.asynchronous:
            return None
        return BlkFastLane(self).serve

    def lane_config(self) -> LaneConfig:
        """The settings the fast lanes need, as one tuple (cached until one changes)."""
        config = self._lane_config
        if config is None:
            be = self.backend
            config = self._lane_config = (
                be.fast_fd, be.read_map, self._size, self._lbs_mask,
                self._sector_mask, not self.read_only and not self._writethrough, be)
        return config

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
        self.complete(req.queue, req.chain, self.finish(req, status))
