"""The block driver: virtio-blk requests over the paper's driver API.

Each request is three pieces of guest memory put on a queue as one buffer: the 16-byte
``virtio_blk_outhdr`` (readable by the device), the data (readable for writes, writable for
reads), and one writable status byte, as Linux's ``virtio_blk`` lays them out. Header and
status live in a per-queue pool of small control slots allocated at probe; data buffers are
allocated per request (or supplied by the caller, zero-copy).

Requests can be pipelined: the ``submit_*`` methods only add buffers; :meth:`BlkDriver.kick`
notifies the device once for a whole batch and :meth:`BlkDriver.wait` collects. The one-call
helpers (:meth:`BlkDriver.read`, :meth:`BlkDriver.write`, ...) submit, kick and wait, and
raise :class:`BlkStatusError` when the device answers IOERR or UNSUPP. With MQ, requests go
round-robin over the queues unless a queue is named.

The helpers check arguments against the device's limits first (a read beyond the capacity is
the caller's mistake, a :class:`~pyvirtio.errors.LocalError`, as in Linux's block layer);
:meth:`BlkDriver.submit` checks nothing, so tests can send the device anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

from pyvirtio.driver.base import Driver, Virtqueue, register_driver
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.ring import QueueFullError
from pyvirtio.spec import LE, ids
from pyvirtio.spec import blk as B

SECTOR_SIZE = B.SECTOR_SIZE
_OUTHDR = B.outhdr_struct(LE)
_SEGMENT = B.discard_write_zeroes_struct(LE)
_SLOT = 32  # header (16) + status (1), padded
_STATUS_OFF = 16
_DATA_ALIGN = 4096  # page-aligned data buffers: O_DIRECT back-ends take them as they are

STATUS_NAMES = {B.VIRTIO_BLK_S_OK: "OK", B.VIRTIO_BLK_S_IOERR: "IOERR",
                B.VIRTIO_BLK_S_UNSUPP: "UNSUPP"}

log = logging.getLogger("pyvirtio.driver.blk")


class BlkStatusError(PeerError):
    """The device completed a request with a status other than OK."""

    def __init__(self, request: BlkIO) -> None:
        status = request.status
        name = STATUS_NAMES.get(status, str(status)) if status is not None else "none"
        super().__init__(f"virtio-blk {request.describe()} failed: status {name}")
        self.request = request
        self.status = status


class BlkIO:
    """One request in flight (or done): the token the queue hands back.

    ``status`` is None until the device returns the buffer; then ``written`` is the used
    length it reported and ``data`` the bytes it wrote (IN, GET_ID) when the driver owns
    the data buffer.
    """

    __slots__ = ("data", "data_addr", "data_len", "in_len", "owned", "queue", "sector",
                 "slot", "status", "type", "written")

    def __init__(self, rtype: int, sector: int, queue: int, slot: int) -> None:
        self.type = rtype
        self.sector = sector
        self.queue = queue
        self.slot = slot
        self.data_addr: int | None = None  # driver-owned data buffer, freed on completion
        self.data_len = 0
        self.in_len = 0  # bytes of device-writable data before the status byte
        self.owned = False
        self.status: int | None = None
        self.written = 0
        self.data: bytes | None = None

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def ok(self) -> bool:
        return self.status == B.VIRTIO_BLK_S_OK

    def describe(self) -> str:
        names = {B.VIRTIO_BLK_T_IN: "read", B.VIRTIO_BLK_T_OUT: "write",
                 B.VIRTIO_BLK_T_FLUSH: "flush", B.VIRTIO_BLK_T_GET_ID: "get-id",
                 B.VIRTIO_BLK_T_DISCARD: "discard",
                 B.VIRTIO_BLK_T_WRITE_ZEROES: "write-zeroes"}
        return (f"{names.get(self.type, f'type {self.type}')} at sector {self.sector} "
                f"({self.data_len} data bytes, queue {self.queue})")

    def __repr__(self) -> str:
        state = "pending" if self.status is None else STATUS_NAMES.get(self.status,
                                                                        str(self.status))
        return f"BlkIO({self.describe()}, {state})"


class _QueueState:
    """Per-queue control slots and the requests in flight on it."""

    def __init__(self, vq: Virtqueue, base: int) -> None:
        self.vq = vq
        self.base = base
        self.free = list(range(vq.ring.size - 1, -1, -1))
        self.pending = 0  # added since the last kick
        self.inflight = 0


@register_driver
class BlkDriver(Driver):
    device_ids = (ids.BLOCK,)
    features = (
        (1 << B.VIRTIO_BLK_F_SIZE_MAX)
        | (1 << B.VIRTIO_BLK_F_SEG_MAX)
        | (1 << B.VIRTIO_BLK_F_RO)
        | (1 << B.VIRTIO_BLK_F_BLK_SIZE)
        | (1 << B.VIRTIO_BLK_F_FLUSH)
        | (1 << B.VIRTIO_BLK_F_TOPOLOGY)
        | (1 << B.VIRTIO_BLK_F_CONFIG_WCE)
        | (1 << B.VIRTIO_BLK_F_MQ)
        | (1 << B.VIRTIO_BLK_F_DISCARD)
        | (1 << B.VIRTIO_BLK_F_WRITE_ZEROES)
    )

    #: config-change interrupts handled since probe
    config_changes = 0
    #: why the config space last re-read on a config change was refused (None: it was fine)
    config_problem: str | None = None

    # ---- probe / remove -----------------------------------------------------------------

    def probe(self) -> None:
        dev = self.device
        self.read_config()
        nq = self.num_queues
        self.vqs = dev.find_vqs(nq)
        self._queues: list[_QueueState] = []
        for vq in self.vqs:
            base = dev.allocator.alloc(_SLOT * vq.ring.size, 64)
            self._queues.append(_QueueState(vq, base))
        self._next_queue = 0
        self._ring_limit = min(q.vq.ring.size for q in self._queues)

    def remove(self) -> None:
        # Reset first (as Linux does): the device must stop writing into buffers before
        # they are freed.
        self.device.reset()
        alloc = self.device.allocator
        for q in self._queues:
            for token in q.vq.ring.detach_unused():
                if isinstance(token, BlkIO):
                    self._release(token)
            alloc.free(q.base)
        self._queues = []

    def config_changed(self) -> None:
        """The device changed its config (a resize, as Linux's virtblk_config_changed
        handles): read it again. A config the driver cannot accept is recorded in
        :attr:`config_problem` rather than raised into whoever delivered the interrupt."""
        self.config_changes += 1
        try:
            self.read_config()
        except PeerError as exc:
            self.config_problem = str(exc)
            log.warning("%s", exc)
        else:
            self.config_problem = None

    def read_config(self) -> None:
        """(Re)read config space: capacity and the limits the device published."""
        dev = self.device
        raw = dev.read_config(0, B.CFG_WRITE_ZEROES_MAY_UNMAP + 1)
        (self.capacity, size_max, seg_max, _cyl, _heads, _sectors, blk_size, pexp, _aoff,
         min_io, opt_io, writeback, num_queues, max_discard_sectors, max_discard_seg,
         discard_align, max_wz_sectors, max_wz_seg, wz_may_unmap) = (
            B.config_struct(LE).unpack_from(raw + bytes(B.CONFIG_SIZE - len(raw)))[:19]
        )
        has = dev.has_feature
        self.read_only = has(B.VIRTIO_BLK_F_RO)
        self.size_max = size_max if has(B.VIRTIO_BLK_F_SIZE_MAX) and size_max else None
        self.seg_max = seg_max if has(B.VIRTIO_BLK_F_SEG_MAX) and seg_max else None
        self.block_size = blk_size if has(B.VIRTIO_BLK_F_BLK_SIZE) and blk_size else 512
        if self.block_size < SECTOR_SIZE or self.block_size & (self.block_size - 1):
            raise PeerError(f"virtio-blk: device block size {self.block_size} is not a "
                            "power of two >= 512")
        self.physical_block_size = (self.block_size << pexp
                                    if has(B.VIRTIO_BLK_F_TOPOLOGY) else self.block_size)
        self.min_io_size = min_io if has(B.VIRTIO_BLK_F_TOPOLOGY) else 0
        self.opt_io_size = opt_io if has(B.VIRTIO_BLK_F_TOPOLOGY) else 0
        self.num_queues = num_queues if has(B.VIRTIO_BLK_F_MQ) else 1
        if self.num_queues < 1:
            raise PeerError("virtio-blk: device offers MQ with num_queues 0")
        self.can_discard = has(B.VIRTIO_BLK_F_DISCARD)
        self.max_discard_sectors = max_discard_sectors or 0xFFFFFFFF
        self.max_discard_seg = max_discard_seg or 1
        self.discard_sector_alignment = discard_align
        self.can_write_zeroes = has(B.VIRTIO_BLK_F_WRITE_ZEROES)
        self.max_write_zeroes_sectors = max_wz_sectors or 0xFFFFFFFF
        self.max_write_zeroes_seg = max_wz_seg or 1
        self.write_zeroes_may_unmap = bool(wz_may_unmap)
        self._writeback_cfg = writeback

    # ---- cache mode ---------------------------------------------------------------------

    @property
    def writeback(self) -> bool:
        """Whether the device caches writes until a flush (what Linux shows as
        ``cache_type``): the config byte with CONFIG_WCE, else implied by FLUSH."""
        dev = self.device
        if dev.has_feature(B.VIRTIO_BLK_F_CONFIG_WCE):
            return bool(dev.read_config(B.CFG_WRITEBACK, 1)[0])
        return dev.has_feature(B.VIRTIO_BLK_F_FLUSH)

    @writeback.setter
    def writeback(self, value: bool) -> None:
        if not self.device.has_feature(B.VIRTIO_BLK_F_CONFIG_WCE):
            raise LocalError("virtio-blk: the cache mode is not configurable "
                             "(CONFIG_WCE not negotiated)")
        self.device.write_config(B.CFG_WRITEBACK, bytes([1 if value else 0]))

    # ---- raw submission -----------------------------------------------------------------

    def submit(self, rtype: int, sector: int = 0, *, out: bytes | bytearray | memoryview = b"",
               in_len: int = 0, out_sgs: Sequence[tuple[int, int]] | None = None,
               in_sgs: Sequence[tuple[int, int]] | None = None,
               queue: int | None = None) -> BlkIO:
        """Add one request without checking it (the device must judge it) and without
        kicking. ``out`` is copied into a driver-owned buffer the device reads; ``in_len``
        bytes are allocated for the device to write. ``out_sgs``/``in_sgs`` add caller-owned
        (guest address, length) segments instead (zero-copy). If the queue is full, waits
        for completions on it first."""
        qi = self._pick_queue(queue)
        q = self._queues[qi]
        while not q.free:
            self._make_room(qi)
        slot = q.free.pop()
        io = BlkIO(rtype, sector, qi, slot)
        try:
            memory = self.device.memory
            ctrl = q.base + slot * _SLOT
            hdr = memory.view(ctrl, _SLOT)
            _OUTHDR.pack_into(hdr, 0, rtype, 0, sector)
            hdr[_STATUS_OFF] = 0xFF  # a value the device never writes: "not answered"
            outs: list[tuple[int, int]] = [(ctrl, B.OUTHDR_SIZE)]
            ins: list[tuple[int, int]] = []
            if out_sgs is not None:
                outs += out_sgs
                io.data_len += sum(n for _, n in out_sgs)
            if in_sgs is not None:
                ins += in_sgs
                io.data_len += sum(n for _, n in in_sgs)
                io.in_len = sum(n for _, n in in_sgs)
            if out or in_len:
                size = len(out) if out else in_len
                addr = self.device.allocator.alloc(size, _DATA_ALIGN)
                io.data_addr, io.owned = addr, True
                if out:
                    memory.write(addr, out)
                    outs += self._segments(addr, size)
                else:
                    ins += self._segments(addr, size)
                    io.in_len += size
                io.data_len += size
            ins.append((ctrl + _STATUS_OFF, 1))
            while True:
                try:
                    q.vq.add_buf(outs, ins, io)
                    break
                except QueueFullError:
                    self._make_room(qi)
        except BaseException:
            self._release(io)
            raise
        q.pending += 1
        q.inflight += 1
        return io

    def _segments(self, addr: int, size: int) -> list[tuple[int, int]]:
        step = self.size_max or size
        return [(addr + off, min(step, size - off)) for off in range(0, size, step)]

    def _pick_queue(self, queue: int | None) -> int:
        if queue is None:
            qi = self._next_queue
            self._next_queue = (qi + 1) % len(self._queues)
            return qi
        if not 0 <= queue < len(self._queues):
            raise LocalError(f"virtio-blk: no queue {queue} (the driver uses "
                             f"{len(self._queues)})")
        return queue

    def _make_room(self, qi: int, timeout: float = 10.0) -> None:
        q = self._queues[qi]
        if q.inflight == 0:
            raise LocalError(f"virtio-blk: a request does not fit in queue {qi} "
                             f"({q.vq.ring.size} descriptors)")
        self._kick_queue(qi)
        self._collect(qi, wait_one=True, timeout=timeout)

    def _release(self, io: BlkIO) -> None:
        if io.owned and io.data_addr is not None:
            self.device.allocator.free(io.data_addr)
            io.data_addr = None
            io.owned = False
        q = self._queues[io.queue]
        if io.slot >= 0:
            q.free.append(io.slot)
            io.slot = -1

    # ---- kick and collect ---------------------------------------------------------------

    def kick(self) -> None:
        """Notify every queue that has requests added since its last kick."""
        for qi, q in enumerate(self._queues):
            if q.pending:
                self._kick_queue(qi)

    def _kick_queue(self, qi: int) -> None:
        q = self._queues[qi]
        q.pending = 0
        q.vq.kick()

    def poll(self) -> int:
        """Collect whatever the device has completed, without waiting; returns how many."""
        return sum(self._collect(qi) for qi in range(len(self._queues)))

    def _collect(self, qi: int, wait_one: bool = False, timeout: float = 10.0) -> int:
        q = self._queues[qi]
        vq = q.vq
        memory = self.device.memory
        got = 0
        deadline = None
        while True:
            item = vq.get_buf()
            if item is None:
                if got or not wait_one:
                    return got
                if deadline is None:
                    deadline = time.monotonic() + timeout
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"virtio-blk queue {qi}: no completion within "
                                       f"{timeout} s")
                self.device.check_needs_reset(vq.index)
                self.device.transport.wait(min(remaining, 0.5))
                continue
            io, written = item
            if not isinstance(io, BlkIO):
                raise LocalError(f"virtio-blk queue {qi}: foreign token {io!r}")
            ctrl = q.base + io.slot * _SLOT
            io.status = memory.read(ctrl + _STATUS_OFF, 1)[0]
            io.written = written
            if io.owned and io.in_len and io.data_addr is not None:
                io.data = memory.read(io.data_addr, io.in_len)
            self._release(io)
            q.inflight -= 1
            got += 1

    def wait(self, requests: BlkIO | Iterable[BlkIO], timeout: float = 10.0) -> None:
        """Kick what is pending and collect until every request given is done."""
        reqs = [requests] if isinstance(requests, BlkIO) else list(requests)
        self.kick()
        deadline = time.monotonic() + timeout
        for io in reqs:
            while io.status is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"virtio-blk: {io.describe()} not completed within "
                                       f"{timeout} s")
                self._collect(io.queue, wait_one=True, timeout=remaining)

    def result(self, io: BlkIO, timeout: float = 10.0) -> BlkIO:
        """Wait for ``io``; raise :class:`BlkStatusError` unless it succeeded."""
        self.wait(io, timeout)
        if io.status != B.VIRTIO_BLK_S_OK:
            raise BlkStatusError(io)
        return io

    # ---- checked submission helpers -----------------------------------------------------

    def _check_range(self, sector: int, nbytes: int) -> None:
        if sector < 0 or nbytes < 0:
            raise LocalError(f"virtio-blk: negative sector {sector} or length {nbytes}")
        if nbytes % self.block_size or (sector * SECTOR_SIZE) % self.block_size:
            raise LocalError(f"virtio-blk: sector {sector} +{nbytes} bytes is not aligned to "
                             f"the {self.block_size}-byte block size")
        if sector * SECTOR_SIZE + nbytes > self.capacity * SECTOR_SIZE:
            raise LocalError(f"virtio-blk: sector {sector} +{nbytes} bytes is beyond the "
                             f"capacity of {self.capacity} sectors")
        if self.seg_max is not None and self.size_max:
            nsegs = -(-nbytes // self.size_max)
            if nsegs > self.seg_max:
                raise LocalError(f"virtio-blk: {nbytes} bytes need {nsegs} segments, more "
                                 f"than seg_max {self.seg_max}")

    def _check_writable(self) -> None:
        if self.read_only:
            raise LocalError("virtio-blk: the device is read-only")

    def submit_read(self, sector: int, count: int, queue: int | None = None) -> BlkIO:
        """Read ``count`` sectors; the bytes land in ``io.data``."""
        self._check_range(sector, count * SECTOR_SIZE)
        return self.submit(B.VIRTIO_BLK_T_IN, sector, in_len=count * SECTOR_SIZE,
                           queue=queue)

    def submit_write(self, sector: int, data: bytes | bytearray | memoryview,
                     queue: int | None = None) -> BlkIO:
        self._check_writable()
        self._check_range(sector, len(data))
        return self.submit(B.VIRTIO_BLK_T_OUT, sector, out=data, queue=queue)

    def submit_flush(self, queue: int | None = None) -> BlkIO:
        return self.submit(B.VIRTIO_BLK_T_FLUSH, 0, queue=queue)

    def submit_get_id(self, queue: int | None = None) -> BlkIO:
        return self.submit(B.VIRTIO_BLK_T_GET_ID, 0, in_len=B.VIRTIO_BLK_ID_BYTES,
                           queue=queue)

    def _ranges(self, rtype: int, ranges: Sequence[tuple[int, int]], flags: int,
                max_sectors: int, max_seg: int, queue: int | None) -> BlkIO:
        if len(ranges) > max_seg:
            raise LocalError(f"virtio-blk: {len(ranges)} segments, more than the device's "
                             f"{max_seg}")
        payload = bytearray()
        for sector, count in ranges:
            if count > max_sectors:
                raise LocalError(f"virtio-blk: {count} sectors in one segment, more than "
                                 f"the device's {max_sectors}")
            self._check_range(sector, count * SECTOR_SIZE)
            payload += _SEGMENT.pack(sector, count, flags)
        return self.submit(rtype, 0, out=payload, queue=queue)

    def submit_discard(self, ranges: Sequence[tuple[int, int]],
                       queue: int | None = None) -> BlkIO:
        """Discard ``(sector, count)`` ranges in one request."""
        self._check_writable()
        if not self.can_discard:
            raise LocalError("virtio-blk: DISCARD not negotiated")
        return self._ranges(B.VIRTIO_BLK_T_DISCARD, ranges, 0, self.max_discard_sectors,
                            self.max_discard_seg, queue)

    def submit_write_zeroes(self, ranges: Sequence[tuple[int, int]], unmap: bool = False,
                            queue: int | None = None) -> BlkIO:
        """Zero ``(sector, count)`` ranges in one request; ``unmap`` lets the device
        deallocate them."""
        self._check_writable()
        if not self.can_write_zeroes:
            raise LocalError("virtio-blk: WRITE_ZEROES not negotiated")
        flags = B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        return self._ranges(B.VIRTIO_BLK_T_WRITE_ZEROES, ranges, flags,
                            self.max_write_zeroes_sectors, self.max_write_zeroes_seg, queue)

    # ---- one-call helpers ---------------------------------------------------------------

    def read(self, sector: int, count: int, timeout: float = 10.0) -> bytes:
        """Read ``count`` 512-byte sectors starting at ``sector``."""
        io = self.result(self.submit_read(sector, count), timeout)
        assert io.data is not None
        return io.data

    def write(self, sector: int, data: bytes | bytearray | memoryview,
              timeout: float = 10.0) -> None:
        """Write ``data`` (a multiple of the block size) at ``sector``."""
        self.result(self.submit_write(sector, data), timeout)

    def flush(self, timeout: float = 10.0) -> None:
        """Make every completed write stable."""
        self.result(self.submit_flush(), timeout)

    def get_id(self, timeout: float = 10.0) -> bytes:
        """The device's serial (up to 20 bytes, NUL padding removed)."""
        io = self.result(self.submit_get_id(), timeout)
        assert io.data is not None
        return io.data.split(b"\0", 1)[0]

    def discard(self, sector: int, count: int, timeout: float = 10.0) -> None:
        """Discard ``count`` sectors, split to the device's limits."""
        self._run_split(self.submit_discard, sector, count, self.max_discard_sectors,
                        self.max_discard_seg, timeout)

    def write_zeroes(self, sector: int, count: int, unmap: bool = False,
                     timeout: float = 10.0) -> None:
        """Make ``count`` sectors read as zeroes, split to the device's limits."""
        def submit(ranges: Sequence[tuple[int, int]]) -> BlkIO:
            return self.submit_write_zeroes(ranges, unmap)

        self._run_split(submit, sector, count, self.max_write_zeroes_sectors,
                        self.max_write_zeroes_seg, timeout)

    def _run_split(self, submit: Callable[[Sequence[tuple[int, int]]], BlkIO], sector: int,
                   count: int, max_sectors: int, max_seg: int, timeout: float) -> None:
        step = max_sectors - max_sectors % (self.block_size // SECTOR_SIZE)
        ranges = [(s, min(step, sector + count - s)) for s in range(sector, sector + count,
                                                                    step)]
        ios = [submit(ranges[i : i + max_seg]) for i in range(0, len(ranges), max_seg)]
        for io in ios:
            self.result(io, timeout)
