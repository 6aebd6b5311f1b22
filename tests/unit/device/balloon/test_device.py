"""Our balloon driver on our balloon device, in memory (DevicePair over a memfd): pages the
driver gives up are punched out of the memory file (its allocated blocks drop, the pages read
as zeros), deflated pages come back, the stats queue carries the driver's allocator figures,
and free page reports are discarded too. Hostile page lists are refused by name and never
punch anything but the pages they validly name."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from pyvirtio.device.balloon import BalloonDevice, allocated_bytes
from pyvirtio.driver.balloon import BalloonDriver
from pyvirtio.spec import balloon as B
from pyvirtio.spec import features as F
from pyvirtio.testing.pair import DevicePair

MIB = 1 << 20
PAGE = B.PAGE_SIZE
MEMORY = 32 * MIB


@pytest.fixture
def pair() -> Iterator[tuple[DevicePair, BalloonDevice, BalloonDriver]]:
    device = BalloonDevice(queue_size=16)
    with DevicePair(device, MEMORY) as p:
        # Every byte of guest memory is touched, so discards show in the file's blocks.
        p.memory.write(0, b"\xa5" * MEMORY)
        drv = p.probe()
        assert isinstance(drv, BalloonDriver)
        yield p, device, drv


def allocated(pair: DevicePair) -> int:
    return allocated_bytes(pair.memory)


def post_pfns(drv: BalloonDriver, queue: str, data: bytes) -> None:
    """What a hostile driver posts: any bytes as a PFN list."""
    drv.device.memory.write(drv.pfn_buf, data)
    vq = drv.vqs[queue]
    vq.add_buf([(drv.pfn_buf, len(data))], [], token="raw")
    vq.kick()
    assert vq.wait_buf(5)[0] == "raw"


def pfns(*numbers: int) -> bytes:
    return b"".join(struct.pack("<I", n) for n in numbers)


def test_the_driver_inflates_to_the_target_and_the_pages_leave_the_memory_file(
        pair: tuple[DevicePair, BalloonDevice, BalloonDriver]) -> None:
    p, device, drv = pair
    before = allocated(p)
    device.set_target(8 * MIB)
    assert drv.service()
    assert device.actual_bytes == 8 * MIB == len(drv.pages) * PAGE
    assert device.balloon == {gpa // PAGE for gpa in drv.pages}
    assert before - allocated(p) == 8 * MIB
    assert device.discarder.stats.discarded == 8 * MIB
    for gpa in drv.pages[:: 97]:
        assert p.memory.read(gpa, PAGE) == bytes(PAGE)
    # Batched: far fewer punches than pages (the allocator hands out consecutive pages).
    assert device.discarder.stats.calls < 8 * MIB // PAGE // 64

    given = list(drv.pages)
    device.set_target(2 * MIB)
    assert drv.service()
    # Deflated pages come back as zero pages, usable again (they take host memory again).
    back = [gpa for gpa in given if gpa not in drv.pages]
    assert len(back) == 6 * MIB // PAGE
    low = allocated(p)
    assert p.memory.read(back[0], PAGE) == bytes(PAGE)
    p.memory.write(back[0], b"\x01" * PAGE)
    assert allocated(p) == low + PAGE
    assert device.actual_bytes == 2 * MIB and len(device.balloon) == 2 * MIB // PAGE
    assert device.counters.deflated == 6 * MIB // PAGE
    device.set_target(0)
    assert drv.service()
    assert device.balloon == set() and device.actual_pages == 0
    assert device.problems == []


def test_the_driver_answers_stats_requests_with_its_allocator_figures(
        pair: tuple[DevicePair, BalloonDevice, BalloonDriver]) -> None:
    p, device, drv = pair
    assert device.stats["total"] == MEMORY  # the buffer posted at probe
    device.set_target(4 * MIB)
    drv.service()
    assert device.request_stats()
    assert drv.answer_stats()
    assert device.stats["free"] == p.allocator.free_bytes
    assert device.stats["available"] == p.allocator.free_bytes
    assert device.counters.stats_updates == 2
    assert not device.request_stats() or drv.answer_stats()


def test_free_page_reports_are_discarded_without_a_target_change(
        pair: tuple[DevicePair, BalloonDevice, BalloonDriver]) -> None:
    p, device, drv = pair
    before = allocated(p)
    assert drv.report_free(6 * MIB) == 6 * MIB
    assert device.counters.reported_bytes == 6 * MIB
    assert before - allocated(p) == 6 * MIB
    assert device.actual_pages == 0 and device.problems == []


def test_without_reporting_and_stats_the_queues_are_numbered_compactly() -> None:
    device = BalloonDevice()
    with DevicePair(device, MEMORY) as p:
        drv = p.probe(features=F.bit(F.VERSION_1) | 1 << B.VIRTIO_BALLOON_F_REPORTING)
        assert isinstance(drv, BalloonDriver)
        assert list(drv.vqs) == ["inflate", "deflate", "reporting"]
        assert drv.vqs["reporting"].index == 2
        assert drv.report_free(MIB) == MIB
        assert device.counters.reported_bytes == MIB and device.problems == []


# ---- hostile page lists ---------------------------------------------------------------


def test_a_page_outside_guest_memory_is_refused_by_number_and_nothing_else_is_punched(
        pair: tuple[DevicePair, BalloonDevice, BalloonDriver]) -> None:
    p, device, drv = pair
    before = allocated(p)
    size = os.fstat(p.memory.regions[0].fd or -1).st_size
    outside = MEMORY // PAGE  # the first page past the end
    post_pfns(drv, "inflate", pfns(100, outside, 0xFFFFFFFF))
    assert any(f"page frame {outside} " in m and "outside guest memory" in m
               for m in device.problems)
    assert any("page frame 4294967295 " in m for m in device.problems)
    assert device.balloon == {100}
    assert before - allocated(p) == PAGE
    assert os.fstat(p.memory.regions[0].fd or -1).st_size == size
    assert p.memory.read(99 * PAGE, PAGE) == b"\xa5" * PAGE
    assert p.memory.read(MEMORY - PAGE, PAGE) == b"\xa5" * PAGE


def test_a_pfn_list_that_is_not_a_multiple_of_4_bytes_is_refused_whole(
        pair: tuple[DevicePair, BalloonDevice, BalloonDriver]) -> None:
    p, device, drv = pair
    before = allocated(p)
    post_pfns(drv, "inflate", pfns(200) + b"\x01\x00")
    assert any("holds 6 bytes" in m for m in device.problems)
    assert device.balloon == set() and allocated(p) == before
    # The queue keeps working.
    device.set_target(MIB)
    assert drv.service() and device.actual_bytes == MIB


def test_a_page_given_twice_is_refused_the_second_time(
        pair: tuple[DevicePair, BalloonDevice, BalloonDriver]) -> None:
    _, device, drv = pair
    post_pfns(drv, "inflate", pfns(300, 300))
    post_pfns(drv, "inflate", pfns(300))
    assert sum("page frame 300 " in m and "already in the balloon" in m
               for m in device.problems) == 2
    assert device.balloon == {300} and device.counters.inflated == 1
    post_pfns(drv, "deflate", pfns(300, 301))
    assert any("page frame 301 " in m and "not in the balloon" in m for m in device.problems)
    assert device.balloon == set()


def test_a_report_larger_than_the_queue_is_refused_and_nothing_is_punched(
        pair: tuple[DevicePair, BalloonDevice, BalloonDriver]) -> None:
    p, device, drv = pair
    before = allocated(p)
    vq = drv.vqs["reporting"]
    assert vq.ring.size == 16 and drv.device.has_feature(F.INDIRECT_DESC)
    pages = [p.allocator.alloc(PAGE, PAGE) for _ in range(17)]
    vq.add_buf([], [(a, PAGE) for a in pages], token="big")  # one indirect table
    vq.kick()
    assert vq.wait_buf(5)[0] == "big"
    assert any("17 buffers, more than the queue's 16 entries" in m for m in device.problems)
    assert allocated(p) == before and device.counters.reported_bytes == 0
    assert p.memory.read(pages[0], PAGE) == b"\xa5" * PAGE
