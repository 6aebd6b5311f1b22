"""Guest memory: guest-physical address -> bytes, bounds-checked and zero-copy.

This is the only way any layer above touches guest memory. A :class:`GuestMemory` is a set of
non-overlapping :class:`Region` objects, each a writable buffer (usually an ``mmap`` of a
memfd or of a file descriptor received from a vhost-user front-end) placed at a
guest-physical base address. :meth:`GuestMemory.view` returns a ``memoryview`` straight into
that buffer, so device back-ends read and write guest memory without copies
(``os.preadv``/``os.pwritev`` land directly in the guest).

Spanning regions: a buffer that crosses from one region into an adjacent one is *split*:
:meth:`GuestMemory.views` returns one view per region touched. :meth:`GuestMemory.view`
(single view) refuses such a buffer with :class:`RegionBoundaryError`; ring structures, which
are small and naturally aligned, use ``view``; data buffers use ``views``.

:meth:`GuestMemory.view` and :meth:`GuestMemory.views` take addresses that came from the
other side (descriptors, ring addresses): their failures are :class:`GuestMemoryError` (a
:class:`~pyvirtio.errors.PeerError`) naming the address and the length.
:meth:`GuestMemory.read` and :meth:`GuestMemory.write` are the API for the caller's own
buffers (a driver filling its requests): their failures are :class:`OutsideMemoryError`, a
:class:`~pyvirtio.errors.LocalError`, because the caller chose the address.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import sigbus

U64_MAX = (1 << 64) - 1


class GuestMemoryError(PeerError):
    """An access to guest memory that cannot be honoured."""

    def __init__(self, message: str, addr: int, length: int) -> None:
        super().__init__(message)
        self.addr = addr
        self.length = length


class AddressOverflowError(GuestMemoryError):
    """``addr + length`` wraps past 2^64."""


class UnmappedAddressError(GuestMemoryError):
    """Some byte of the range is not backed by any region."""


class RegionBoundaryError(GuestMemoryError):
    """A single contiguous view was asked for a range that crosses regions."""


class OutsideMemoryError(LocalError):
    """The caller read or wrote guest memory outside what is mapped (its own address)."""

    def __init__(self, message: str, addr: int, length: int) -> None:
        super().__init__(message)
        self.addr = addr
        self.length = length


def _describe(addr: int, length: int) -> str:
    return f"0x{addr:x} +{length}"


@dataclass(eq=False)
class Region:
    """One contiguous piece of guest memory.

    ``gpa`` is its guest-physical base; ``buf`` the writable backing buffer of ``size`` bytes.
    ``user_addr`` is the front-end's virtual address of the same bytes (vhost-user ring
    addresses are given in that space); ``fd``/``fd_offset`` say where it came from so it can
    be shared again. A region owns ``fd`` and ``mmap`` when ``owned`` is true.
    """

    gpa: int
    size: int
    buf: memoryview
    user_addr: int | None = None
    fd: int | None = None
    fd_offset: int = 0
    mmap: mmap.mmap | None = None
    owned: bool = True
    #: the SIGBUS guard of a mapping the peer could shrink (see :mod:`pyvirtio.memory.sigbus`)
    guard: sigbus.Guard | None = None
    end: int = field(init=False)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise LocalError(f"region at 0x{self.gpa:x} has size {self.size}")
        if self.gpa < 0 or self.gpa + self.size - 1 > U64_MAX:
            raise LocalError(f"region {_describe(self.gpa, self.size)} overflows 64 bits")
        if len(self.buf) < self.size:
            raise LocalError(
                f"region {_describe(self.gpa, self.size)} backed by only {len(self.buf)} bytes"
            )
        if self.buf.readonly:
            raise LocalError(f"region {_describe(self.gpa, self.size)} backing is read-only")
        self.end = self.gpa + self.size

    def contains(self, addr: int, length: int) -> bool:
        return self.gpa <= addr and addr + length <= self.end

    def close(self) -> None:
        """Release the mapping and the fd if owned. Views handed out keep the mapping alive
        until they are released (Python refuses to unmap exported buffers), so a close with
        views outstanding only drops our references."""
        self.buf.release()
        if self.owned:
            if self.mmap is not None:
                try:
                    self.mmap.close()
                except BufferError:
                    pass  # outstanding views: unmapped when the last one is collected
                else:
                    sigbus.release(self.guard)  # (kept while the views may still fault)
            if self.fd is not None:
                os.close(self.fd)
        self.mmap = None
        self.fd = None


class GuestMemory:
    """Guest-physical memory made of non-overlapping regions.

    Lookups cache the last region hit, so the common single-region case costs one range check.
    """

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self._regions: list[Region] = []
        self._last: Region | None = None
        #: bumped whenever a region is added or removed, so a data path that keeps the
        #: regions at hand (the blk fast path) knows when to look again
        self.generation = 0
        for region in regions:
            self.add_region(region)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def anonymous(cls, size: int, gpa: int = 0, name: str = "pyvirtio-guest") -> GuestMemory:
        """Fresh zeroed memory backed by a memfd, so it can be shared with another process
        by passing :attr:`Region.fd` (vhost-user, the two-process DevicePair)."""
        return cls([anonymous_region(size, gpa, name)])

    @classmethod
    def from_file(cls, path: str, size: int, gpa: int = 0) -> GuestMemory:
        """Map ``size`` bytes of the file at ``path`` (e.g. QEMU's memory-backend-file in
        /dev/shm for qtest) shared and writable at guest-physical ``gpa``."""
        fd = os.open(path, os.O_RDWR)
        try:
            return cls([region_from_fd(fd, gpa, size, 0)])
        except BaseException:
            os.close(fd)
            raise

    def add_region(self, region: Region) -> None:
        """Add a region; overlapping an existing region is a :class:`LocalError`."""
        for other in self._regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise LocalError(
                    f"region {_describe(region.gpa, region.size)} overlaps "
                    f"{_describe(other.gpa, other.size)}"
                )
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.gpa)
        self.generation += 1

    def remove_region(self, gpa: int, size: int) -> Region:
        """Detach (without closing) the region exactly at ``gpa`` of ``size`` bytes."""
        for region in self._regions:
            if region.gpa == gpa and region.size == size:
                self._regions.remove(region)
                self._last = None
                self.generation += 1
                return region
        raise LocalError(f"no region {_describe(gpa, size)}")

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        """Total bytes across regions."""
        return sum(r.size for r in self._regions)

    def close(self) -> None:
        for region in self._regions:
            region.close()
        self._regions.clear()
        self._last = None
        self.generation += 1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        parts = ", ".join(_describe(r.gpa, r.size) for r in self._regions)
        return f"GuestMemory({parts})"

    # ---- translation --------------------------------------------------------------------

    def _check(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0:
            raise UnmappedAddressError(
                f"negative address or length {_describe(addr, length)}", addr, length
            )
        if addr + length - 1 > U64_MAX and length:
            raise AddressOverflowError(
                f"range {_describe(addr, length)} overflows 64 bits", addr, length
            )

    def _find(self, addr: int) -> Region | None:
        last = self._last
        if last is not None and last.gpa <= addr < last.end:
            return last
        for region in self._regions:
            if region.gpa <= addr < region.end:
                self._last = region
                return region
        return None

    def view(self, addr: int, length: int) -> memoryview:
        """A writable zero-copy view of ``length`` bytes at guest-physical ``addr``.

        The range must lie inside one region (see :meth:`views` for buffers that may span).
        A zero-length range needs only a valid ``addr`` (or any addr when length is 0 and
        the address sits at a region end).
        """
        last = self._last
        if last is not None and last.gpa <= addr and addr + length <= last.end and length >= 0:
            off = addr - last.gpa
            return last.buf[off : off + length]
        self._check(addr, length)
        region = self._find(addr)
        if region is None:
            if length == 0:
                return _EMPTY
            raise UnmappedAddressError(
                f"guest address range {_describe(addr, length)} is not mapped", addr, length
            )
        if addr + length > region.end:
            if self._find(region.end) is not None:
                raise RegionBoundaryError(
                    f"guest address range {_describe(addr, length)} crosses the region boundary"
                    f" at 0x{region.end:x}",
                    addr,
                    length,
                )
            raise UnmappedAddressError(
                f"guest address range {_describe(addr, length)} runs past the end of memory"
                f" at 0x{region.end:x}",
                addr,
                length,
            )
        off = addr - region.gpa
        return region.buf[off : off + length]

    def views(self, addr: int, length: int) -> list[memoryview]:
        """Zero-copy views covering ``length`` bytes at ``addr``, split at region boundaries.

        Fails unless every byte is backed (adjacent regions are fine, holes are not).
        """
        last = self._last
        if last is not None and last.gpa <= addr and addr + length <= last.end and length >= 0:
            off = addr - last.gpa
            return [last.buf[off : off + length]]
        self._check(addr, length)
        out: list[memoryview] = []
        cur, remaining = addr, length
        while remaining > 0:
            region = self._find(cur)
            if region is None:
                raise UnmappedAddressError(
                    f"guest address range {_describe(addr, length)} is not mapped"
                    f" (hole at 0x{cur:x})",
                    addr,
                    length,
                )
            off = cur - region.gpa
            n = min(remaining, region.size - off)
            out.append(region.buf[off : off + n])
            cur += n
            remaining -= n
        return out

    def contains(self, addr: int, length: int) -> bool:
        """Whether every byte of the range is backed by some region."""
        try:
            self.views(addr, length)
        except GuestMemoryError:
            return False
        return True

    def _own_views(self, addr: int, length: int) -> list[memoryview]:
        try:
            return self.views(addr, length)
        except GuestMemoryError as exc:
            where = "closed guest memory" if not self._regions else "guest memory"
            raise OutsideMemoryError(
                f"{_describe(addr, length)} is outside {where} ({exc})", addr, length
            ) from None

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest memory at an address the caller chose
        (:class:`OutsideMemoryError` if it is not all mapped)."""
        views = self._own_views(addr, length)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(bytes(v) for v in views)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``addr``, an address the caller chose
        (:class:`OutsideMemoryError` if it is not all mapped)."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in self._own_views(addr, len(src)):
            n = len(view)
            view[:] = src[pos : pos + n]
            pos += n

    # ---- front-end (vhost-user) user addresses ------------------------------------------

    def user_to_gpa(self, uaddr: int, length: int) -> int:
        """Translate a front-end virtual address (vhost-user ring addresses) to a
        guest-physical address; the whole range must lie in one region."""
        for region in self._regions:
            ua = region.user_addr
            if ua is not None and ua <= uaddr and uaddr + length <= ua + region.size:
                return region.gpa + (uaddr - ua)
        raise UnmappedAddressError(
            f"front-end address range {_describe(uaddr, length)} is not in any memory region",
            uaddr,
            length,
        )

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)


