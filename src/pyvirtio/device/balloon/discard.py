"""Giving guest pages back to the host: the balloon's discard back-end.

A page the guest gives up (inflated, or reported free) is removed from the front-end's shared
memory: ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` on the region's file (memfd, tmpfs or the file
UML and QEMU share), or ``madvise(MADV_REMOVE)`` on our mapping when the region has no fd.
The host gets the memory back at once; the guest sees zero-filled pages when it next touches
them.

Pages are validated against the guest's regions *before* anything is punched: a page that
is not wholly inside one region is refused (with its address, so the log names the culprit),
and consecutive pages are batched into one range per system call.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyvirtio.memory import GuestMemory, Region
from pyvirtio.memory.host import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    buffer_address,
    fallocate,
)
from pyvirtio.spec.balloon import PAGE_SIZE

log = logging.getLogger("pyvirtio.device.balloon")

PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


@dataclass
class DiscardStats:
    """What the discard back-end did so far (bytes)."""

    discarded: int = 0  # bytes punched out of guest memory
    calls: int = 0  # fallocate/madvise calls made
    failed: int = 0  # bytes we could not discard (no fd or mapping, or the call failed)
    errors: list[str] = field(default_factory=list)


def page_ranges(pfns: Iterable[int]) -> list[tuple[int, int]]:
    """Sort and merge page frame numbers into ``(first_pfn, count)`` runs."""
    out: list[tuple[int, int]] = []
    for pfn in sorted(pfns):
        if out and out[-1][0] + out[-1][1] == pfn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        elif not out or pfn >= out[-1][0] + out[-1][1]:
            out.append((pfn, 1))
    return out


def region_of(memory: GuestMemory, gpa: int, length: int) -> Region | None:
    """The region holding all of ``[gpa, gpa + length)``, or None."""
    for region in memory:
        if region.gpa <= gpa and gpa + length <= region.end:
            return region
    return None


def region_of_view(memory: GuestMemory, view: memoryview) -> tuple[Region, int] | None:
    """Which region a zero-copy view of guest memory lies in, and its offset there (free page
    reports hand us the freed pages themselves as descriptor buffers)."""
    addr = buffer_address(view)
    if addr < 0:
        return None
    for region in memory:
        base = buffer_address(region.buf)
        if base >= 0 and base <= addr and addr + len(view) <= base + region.size:
            return region, addr - base
    return None


class PageDiscarder:
    """Punch guest-physical page ranges out of ``memory``'s backing files."""

    def __init__(self) -> None:
        self.stats = DiscardStats()

    def discard_range(self, region: Region, offset: int, length: int) -> bool:
        """Discard ``length`` bytes at ``offset`` into ``region`` (already validated to be
        inside it). Returns whether the host really got the memory back."""
        if offset < 0 or length <= 0 or offset + length > region.size:
            raise ValueError(f"discard {offset}+{length} outside a {region.size}-byte region")
        self.stats.calls += 1
        try:
            if region.fd is not None:
                fallocate(region.fd, PUNCH, region.fd_offset + offset, length)
            elif region.mmap is not None:
                skip = len(region.mmap) - region.size  # the region's offset in its mapping
                start = skip + offset
                if start % mmap.PAGESIZE or length % mmap.PAGESIZE:
                    raise OSError(f"range {start}+{length} is not page-aligned for madvise")
                region.mmap.madvise(mmap.MADV_REMOVE, start, length)
            else:
                # Plain buffer (tests): zero it, which is what the guest must see anyway.
                region.buf[offset : offset + length] = bytes(length)
                self.stats.failed += length
                return False
        except OSError as exc:
            self.stats.failed += length
            message = (f"cannot discard guest 0x{region.gpa + offset:x} +{length}: {exc}")
            self.stats.errors.append(message)
            log.warning("%s", message)
            return False
        self.stats.discarded += length
        return True

    def discard_gpa_ranges(self, memory: GuestMemory,
                           ranges: Iterable[tuple[int, int]]) -> int:
        """Discard ``(gpa, length)`` ranges, each already checked to lie in one region of
        ``memory`` (a range that does not is skipped). Returns the bytes discarded."""
        done = 0
        for gpa, length in ranges:
            region = region_of(memory, gpa, length)
            if region is None:
                continue
            if self.discard_range(region, gpa - region.gpa, length):
                done += length
        return done


def allocated_bytes(memory: GuestMemory) -> int:
    """Host memory the guest's regions occupy now: the allocated blocks of their files
    (``st_blocks``), each file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for region in memory:
        if region.fd is None:
            continue
        try:
            st = os.fstat(region.fd)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        total += st.st_blocks * 512
    return total


__all__ = ["PAGE_SIZE", "DiscardStats", "PageDiscarder", "allocated_bytes", "page_ranges",
           "region_of", "region_of_view"]
