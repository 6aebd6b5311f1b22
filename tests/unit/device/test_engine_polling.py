"""Adaptive polling in the serving engine (virtio-rng on a real event loop and a split
ring with EVENT_IDX): after a completion the loop polls the ring for a self-tuning window
with kicks off, so a request made available in the window is served without a kick; when
the window passes, kicks go back on. Off by default; an idle queue never polls. These are
statements about behaviour, not timing: the windows involved are grown by gaps far below a
deliberately huge ``poll_max``."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from helpers.engine import QSIZE, driver_ring, start
from pyvirtio.device.engine import POLL_START, QueueEngine
from pyvirtio.device.rng import RngDevice
from pyvirtio.io.loop import EventLoop
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverQueue

HUGE = 30.0  # seconds: every gap in these tests is far below it


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop()
    watchdog = threading.Timer(20.0, loop.stop, args=("watchdog",))
    watchdog.start()
    try:
        yield loop
    finally:
        watchdog.cancel()
        loop.close()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory.anonymous(1 << 20)
    try:
        yield memory
    finally:
        memory.close()


def rng(loop: EventLoop, memory: GuestMemory, poll_max: float
        ) -> tuple[RngDevice, QueueEngine, DriverQueue, Allocator]:
    driver, alloc, rings = driver_ring(memory)
    device = RngDevice(queue_size=QSIZE)
    device.reactor = loop
    device.poll_max = poll_max
    start(device, memory)
    device.start_queue(0, QSIZE, *rings)
    engine = device.queues[0].engine
    assert engine is not None
    return device, engine, driver, alloc


def request(driver: DriverQueue, alloc: Allocator, token: str) -> bool:
    """Make a 64-byte request available; True if the driver has to kick for it."""
    driver.add_buf([], [(alloc.alloc(64, 64), 64)], token)
    return driver.kick_prepare()


def served_on_kicks(device: RngDevice, driver: DriverQueue, alloc: Allocator,
                    count: int) -> None:
    for i in range(count):
        assert request(driver, alloc, f"kicked {i}")
        device.kick(0)
        assert driver.get_buf() == (f"kicked {i}", 64)


def test_polling_is_off_by_default_kicks_go_back_on_after_every_completion(
        loop: EventLoop, memory: GuestMemory) -> None:
    device, engine, driver, alloc = rng(loop, memory, poll_max=RngDevice.poll_max)
    served_on_kicks(device, driver, alloc, 3)
    assert not engine.polling and engine.poll_window == 0
    assert request(driver, alloc, "next")  # the driver must kick
    assert device.poll_hits == device.poll_misses == 0


def test_a_request_made_available_in_the_window_is_served_without_a_kick(
        loop: EventLoop, memory: GuestMemory) -> None:
    device, engine, driver, alloc = rng(loop, memory, poll_max=HUGE)
    # The first completion times the gap to the next request; a gap under poll_max grows
    # the window from 0, and the completion after that leaves the ring polled.
    served_on_kicks(device, driver, alloc, 2)
    assert engine.poll_window == POLL_START
    assert engine.polling
    assert not request(driver, alloc, "polled")  # kicks are off: no kick is sent
    loop.run_once(0.0)
    assert driver.get_buf() == ("polled", 64)
    assert device.poll_hits == 1
    assert engine.polling  # that completion polls again


def test_a_window_without_a_request_turns_kicks_back_on(loop: EventLoop,
                                                        memory: GuestMemory) -> None:
    device, engine, driver, alloc = rng(loop, memory, poll_max=HUGE)
    served_on_kicks(device, driver, alloc, 2)
    assert engine.polling
    loop.run(until=lambda: not engine.polling, timeout=5.0)  # the 4 us window passes
    assert device.poll_misses == 1 and device.poll_hits == 0
    assert request(driver, alloc, "after the window")  # kicks are on again
    device.kick(0)
    assert driver.get_buf() == ("after the window", 64)


def test_a_gap_the_window_could_cover_grows_it_a_longer_one_shrinks_it(
        loop: EventLoop, memory: GuestMemory) -> None:
    _, engine, _, _ = rng(loop, memory, poll_max=64e-6)
    tune = engine._tune
    sizes = []
    for _ in range(6):
        tune(50e-6, 64e-6)  # within poll_max: polling that long would have caught it
        sizes.append(engine.poll_window)
    assert sizes == pytest.approx([POLL_START, 2 * POLL_START, 4 * POLL_START,
                                   8 * POLL_START, 64e-6, 64e-6])
    tune(1.0, 64e-6)  # far longer than poll_max: polling would only burn CPU
    assert engine.poll_window == pytest.approx(32e-6)
    for _ in range(4):
        tune(1.0, 64e-6)
    assert engine.poll_window == 0  # below POLL_START: the queue sleeps at once


def test_an_idle_queue_never_polls(loop: EventLoop, memory: GuestMemory) -> None:
    device, engine, driver, alloc = rng(loop, memory, poll_max=HUGE)
    served_on_kicks(device, driver, alloc, 2)
    loop.run(until=lambda: not engine.polling, timeout=5.0)
    device.kick(0)  # a kick that finds nothing completes nothing: no window
    assert not engine.polling
    for _ in range(3):
        loop.run_once(0.0)
    assert device.poll_misses == 1 and device.poll_hits == 0


def test_a_reactor_that_cannot_poll_leaves_the_queue_kick_driven(memory: GuestMemory) -> None:
    class PlainReactor:  # timers only, no arm_poller (e.g. an embedding application's)
        def time(self) -> float:
            return 0.0

        def call_later(self, delay: float, callback: object) -> PlainReactor:
            return self

        def cancel(self) -> None:
            pass

    driver, alloc, rings = driver_ring(memory)
    device = RngDevice(queue_size=QSIZE)
    device.reactor = PlainReactor()  # type: ignore[assignment]
    device.poll_max = HUGE
    start(device, memory)
    device.start_queue(0, QSIZE, *rings)
    served_on_kicks(device, driver, alloc, 3)
    assert request(driver, alloc, "next")


def test_a_queue_stopped_while_polled_is_dropped_without_reading_its_ring(
        loop: EventLoop, memory: GuestMemory) -> None:
    device, engine, driver, alloc = rng(loop, memory, poll_max=HUGE)
    served_on_kicks(device, driver, alloc, 2)
    assert engine.polling
    device.reset()  # the front-end went away: the queue stops, its memory may be unmapped
    assert device.queues[0].engine is not engine
    loop.run_once(0.0)
    assert not engine.polling
    assert device.poll_hits == device.poll_misses == 0  # dropped, neither served nor timed
