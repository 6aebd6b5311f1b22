"""GuestMemory: bounds-checked, zero-copy guest-physical memory."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import (
    AddressOverflowError,
    GuestMemory,
    GuestMemoryError,
    OutsideMemoryError,
    Region,
    RegionBoundaryError,
    UnmappedAddressError,
    anonymous_region,
    buffer_region,
    region_from_fd,
)

TOP = 1 << 64


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((seed + 7 * i) & 0xFF for i in range(n))


@pytest.fixture
def two_adjacent() -> Iterator[GuestMemory]:
    """0x1000..0x2000 and 0x2000..0x3000 (adjacent), then a hole, then 0x5000..0x6000."""
    mem = GuestMemory([buffer_region(bytearray(pattern(0x1000, 1)), 0x1000),
                       buffer_region(bytearray(pattern(0x1000, 2)), 0x2000),
                       buffer_region(bytearray(pattern(0x1000, 3)), 0x5000)])
    yield mem
    mem.close()


def test_view_is_zero_copy_into_the_backing_buffer() -> None:
    backing = bytearray(4096)
    mem = GuestMemory([buffer_region(backing, 0x10000)])
    view = mem.view(0x10010, 4)
    view[:] = b"abcd"
    assert backing[0x10:0x14] == b"abcd"
    backing[0x20:0x22] = b"xy"
    assert mem.read(0x10020, 2) == b"xy"


def test_view_accepts_a_range_ending_exactly_at_the_region_end(
        two_adjacent: GuestMemory) -> None:
    assert len(two_adjacent.view(0x5FF0, 16)) == 16
    assert bytes(two_adjacent.view(0x5FF0, 16)) == pattern(0x1000, 3)[-16:]
    assert len(two_adjacent.view(0x6000, 0)) == 0


@pytest.mark.parametrize("addr,length", [(0x5FF0, 17), (0x6000, 1), (0x5FFF, 2), (0x4FFF, 1),
                                         (0x3000, 1), (0x2FFF, 2), (0, 1), (0x10000, 8)])
def test_view_refuses_ranges_not_backed_by_memory(two_adjacent: GuestMemory, addr: int,
                                                  length: int) -> None:
    two_adjacent.view(0x5000, 1)  # warm the last-region cache: the fast path must check too
    with pytest.raises(UnmappedAddressError) as err:
        two_adjacent.view(addr, length)
    assert err.value.addr == addr and err.value.length == length
    assert f"0x{addr:x} +{length}" in str(err.value)
    with pytest.raises(UnmappedAddressError):
        two_adjacent.views(addr, length)
    assert not two_adjacent.contains(addr, length)


def test_views_split_a_buffer_at_a_region_boundary(two_adjacent: GuestMemory) -> None:
    views = two_adjacent.views(0x1FF0, 0x20)
    assert [len(v) for v in views] == [0x10, 0x10]
    assert bytes(views[0]) == pattern(0x1000, 1)[-16:]
    assert bytes(views[1]) == pattern(0x1000, 2)[:16]
    assert two_adjacent.read(0x1FF0, 0x20) == bytes(views[0]) + bytes(views[1])
    views = two_adjacent.views(0x1000, 0x2000)  # both regions whole
    assert [len(v) for v in views] == [0x1000, 0x1000]


def test_view_refuses_a_range_that_crosses_a_region_boundary(two_adjacent: GuestMemory) -> None:
    with pytest.raises(RegionBoundaryError) as err:
        two_adjacent.view(0x1FF0, 0x20)
    assert "0x2000" in str(err.value)
    assert isinstance(err.value, GuestMemoryError) and isinstance(err.value, PeerError)
    assert two_adjacent.contains(0x1FF0, 0x20)  # but it is memory


def test_views_refuse_a_buffer_across_a_hole(two_adjacent: GuestMemory) -> None:
    with pytest.raises(UnmappedAddressError) as err:
        two_adjacent.views(0x2FF0, 0x2020)
    assert "hole at 0x3000" in str(err.value)


def test_read_and_write_outside_memory_are_the_callers_mistake(
        two_adjacent: GuestMemory) -> None:
    # read/write take the caller's own addresses: a LocalError, not the peer's fault
    with pytest.raises(OutsideMemoryError, match="hole at 0x3000") as err:
        two_adjacent.read(0x2FFF, 2)
    assert isinstance(err.value, LocalError) and not isinstance(err.value, PeerError)
    with pytest.raises(OutsideMemoryError):
        two_adjacent.write(0x4FFF, b"ab")


def test_write_spans_regions(two_adjacent: GuestMemory) -> None:
    two_adjacent.write(0x1FFE, b"wxyz")
    assert two_adjacent.read(0x1FFE, 2) == b"wx"
    assert bytes(two_adjacent.view(0x2000, 2)) == b"yz"


def test_write_accepts_memoryviews_of_any_format(two_adjacent: GuestMemory) -> None:
    words = memoryview(bytearray(8)).cast("I")
    words[0], words[1] = 0x01020304, 0x05060708
    two_adjacent.write(0x5000, words)
    assert two_adjacent.read(0x5000, 8) == bytes.fromhex("0403020108070605")


def test_region_cache_does_not_leak_across_regions(two_adjacent: GuestMemory) -> None:
    assert bytes(two_adjacent.view(0x1004, 4)) == pattern(0x1000, 1)[4:8]
    assert bytes(two_adjacent.view(0x5004, 4)) == pattern(0x1000, 3)[4:8]
    assert bytes(two_adjacent.view(0x2004, 4)) == pattern(0x1000, 2)[4:8]
    assert bytes(two_adjacent.view(0x1004, 4)) == pattern(0x1000, 1)[4:8]


def test_negative_addresses_and_lengths_are_refused(two_adjacent: GuestMemory) -> None:
    for addr, length in ((-1, 4), (0x1000, -1), (-4096, 8192)):
        with pytest.raises(GuestMemoryError):
            two_adjacent.view(addr, length)
        with pytest.raises(GuestMemoryError):
            two_adjacent.views(addr, length)


def test_ranges_that_overflow_64_bits_are_refused() -> None:
    top = GuestMemory([buffer_region(bytearray(4096), TOP - 4096)])
    assert len(top.view(TOP - 16, 16)) == 16  # ends exactly at 2^64
    top.write(TOP - 4, b"last")
    assert top.read(TOP - 4, 4) == b"last"
    for addr, length in ((TOP - 16, 17), (TOP - 1, 2), (TOP - 1, (1 << 64) - 1),
                         (1 << 63, 1 << 63 | 1), (0xFFFFFFFFFFFFF000, 0x2000)):
        with pytest.raises(AddressOverflowError) as err:
            top.views(addr, length)
        assert f"0x{addr:x}" in str(err.value)
        with pytest.raises(AddressOverflowError):
            top.view(addr, length)


def test_regions_that_overflow_or_overlap_are_refused() -> None:
    with pytest.raises(LocalError):
        buffer_region(bytearray(4096), TOP - 4095)
    with pytest.raises(LocalError):
        Region(gpa=0, size=0, buf=memoryview(bytearray(1)))
    with pytest.raises(LocalError):
        Region(gpa=0, size=16, buf=memoryview(bytearray(8)))
    with pytest.raises(LocalError):
        Region(gpa=0, size=4, buf=memoryview(b"read"))  # read-only backing
    mem = GuestMemory([buffer_region(bytearray(4096), 0x1000)])
    for gpa, size in ((0x1000, 16), (0x0FF0, 0x20), (0x1FFF, 1), (0, 0x3000)):
        with pytest.raises(LocalError):
            mem.add_region(buffer_region(bytearray(size), gpa))
    mem.add_region(buffer_region(bytearray(16), 0x2000))  # adjacent is fine
    assert mem.size == 4096 + 16


def test_removed_region_is_no_longer_reachable() -> None:
    mem = GuestMemory([buffer_region(bytearray(4096), 0), buffer_region(bytearray(4096), 4096)])
    mem.view(4096, 4)  # cache the second region
    region = mem.remove_region(4096, 4096)
    assert region.gpa == 4096
    with pytest.raises(UnmappedAddressError):
        mem.view(4100, 4)
    with pytest.raises(LocalError):
        mem.remove_region(4096, 4096)


def test_user_addresses_translate_to_guest_physical() -> None:
    mem = GuestMemory()
    mem.add_region(Region(gpa=0, size=0x1000, buf=memoryview(bytearray(0x1000)),
                          user_addr=0x7F0000000000, owned=False))
    mem.add_region(Region(gpa=0x100000, size=0x2000, buf=memoryview(bytearray(0x2000)),
                          user_addr=0x7F0000100000, owned=False))
    mem.add_region(buffer_region(bytearray(0x1000), 0x200000))  # no user address
    assert mem.user_to_gpa(0x7F0000000010, 16) == 0x10
    assert mem.user_to_gpa(0x7F0000101FF0, 16) == 0x101FF0
    assert mem.user_to_gpa(0x7F0000100000, 0x2000) == 0x100000
    for uaddr, length in ((0x7F0000000FF0, 17), (0x7EFFFFFFFFFF, 2), (0x7F0000102000, 1),
                          (0x200000, 4)):
        with pytest.raises(UnmappedAddressError):
            mem.user_to_gpa(uaddr, length)


def test_anonymous_memory_is_zeroed_memfd_backed_and_closes() -> None:
    mem = GuestMemory.anonymous(1 << 20, gpa=0x40000000)
    region = mem.regions[0]
    assert region.fd is not None and region.gpa == 0x40000000
    assert mem.read(0x40000000, 64) == bytes(64)
    assert os.fstat(region.fd).st_size == 1 << 20
    fd = region.fd
    mem.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(LocalError):
        anonymous_region(0)


CHILD = r"""
import mmap, os, sys
fd, size, off = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
m = mmap.mmap(fd, size, mmap.MAP_SHARED)
sys.stdout.write(m[off:off + 5].decode())
m[off + 16:off + 21] = b"child"
m.close()
"""


def test_memfd_memory_is_shared_with_another_process() -> None:
    mem = GuestMemory.anonymous(1 << 16, gpa=0x100000)
    try:
        region = mem.regions[0]
        assert region.fd is not None
        mem.write(0x100000 + 0x1230, b"hello")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(region.fd), str(1 << 16),
                               str(0x1230)], pass_fds=(region.fd,), capture_output=True,
                              timeout=30, check=True)
        assert proc.stdout == b"hello"  # the child saw what we wrote
        assert mem.read(0x100000 + 0x1240, 5) == b"child"  # and we see what it wrote
    finally:
        mem.close()


def test_region_from_fd_handles_an_unaligned_file_offset() -> None:
    fd = os.memfd_create("test-unaligned")
    try:
        os.ftruncate(fd, 3 * mmap.ALLOCATIONGRANULARITY)
        os.pwrite(fd, b"marker", mmap.ALLOCATIONGRANULARITY + 100)
        region = region_from_fd(fd, 0x8000, 4096, mmap.ALLOCATIONGRANULARITY + 100, owned=False)
        mem = GuestMemory([region])
        assert mem.read(0x8000, 6) == b"marker"
        mem.write(0x8010, b"back")
        assert os.pread(fd, 4, mmap.ALLOCATIONGRANULARITY + 116) == b"back"
        mem.close()
        os.fstat(fd)  # not owned: still open
    finally:
        os.close(fd)


def test_region_from_fd_reports_a_failed_map_as_a_memory_error() -> None:
    r, w = os.pipe()  # a pipe cannot be mapped
    try:
        with pytest.raises(GuestMemoryError):
            region_from_fd(r, 0, 4096, 0, owned=False)
    finally:
        os.close(r)
        os.close(w)


def test_from_file_maps_a_shared_file() -> None:
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(8192)
        mem = GuestMemory.from_file(f.name, 8192, gpa=0x1000)
        mem.write(0x1000 + 4096, b"qtest")
        f.seek(4096)
        assert f.read(5) == b"qtest"
        mem.close()


# ---- against an independent model -------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Up to 4 regions as (gpa, size): each either adjacent to the previous one or after
    a hole."""
    gpa = draw(st.sampled_from([0, 0x1000, TOP - 0x4000]))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.integers(1, 64))
        if gpa + size > TOP:
            break
        out.append((gpa, size))
        gpa += size + draw(st.sampled_from([0, 0, 1, 16]))
    return out


