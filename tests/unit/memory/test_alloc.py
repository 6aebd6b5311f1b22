"""The first-fit guest-physical allocator used for rings, indirect tables and buffers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import LocalError
from pyvirtio.memory.alloc import Allocator, OutOfGuestMemory


def test_allocations_are_aligned_and_inside_the_window() -> None:
    a = Allocator(0x1000, 0x10000)
    x = a.alloc(10, 1)
    y = a.alloc(100, 64)
    z = a.alloc(4096, 4096)
    assert x == 0x1000
    assert y % 64 == 0 and y >= x + 10
    assert z % 4096 == 0 and z >= y + 100
    assert z + 4096 <= 0x11000
    assert a.allocations == 3


def test_first_fit_reuses_the_lowest_hole() -> None:
    a = Allocator(0, 1024)
    blocks = [a.alloc(64, 16) for _ in range(4)]
    assert blocks == [0, 64, 128, 192]
    a.free(64)
    assert a.alloc(32, 16) == 64
    assert a.alloc(32, 16) == 96
    assert a.alloc(32, 16) == 256  # the hole is full now


def test_freeing_coalesces_neighbours() -> None:
    a = Allocator(0, 1024)
    blocks = [a.alloc(256, 16) for _ in range(4)]
    for b in (blocks[1], blocks[3], blocks[2], blocks[0]):
        a.free(b)
    assert a.free_bytes == 1024 and a.allocations == 0
    assert a.alloc(1024, 16) == 0  # one piece again


def test_exhaustion_raises_a_local_error_naming_the_request() -> None:
    a = Allocator(0, 256)
    a.alloc(200, 16)
    with pytest.raises(OutOfGuestMemory) as err:
        a.alloc(100, 16)
    assert isinstance(err.value, LocalError)
    assert "100 bytes" in str(err.value)
    # alignment padding counts: 56 bytes free at 200..256, but 64-aligned 48 bytes do not fit
    a2 = Allocator(8, 64)
    with pytest.raises(OutOfGuestMemory):
        a2.alloc(64, 64)


@pytest.mark.parametrize("length,align", [(0, 16), (-1, 16), (16, 0), (16, 3), (16, 24)])
def test_bad_requests_are_refused(length: int, align: int) -> None:
    with pytest.raises(LocalError):
        Allocator(0, 4096).alloc(length, align)


def test_freeing_something_not_allocated_is_refused() -> None:
    a = Allocator(0, 4096)
    x = a.alloc(64)
    a.free(x)
    with pytest.raises(LocalError):
        a.free(x)
    with pytest.raises(LocalError):
        a.free(12345)
    with pytest.raises(LocalError):
        Allocator(0, 0)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 300),
                              st.sampled_from([1, 2, 16, 64, 256])), max_size=80))
def test_random_alloc_free_never_overlaps_and_returns_everything(
        ops: list[tuple[bool, int, int]]) -> None:
    a = Allocator(0x100, 4096)
    live: dict[int, int] = {}
    for is_alloc, length, align in ops:
        if is_alloc or not live:
            try:
                addr = a.alloc(length, align)
            except OutOfGuestMemory:
                continue
            assert addr % align == 0
            assert 0x100 <= addr and addr + length <= 0x100 + 4096
            for other, n in live.items():
                assert addr + length <= other or other + n <= addr
            live[addr] = length
        else:
            addr = min(live)
            a.free(addr)
            del live[addr]
        assert a.allocations == len(live)
        assert a.free_bytes == 4096 - sum(live.values())
    for addr in list(live):
        a.free(addr)
    assert a.free_bytes == 4096
    assert a.alloc(4096, 1) == 0x100
