"""A used packed descriptor's length without the WRITE flag (VIRTIO 1.1 §2.8.6 calls it
reserved): QEMU 7.2's devices write the real length there and never set WRITE, and Linux's
driver takes the length whatever the flag. Our driver does the same for buffers that have
writable bytes (still checked against them) and takes 0 for buffers that have none."""

from __future__ import annotations

import struct

import pytest

from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import PackedDriverQueue, RingError

DESC, DRIVER, DEVICE = 0x1000, 0x2000, 0x3000
USED_WRAP1 = 1 << 7 | 1 << 15  # AVAIL = USED = 1: used in the first lap, no WRITE


def used(memory: GuestMemory, slot: int, buf_id: int, length: int) -> None:
    """Write a used descriptor as QEMU 7.2 does: length and id, flags without WRITE."""
    memory.write(DESC + 16 * slot + 8, struct.pack("<IHH", length, buf_id, USED_WRAP1))


def driver() -> tuple[GuestMemory, PackedDriverQueue]:
    memory = GuestMemory.anonymous(1 << 16)
    q = PackedDriverQueue(memory, 8, DESC, DRIVER, DEVICE, allocator=Allocator(0x4000, 0x8000))
    return memory, q


def test_a_used_length_without_write_counts_for_a_writable_buffer() -> None:
    memory, q = driver()
    q.add_buf([], [(0x5000, 64)], "rng")
    used(memory, 0, 0, 64)
    assert q.get_buf() == ("rng", 64)


def test_a_used_length_without_write_is_ignored_for_a_read_only_buffer() -> None:
    memory, q = driver()
    q.add_buf([(0x5000, 64)], [], "tx")
    used(memory, 0, 0, 64)
    assert q.get_buf() == ("tx", 0)


def test_a_used_length_without_write_is_still_checked_against_the_writable_bytes() -> None:
    memory, q = driver()
    q.add_buf([], [(0x5000, 64)], "rng")
    used(memory, 0, 0, 65)
    with pytest.raises(RingError, match="65 bytes"):
        q.get_buf()
