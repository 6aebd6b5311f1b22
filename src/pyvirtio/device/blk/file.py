"""A raw disk image (or a host block device) as virtio-blk storage.

Data moves with ``os.preadv`` / ``os.pwritev`` straight between the file and guest memory;
short transfers are continued, chains longer than IOV_MAX sent in slices. ``direct=True``
opens the image O_DIRECT: the alignment the file system needs is probed at open and
published as :attr:`~FileBackend.block_size` (the device refuses requests not aligned to
it), but guest buffers can sit anywhere, so a request with an unaligned segment goes through
an aligned bounce buffer (one copy, counted in :attr:`FileBackend.bounced`).

Discard punches a hole; write-zeroes punches one when the driver allows unmapping, else
uses ZERO_RANGE, else writes zeroes; always KEEP_SIZE, so the image never grows. ``os`` has
no ``fallocate`` with a mode, hence :mod:`pyvirtio.memory.host`'s ctypes one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import stat
from collections.abc import Callable, Sequence

from pyvirtio.device.blk.backend import SECTOR_SIZE, BlkBackend
from pyvirtio.errors import LocalError
from pyvirtio.memory.host import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    buffer_address,
    fallocate,
)
from pyvirtio.ring.chain import gather, scatter, split_segments

log = logging.getLogger("pyvirtio.device.blk.file")

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):
    IOV_MAX = 1024
if IOV_MAX <= 0:
    IOV_MAX = 1024

_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY)
_ZERO_CHUNK = 1 << 20
_BOUNCE_KEEP = 4 << 20  # keep a bounce buffer up to this size for reuse
_Op = Callable[[int, Sequence[memoryview], int], int]  # os.preadv or os.pwritev


class FileBackend(BlkBackend):
    """A raw image file or block device at ``path``.

    The capacity is the file size rounded down to whole blocks: a partial block at the end
    of the file is never read or written. ``syncs`` counts ``fdatasync`` calls, ``bounced``
    O_DIRECT requests that needed a bounce buffer.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 direct: bool = False, block_size: int | None = None,
                 mmap_reads: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.direct = direct
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise LocalError(f"{self.path}: the file system does not support O_DIRECT"
                                 ) from exc
            raise
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise LocalError(f"{self.path} is neither a regular file nor a block device")
            self._raw_size = os.lseek(self.fd, 0, os.SEEK_END)  # a file's or a device's size
            self.can_discard = not read_only
            pbs = st.st_blksize if st.st_blksize and not st.st_blksize & (st.st_blksize - 1) \
                else SECTOR_SIZE
            self.physical_block_size = min(max(pbs, SECTOR_SIZE), 64 << 10)
            need = self._probe_direct_alignment() if direct else SECTOR_SIZE
            bs = block_size or need
            if bs < need or bs & (bs - 1):
                raise LocalError(f"block size {bs} is not a power of two >= {need}")
            self.block_size = bs
            self._mask = bs - 1
        except BaseException:
            os.close(self.fd)
            raise
        self._zero_range_ok = True
        self._bounce_buf: mmap.mmap | None = None
        self._zero_block: mmap.mmap | None = None
        self.syncs = 0
        self.bounced = 0
        # O_DIRECT needs aligned guest buffers (else a bounce): only buffered files qualify.
        self.fast_fd = -1 if direct else self.fd
        #: with ``mmap_reads``: the image mapped read-only; reads are copies from it (from
        #: the page cache, without a system call). The price: a read the kernel cannot
        #: satisfy (an I/O error on an uncached page, or the file truncated by someone
        #: else) kills the process with SIGBUS instead of answering IOERR. Opt-in.
        self.read_map: memoryview | None = None
        self._image_mm: mmap.mmap | None = None
        self._mmap_reads = mmap_reads and not direct
        self._map_image()

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"FileBackend({self.path!r}, {mode}{', direct' if self.direct else ''})"

    @property
    def size(self) -> int:
        return self._raw_size - self._raw_size % self.block_size

    def refresh_size(self) -> int:
        """Re-read the file's size (after the image was resized); returns :attr:`size`."""
        raw = os.lseek(self.fd, 0, os.SEEK_END)
        if raw != self._raw_size:
            self._raw_size = raw
            self._map_image()
        return self.size

    def _map_image(self) -> None:
        """(Re)map the image for ``mmap_reads`` (after opening or a resize)."""
        if self.read_map is not None:
            self.read_map.release()
            self.read_map = None
        if self._image_mm is not None:
            with contextlib.suppress(BufferError):  # a view still out: unmapped when freed
                self._image_mm.close()
            self._image_mm = None
        if self._mmap_reads and self.size and stat.S_ISREG(os.fstat(self.fd).st_mode):
            self._image_mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            self.read_map = memoryview(self._image_mm)

    def close(self) -> None:
        self.fast_fd = -1
        self._mmap_reads = False
        self._map_image()  # unmaps
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for buf in (self._bounce_buf, self._zero_block):
            if buf is not None:
                buf.close()
        self._bounce_buf = self._zero_block = None

    # ---- data ---------------------------------------------------------------------------

    def readv(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        image = self.read_map
        if image is not None and offset + length <= len(image):
            scatter(views, image[offset : offset + length])
            return
        if self.direct and not self._aligned(views):
            self._bounce(os.preadv, offset, views, length)
            return
        done = os.preadv(self.fd, views, offset) if len(views) <= IOV_MAX else 0
        if done != length:
            _continue(os.preadv, self.fd, views, offset, length, done)

    def writev(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        if self.direct and not self._aligned(views):
            self._bounce(os.pwritev, offset, views, length)
            return
        done = os.pwritev(self.fd, views, offset) if len(views) <= IOV_MAX else 0
        if done != length:
            _continue(os.pwritev, self.fd, views, offset, length, done)

    def flush(self) -> None:
        os.fdatasync(self.fd)
        self.syncs += 1

    # ---- O_DIRECT -----------------------------------------------------------------------

    def _probe_direct_alignment(self) -> int:
        """The smallest power of two >= 512 that O_DIRECT accepts for buffer address and
        length here (the file system's logical block size)."""
        buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
        view = memoryview(buf)
        try:
            align = SECTOR_SIZE
            while align < mmap.PAGESIZE:
                # An address aligned to `align` but not to 2*align, `align` bytes long.
                try:
                    os.preadv(self.fd, [view[align : 2 * align]], 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                align *= 2
            return align
        finally:
            view.release()
            buf.close()

    def _aligned(self, views: Sequence[memoryview]) -> bool:
        mask = self._mask
        for view in views:
            if len(view) & mask or buffer_address(view) & mask:
                return False
        return True

    def _bounce(self, op: _Op, offset: int, views: Sequence[memoryview], length: int) -> None:
        """Move a request with unaligned guest buffers through an aligned bounce buffer."""
        self.bounced += 1
        buf = self._bounce_buf
        if buf is None or len(buf) < length:
            # Anonymous mmaps are page-aligned, which satisfies any O_DIRECT alignment.
            buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))
            if length <= _BOUNCE_KEEP:  # kept for reuse
                if self._bounce_buf is not None:
                    self._bounce_buf.close()
                self._bounce_buf = buf
        try:
            with memoryview(buf) as mv, mv[:length] as area:
                if op is os.pwritev:
                    area[:] = gather(views)
                _continue(op, self.fd, [area], offset, length, 0)
                if op is os.preadv:
                    scatter(views, area)
        finally:
            if buf is not self._bounce_buf:
                buf.close()

    # ---- discard and write zeroes -------------------------------------------------------

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        """fallocate(mode | KEEP_SIZE); False if the file system does not support it."""
        try:
            fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
            return False

    def discard(self, offset: int, length: int) -> None:
        if self.can_discard and length and not self._fallocate(FALLOC_FL_PUNCH_HOLE,
                                                               offset, length):
            # Discard is advisory: without hole punching it becomes a no-op.
            log.info("%s: hole punching not supported; discards are no-ops", self.path)
            self.can_discard = False

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if length == 0:
            return
        if unmap and self.can_discard:
            if self._fallocate(FALLOC_FL_PUNCH_HOLE, offset, length):
                return  # a punched hole reads back as zeroes
            self.can_discard = False
        if self._zero_range_ok:
            if self._fallocate(FALLOC_FL_ZERO_RANGE, offset, length):
                return
            self._zero_range_ok = False
        self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        if self._zero_block is None:
            self._zero_block = mmap.mmap(-1, _ZERO_CHUNK)  # zero-filled and page-aligned
        with memoryview(self._zero_block) as zeros:
            end = offset + length
            while offset < end:
                n = min(_ZERO_CHUNK, end - offset)
                chunk = zeros[:n]
                _continue(os.pwritev, self.fd, [chunk], offset, n, 0)
                chunk.release()
                offset += n


def _continue(op: _Op, fd: int, views: Sequence[memoryview], offset: int, length: int,
              done: int) -> None:
    """Finish a transfer of ``length`` bytes of which ``done`` already moved, in slices of
    at most IOV_MAX segments. A transfer that makes no progress is an I/O error (the image
    ended early)."""
    while done < length:
        n = op(fd, split_segments(views, done)[1][:IOV_MAX], offset + done)
        if n <= 0:
            what = "read" if op is os.preadv else "write"
            raise OSError(errno.EIO, f"{what} at offset {offset + done} made no progress "
                                     f"({length - done} bytes left): the image ended early")
        done += n
