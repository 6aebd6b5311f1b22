"""virtio-blk requests and the storage interface: a chain parsed into a :class:`BlkRequest`
(zero-copy views of guest memory), and the :class:`BlkBackend` that runs validated requests.
See :mod:`pyvirtio.device.blk` for the whole picture."""


from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pyvirtio.errors import PeerError
from pyvirtio.ring import DescriptorChain, DeviceRing
from pyvirtio.ring.chain import split_header
from pyvirtio.spec import LE
from pyvirtio.spec import blk as B

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

_ZEROS = bytes(64 << 10)


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
    if chain.readable_len < _OUTHDR_SIZE:
        raise BlkFramingError(
            f"chain {chain.head} has a {chain.readable_len}-byte request header, shorter "
            f"than the {_OUTHDR_SIZE}-byte virtio_blk_outhdr"
        )
    header, rest = split_header(chain.readable, _OUTHDR_SIZE)
    rtype, _ioprio, sector = _OUTHDR.unpack_from(header)
    last = writable[-1]
    status_view = last if len(last) == 1 else last[-1:]
    if rtype in _READABLE_DATA_TYPES:
        data = rest  # the data follows the header in the readable part
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
    #: what the storage can do at all: the device offers FLUSH, DISCARD and WRITE_ZEROES
    #: only where it can (a network export may lack any of them)
    supports_flush: bool = True
    supports_discard: bool = True
    supports_write_zeroes: bool = True
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