@settings(max_examples=300, deadline=None)
@given(layout=layouts(), data=st.data())
def test_views_match_a_byte_by_byte_model(layout: list[tuple[int, int]],
                                          data: st.DataObject) -> None:
    contents = {gpa: bytearray(os.urandom(size)) for gpa, size in layout}
    mem = GuestMemory([buffer_region(contents[gpa], gpa) for gpa, _ in layout])
    byte_at = {gpa + i: (gpa, i) for gpa, size in layout for i in range(size)}
    lo, hi = layout[0][0], layout[-1][0] + layout[-1][1]
    for _ in range(20):
        addr = data.draw(st.integers(max(0, lo - 4), hi + 4))
        length = data.draw(st.integers(0, hi - lo + 8))
        backed = all(a in byte_at for a in range(addr, addr + length))
        if addr + length > TOP:
            with pytest.raises(AddressOverflowError):
                mem.views(addr, length)
            continue
        if not backed:
            with pytest.raises(UnmappedAddressError):
                mem.views(addr, length)
            if length:
                with pytest.raises(GuestMemoryError):
                    mem.view(addr, length)
            continue
        expect = bytes(contents[byte_at[a][0]][byte_at[a][1]] for a in range(addr, addr + length))
        views = mem.views(addr, length)
        assert b"".join(bytes(v) for v in views) == expect
        regions_touched = {byte_at[a][0] for a in range(addr, addr + length)}
        if length:
            assert len(views) == len(regions_touched)
        if len(regions_touched) <= 1:
            assert bytes(mem.view(addr, length)) == expect
        else:
            with pytest.raises(RegionBoundaryError):
                mem.view(addr, length)


