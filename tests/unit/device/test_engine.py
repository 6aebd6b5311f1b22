"""The serving engine is every device's: request tracking for crash-safe reconnection works
for a device that is not blk (virtio-rng here), with the real inflight region."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from helpers.engine import QSIZE, driver_ring, start
from pyvirtio.device.rng import RngDevice
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverQueue
from pyvirtio.transport.vhost_user.inflight import QueueInflight, queue_region_size


class FrozenClock:
    """A reactor whose time stands still and whose timers never fire: a rate-limited rng
    holds what exceeds its burst until the process 'dies'."""

    def time(self) -> float:
        return 0.0

    def call_later(self, delay: float, callback: Callable[[], None]) -> FrozenClock:
        return self

    def cancel(self) -> None:
        pass


def test_a_restarted_rng_back_end_resubmits_what_its_predecessor_held() -> None:
    memory = GuestMemory.anonymous(1 << 20)
    driver, alloc, rings = driver_ring(memory)
    buffers = [alloc.alloc(4096, 4096) for _ in range(3)]
    for i, addr in enumerate(buffers):
        driver.add_buf([], [(addr, 4096)], i)
    driver.kick_prepare()
    region = memoryview(bytearray(queue_region_size(QSIZE)))
    try:
        # The first back-end grants one burst (4096 bytes) and holds the other two requests.
        first = RngDevice(rate_limit=1.0, queue_size=QSIZE)
        first.reactor = FrozenClock()  # type: ignore[assignment]
        start(first, memory)
        ring = first.start_queue(0, QSIZE, *rings)
        tracker = QueueInflight(region, QSIZE)
        assert tracker.recover(ring.used_idx) == []
        first.track_requests(0, tracker)
        first.kick(0)
        assert driver.get_buf() == (0, 4096)
        assert driver.get_buf() is None
        assert tracker.in_flight() == [1, 2]  # the process dies here

        # The restarted back-end finds them in the region and serves them before anything.
        second = RngDevice(queue_size=QSIZE)
        start(second, memory)
        ring2 = second.start_queue(0, QSIZE, *rings, last_avail_idx=ring.used_idx)
        successor = QueueInflight(region, QSIZE)
        heads = successor.recover(ring2.used_idx)
        assert heads == [1, 2]
        ring2.last_avail_idx = (ring2.used_idx + len(heads)) & 0xFFFF
        second.track_requests(0, successor, resubmit=heads)
        second.kick(0)
        assert [driver.get_buf() for _ in range(2)] == [(1, 4096), (2, 4096)]
        assert driver.get_buf() is None
        served = memory.read(buffers[1], 4096) + memory.read(buffers[2], 4096)
        assert hashlib.sha256(served).digest() == second.digest.digest()
        assert successor.in_flight() == [] and successor.used_idx == 3
    finally:
        memory.close()


# ---- lost notifications ----------------------------------------------------------------------

def rng_with_ring(memory: GuestMemory) -> tuple[RngDevice, DriverQueue, Allocator]:
    driver, alloc, rings = driver_ring(memory)
    device = RngDevice(queue_size=QSIZE)
    start(device, memory)
    device.start_queue(0, QSIZE, *rings)
    return device, driver, alloc


def test_a_request_whose_kick_was_lost_is_served_at_the_second_watch() -> None:
    memory = GuestMemory.anonymous(1 << 20)
    try:
        device, driver, alloc = rng_with_ring(memory)
        engine = device.queues[0].engine
        assert engine is not None
        driver.add_buf([], [(alloc.alloc(64, 64), 64)], "first")
        assert driver.kick_prepare()
        device.kick(0)
        assert driver.get_buf() == ("first", 64)
        # The next request's kick never reaches the device.
        driver.add_buf([], [(alloc.alloc(64, 64), 64)], "lost")
        assert driver.kick_prepare()
        assert engine.watch() is None  # the kick may still be on its way
        assert driver.get_buf() is None
        assert engine.watch() == "buffers were made available without a kick: served"
        assert driver.get_buf() == ("lost", 64)
        assert device.lost_kicks == 1
        assert engine.watch() is None and engine.watch() is None  # nothing more to do
        assert device.lost_kicks == 1
    finally:
        memory.close()


def test_a_kick_that_arrives_between_two_watches_is_not_counted_as_lost() -> None:
    memory = GuestMemory.anonymous(1 << 20)
    try:
        device, driver, alloc = rng_with_ring(memory)
        engine = device.queues[0].engine
        assert engine is not None
        for token in ("a", "b"):
            driver.add_buf([], [(alloc.alloc(64, 64), 64)], token)
            assert driver.kick_prepare()
            assert engine.watch() is None
            device.kick(0)  # late, but it came
            assert engine.watch() is None
            assert driver.get_buf() == (token, 64)
        assert device.lost_kicks == 0
    finally:
        memory.close()
