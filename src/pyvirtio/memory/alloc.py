"""A small first-fit allocator of guest-physical address ranges.

The driver side of a ring needs guest memory for the vring itself, indirect descriptor tables
and I/O buffers, as a guest kernel would allocate them. This allocator hands out aligned
ranges of a guest-physical window and takes them back; it never touches the memory itself.
"""

from __future__ import annotations

import bisect

from pyvirtio.errors import LocalError


class OutOfGuestMemory(LocalError):
    """The allocator's window has no free range of the requested size."""


class Allocator:
    """First-fit allocation over ``[base, base + size)`` with coalescing frees."""

    def __init__(self, base: int, size: int) -> None:
        if size <= 0:
            raise LocalError(f"allocator window size must be positive, not {size}")
        self.base = base
        self.size = size
        self._free: list[tuple[int, int]] = [(base, base + size)]  # sorted [start, end)
        self._used: dict[int, int] = {}  # start -> end

    def alloc(self, length: int, align: int = 16) -> int:
        """Reserve ``length`` bytes aligned to ``align`` (a power of two); returns the gpa."""
        if length <= 0:
            raise LocalError(f"allocation length must be positive, not {length}")
        if align <= 0 or align & (align - 1):
            raise LocalError(f"alignment must be a power of two, not {align}")
        for i, (start, end) in enumerate(self._free):
            addr = (start + align - 1) & ~(align - 1)
            if addr + length <= end:
                pieces = []
                if start < addr:
                    pieces.append((start, addr))
                if addr + length < end:
                    pieces.append((addr + length, end))
                self._free[i : i + 1] = pieces
                self._used[addr] = addr + length
                return addr
        raise OutOfGuestMemory(
            f"no free range of {length} bytes (align {align}) in "
            f"0x{self.base:x}+0x{self.size:x}; {self.free_bytes} bytes free in total"
        )

    def free(self, addr: int) -> None:
        """Return the allocation that starts at ``addr``."""
        end = self._used.pop(addr, None)
        if end is None:
            raise LocalError(f"0x{addr:x} is not an allocation")
        i = bisect.bisect_left(self._free, (addr, end))
        self._free.insert(i, (addr, end))
        # coalesce with neighbours
        if i + 1 < len(self._free) and self._free[i][1] == self._free[i + 1][0]:
            self._free[i] = (self._free[i][0], self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][1] == self._free[i][0]:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i][1])
            del self._free[i]

    @property
    def free_bytes(self) -> int:
        return sum(end - start for start, end in self._free)

    @property
    def allocations(self) -> int:
        return len(self._used)