# ---- a peer that shrinks the file under a shared mapping -----------------------------------


def test_a_mapped_file_shrunk_by_its_owner_reads_zeros_instead_of_killing_us() -> None:
    fd = os.memfd_create("shrunk", os.MFD_CLOEXEC)  # not sealable: nothing stops a shrink
    os.ftruncate(fd, 4 * 4096)
    region = region_from_fd(fd, 0x10000, 4 * 4096, 0)
    try:
        region.buf[:4] = b"live"
        os.ftruncate(fd, 4096)  # the owner cuts the file to its first page
        assert region.guard is not None and region.guard.faulted == 0
        assert bytes(region.buf[:4]) == b"live"  # still inside the file
        assert bytes(region.buf[8192:8200]) == bytes(8)  # past its end: SIGBUS, survived
        assert region.guard.faulted == 1
        region.buf[3 * 4096 : 3 * 4096 + 4] = b"gone"  # already replaced: no second fault
        assert bytes(region.buf[3 * 4096 : 3 * 4096 + 4]) == b"gone"
        assert region.guard.faulted == 1
    finally:
        region.close()


UNGUARDED_CHILD = r"""
import mmap, os
from pyvirtio.memory import region_from_fd
fd = os.memfd_create("guarded")
os.ftruncate(fd, 8192)
region = region_from_fd(fd, 0, 8192, 0)  # installs the SIGBUS handler
other = os.memfd_create("unguarded")
os.ftruncate(other, 8192)
m = mmap.mmap(other, 8192)
os.ftruncate(other, 0)
print(m[5000])  # not guest memory: must still die of SIGBUS
"""


def test_a_sigbus_outside_guest_memory_still_kills_the_process() -> None:
    proc = subprocess.run([sys.executable, "-c", UNGUARDED_CHILD], capture_output=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGBUS, proc
