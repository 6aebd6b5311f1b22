"""A raw disk image (or a host block device) as virtio-blk storage.

Data moves with ``os.preadv`` / ``os.pwritev`` straight between the file and the request's
memoryviews, which are guest memory: no copy in Python. Short transfers are continued until
done; chains with more segments than the kernel's IOV_MAX are sent in slices.

``direct=True`` opens the image with ``O_DIRECT`` (bypassing the host page cache). O_DIRECT
needs every buffer address, buffer length and file offset aligned to the file system's
direct-I/O alignment, which is probed at open and published as the back-end's
:attr:`~FileBackend.block_size` (the device then refuses requests whose offset or length is
not aligned, and Linux guests never send them). Guest buffers, though, can sit anywhere in
guest memory: a request whose segments are not all aligned goes through an aligned bounce
buffer (one copy; :attr:`FileBackend.bounced` counts them). Aligned requests stay zero-copy.

Discard punches a hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)``); write-zeroes punches a hole
when the driver allows unmapping, else uses ``FALLOC_FL_ZERO_RANGE``, and falls back to
writing zeroes where the file system supports neither. ``KEEP_SIZE`` everywhere: the image
never grows. Python's ``os`` module has no ``fallocate`` with a mode (``posix_fallocate`` only
allocates), so the libc function is called through ctypes (:mod:`pyvirtio.memory.host`).
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
            if stat.S_ISREG(st.st_mode):
                self._raw_size = st.st_size
                self.can_discard = not read_only
            elif stat.S_ISBLK(st.st_mode):
                self._raw_size = os.lseek(self.fd, 0, os.SEEK_END)
                self.can_discard = not read_only
            else:
                raise LocalError(f"{self.path} is neither a regular file nor a block device")
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
        self._bounce: mmap.mmap | None = None
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
        st = os.fstat(self.fd)
        raw = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, os.SEEK_END)
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
        for buf in (self._bounce, self._zero_block):
            if buf is not None:
                buf.close()
        self._bounce = self._zero_block = None

    # ---- data ---------------------------------------------------------------------------

    def readv(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        image = self.read_map
        if image is not None and offset + length <= len(image):
            for view in views:
                n = len(view)
                view[:] = image[offset : offset + n]
                offset += n
            return
        if self.direct and not self._aligned(views):
            self._bounce_read(offset, views, length)
            return
        done = os.preadv(self.fd, views, offset) if len(views) <= IOV_MAX else 0
        if done != length:
            _continue(os.preadv, self.fd, views, offset, length, done, "read")

    def writev(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        if self.direct and not self._aligned(views):
            self._bounce_write(offset, views, length)
            return
        done = os.pwritev(self.fd, views, offset) if len(views) <= IOV_MAX else 0
        if done != length:
            _continue(os.pwritev, self.fd, views, offset, length, done, "write")

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

    def _bounce_buffer(self, length: int) -> mmap.mmap:
        # Anonymous mmaps are page-aligned, which satisfies any O_DIRECT alignment.
        buf = self._bounce
        if buf is not None and len(buf) >= length:
            return buf
        new = mmap.mmap(-1, max(length, mmap.PAGESIZE))
        if length <= _BOUNCE_KEEP:
            if buf is not None:
                buf.close()
            self._bounce = new
        return new

    def _release_bounce(self, buf: mmap.mmap) -> None:
        if buf is not self._bounce:
            buf.close()

    def _bounce_read(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        self.bounced += 1
        buf = self._bounce_buffer(length)
        try:
            with memoryview(buf) as mv:
                area = mv[:length]
                _continue(os.preadv, self.fd, [area], offset, length, 0, "read")
                pos = 0
                for view in views:
                    n = len(view)
                    view[:] = area[pos : pos + n]
                    pos += n
                area.release()
        finally:
            self._release_bounce(buf)

    def _bounce_write(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        self.bounced += 1
        buf = self._bounce_buffer(length)
        try:
            with memoryview(buf) as mv:
                pos = 0
                for view in views:
                    n = len(view)
                    mv[pos : pos + n] = view
                    pos += n
                area = mv[:length]
                _continue(os.pwritev, self.fd, [area], offset, length, 0, "write")
                area.release()
        finally:
            self._release_bounce(buf)

    # ---- discard and write zeroes -------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        if not self.can_discard or length == 0:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
            # Discard is advisory: without hole punching it becomes a no-op.
            log.info("%s: hole punching not supported (%s); discards are no-ops",
                     self.path, exc)
            self.can_discard = False

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if length == 0:
            return
        if unmap and self.can_discard:
            try:
                # A punched hole reads back as zeroes.
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
                self.can_discard = False
        if self._zero_range_ok:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
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
                _continue(os.pwritev, self.fd, [chunk], offset, n, 0, "write")
                chunk.release()
                offset += n


def _continue(op: Callable[[int, Sequence[memoryview], int], int], fd: int,
              views: Sequence[memoryview], offset: int, length: int, done: int,
              what: str) -> None:
    """Finish a transfer of ``length`` bytes of which ``done`` already moved: skip what is
    done, then issue the rest in slices of at most IOV_MAX segments, looping on short
    transfers. A transfer that makes no progress is an I/O error (the image ended early)."""
    rest: list[memoryview] = []
    skip = done
    for view in views:
        n = len(view)
        if skip >= n:
            skip -= n
            continue
        rest.append(view[skip:] if skip else view)
        skip = 0
    pos = offset + done
    remaining = length - done
    while remaining > 0:
        batch = rest[:IOV_MAX]
        n = op(fd, batch, pos)
        if n <= 0:
            raise OSError(errno.EIO, f"{what} at offset {pos} made no progress "
                                     f"({remaining} bytes left): the image ended early")
        pos += n
        remaining -= n
        # Drop the segments that were fully transferred, trim a partial one.
        i = 0
        while n > 0:
            seg = len(rest[i])
            if n >= seg:
                n -= seg
                i += 1
            else:
                rest[i] = rest[i][n:]
                n = 0
        del rest[:i]