_EMPTY = memoryview(bytearray(0))


def anonymous_region(size: int, gpa: int = 0, name: str = "pyvirtio-guest") -> Region:
    """A zeroed memfd-backed region (shareable by its fd)."""
    if size <= 0:
        raise LocalError(f"memory size must be positive, not {size}")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return region_from_fd(fd, gpa, size, 0)
    except BaseException:
        os.close(fd)
        raise


def region_from_fd(
    fd: int,
    gpa: int,
    size: int,
    fd_offset: int,
    user_addr: int | None = None,
    owned: bool = True,
) -> Region:
    """Map ``size`` bytes of ``fd`` from ``fd_offset`` shared and writable.

    mmap needs a page-aligned file offset; an unaligned one (vhost-user allows it) is handled
    by mapping from the page below and slicing.
    """
    if size <= 0:
        raise LocalError(f"region size must be positive, not {size}")
    page = mmap.ALLOCATIONGRANULARITY
    base = fd_offset - fd_offset % page
    skip = fd_offset - base
    try:
        mm = mmap.mmap(fd, size + skip, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=base)
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(
            f"cannot map fd {fd} offset 0x{fd_offset:x} size 0x{size:x}: {exc}", gpa, size
        ) from exc
    # The file's owner may shrink it later: a fault past its end must not kill us.
    guard = sigbus.protect(mm, f"region {_describe(gpa, size)}")
    buf = memoryview(mm)[skip : skip + size]
    return Region(gpa=gpa, size=size, buf=buf, user_addr=user_addr, fd=fd,
                  fd_offset=fd_offset, mmap=mm, owned=owned, guard=guard)


def buffer_region(buf: bytearray | memoryview, gpa: int = 0) -> Region:
    """A region over an ordinary writable buffer (tests, in-process pairs without sharing)."""
    view = memoryview(buf).cast("B")
    return Region(gpa=gpa, size=len(view), buf=view, owned=False)


__all__ = [
    "AddressOverflowError",
    "GuestMemory",
    "GuestMemoryError",
    "OutsideMemoryError",
    "Region",
    "RegionBoundaryError",
    "UnmappedAddressError",
    "anonymous_region",
    "buffer_region",
    "region_from_fd",
]
