"""The serving engine is every device's: request tracking for crash-safe reconnection works
for a device that is not blk (virtio-rng here), with the real inflight region."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from pyvirtio.device.rng import RngDevice
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S
from pyvirtio.transport.vhost_user.inflight import QueueInflight, queue_region_size

QSIZE = 16


class FrozenClock:
    """A reactor whose time stands still and whose timers never fire: a rate-limited rng
    holds what exceeds its burst until the process 'dies'."""

    def time(self) -> float:
        return 0.0

    def call_later(self, delay: float, callback: Callable[[], None]) -> FrozenClock:
        return self

    def cancel(self) -> None:
        pass


def start(device: RngDevice, memory: GuestMemory) -> None:
    device.memory = memory
    device.set_driver_features(F.bit(F.VERSION_1) | F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC))
    device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)


def test_a_restarted_rng_back_end_resubmits_what_its_predecessor_held() -> None:
    memory = GuestMemory.anonymous(1 << 20)
    alloc = Allocator(0, 1 << 20)
    rings = (alloc.alloc(SP.desc_table_size(QSIZE), 4096),
             alloc.alloc(SP.avail_size(QSIZE), 4096),
             alloc.alloc(SP.used_size(QSIZE), 4096))
    driver = DriverQueue(memory, QSIZE, *rings, event_idx=True, indirect=True,
                         allocator=alloc)
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
