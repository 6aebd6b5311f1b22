"""The balloon's discard back-end on its own: page runs are merged, a memfd region is
punched with fallocate (its blocks drop, the size stays), a region with only a mapping is
punched with madvise(MADV_REMOVE), and a range is never taken outside its region."""

from __future__ import annotations

import mmap
import os

import pytest

from pyvirtio.device.balloon.discard import (
    PageDiscarder,
    allocated_bytes,
    page_ranges,
    region_of,
)
from pyvirtio.memory import GuestMemory, Region

PAGE = 4096
MIB = 1 << 20


def test_page_numbers_merge_into_sorted_runs() -> None:
    assert page_ranges([7, 3, 4, 5, 9, 10, 1]) == [(1, 1), (3, 3), (7, 1), (9, 2)]
    assert page_ranges([]) == []


def test_a_memfd_region_is_punched_and_keeps_its_size() -> None:
    with GuestMemory.anonymous(4 * MIB, gpa=1 * MIB) as memory:
        memory.write(1 * MIB, b"\x11" * 4 * MIB)
        before = allocated_bytes(memory)
        d = PageDiscarder()
        assert d.discard_gpa_ranges(memory, [(1 * MIB + PAGE, 8 * PAGE)]) == 8 * PAGE
        assert before - allocated_bytes(memory) == 8 * PAGE
        assert memory.read(1 * MIB + PAGE, 8 * PAGE) == bytes(8 * PAGE)
        assert memory.read(1 * MIB, PAGE) == b"\x11" * PAGE
        assert memory.read(1 * MIB + 9 * PAGE, PAGE) == b"\x11" * PAGE
        fd = memory.regions[0].fd
        assert fd is not None and os.fstat(fd).st_size == 4 * MIB
        assert (d.stats.discarded, d.stats.calls) == (8 * PAGE, 1)


def test_ranges_outside_every_region_are_skipped() -> None:
    with GuestMemory.anonymous(MIB) as memory:
        memory.write(0, b"\x22" * MIB)
        d = PageDiscarder()
        assert d.discard_gpa_ranges(memory, [(MIB - PAGE, 2 * PAGE), (2 * MIB, PAGE)]) == 0
        assert region_of(memory, MIB - PAGE, 2 * PAGE) is None
        assert d.stats.calls == 0 and memory.read(MIB - PAGE, PAGE) == b"\x22" * PAGE
        with pytest.raises(ValueError):
            d.discard_range(memory.regions[0], MIB - PAGE, 2 * PAGE)


def test_a_mapping_without_an_fd_is_punched_with_madvise() -> None:
    mm = mmap.mmap(-1, MIB, mmap.MAP_SHARED)
    region = Region(gpa=0, size=MIB, buf=memoryview(mm), mmap=mm, fd=None)
    memory = GuestMemory([region])
    try:
        memory.write(0, b"\x33" * MIB)
        d = PageDiscarder()
        assert d.discard_gpa_ranges(memory, [(4 * PAGE, 4 * PAGE)]) == 4 * PAGE
        assert memory.read(4 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
        assert memory.read(3 * PAGE, PAGE) == b"\x33" * PAGE
        assert d.stats.failed == 0
    finally:
        memory.close()
