"""virtio-blk batch mode (BlkDevice.batch_interval): kicks off, the ring looked at on a timer.

The engine's thresholds are patched so that the first drain starts a trial and the judging
never ends it: the tests decide when the ring is looked at by firing the timer themselves.
Every test asserts on what the driver saw: kicks it sent, interrupts it got, requests done.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.blk import SECTOR, GuardedImage, blk_pair, features
from helpers.reactor import ManualReactor
from pyvirtio.device import engine  # batch mode lives in the engine
from pyvirtio.device.blk import BlkDevice
from pyvirtio.device.engine import QueueEngine
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.testing.pair import DevicePair

RINGS = [pytest.param(True, id="event-idx"), pytest.param(False, id="no-event-idx")]


@pytest.fixture
def image(tmp_path: Path) -> GuardedImage:
    return GuardedImage(tmp_path, 256 * SECTOR, seed=1)


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a trial after every kick-driven drain; end one only on an idle tick."""
    monkeypatch.setattr(engine, "_WINDOW", 0.0)
    monkeypatch.setattr(engine, "_MIN_RATE", 0.0)
    monkeypatch.setattr(engine, "_MIN_BACKOFF", 1e9)  # one trial only
    monkeypatch.setattr(engine, "_JUDGE", 1e9)


Rig = tuple[DevicePair, BlkDevice, BlkDriver, ManualReactor]


@pytest.fixture(params=RINGS)
def rig(request: pytest.FixtureRequest, image: GuardedImage, eager: None) -> Iterator[Rig]:
    with blk_pair(image.path, batch_interval=0.001,
                  features=features(event_idx=request.param)) as (pair, device, drv):
        reactor = ManualReactor()
        device.reactor = reactor
        yield pair, device, drv, reactor


def queue_engine(device: BlkDevice) -> QueueEngine:
    """The engine serving queue 0 (it runs the device's fast lane)."""
    found = device.engine(0)
    assert found is not None
    return found


def into_batch_mode(rig: Rig) -> None:
    """One request served on a kick starts a trial; the next request's kick is the last."""
    _, device, drv, reactor = rig
    for sector in (0, 8):
        io = drv.submit_read(sector, 8)
        drv.wait(io)
        assert io.ok
    assert queue_engine(device).batching
    assert reactor.armed() == 1


def test_in_batch_mode_the_driver_stops_kicking_and_a_tick_serves_what_it_added(
        rig: Rig, image: GuardedImage) -> None:
    pair, device, drv, reactor = rig
    into_batch_mode(rig)
    kicks, interrupts = pair.transport.kicks, pair.transport.interrupts
    ios = [drv.submit_read(16 * i, 8) for i in range(4)]
    drv.kick()
    assert pair.transport.kicks == kicks  # the device asked for no kicks
    assert drv.poll() == 0  # and nothing ran without one
    reactor.fire()
    assert drv.poll() == 4
    assert pair.transport.interrupts == interrupts + 1  # one interrupt for the batch
    for i, io in enumerate(ios):
        assert io.ok and io.data == bytes(image.content[16 * i * SECTOR : (16 * i + 8) * SECTOR])
    assert queue_engine(device).batching and reactor.armed() == 1


def test_an_idle_tick_ends_batch_mode_and_the_driver_kicks_again(rig: Rig) -> None:
    pair, device, drv, reactor = rig
    into_batch_mode(rig)
    reactor.fire()  # nothing arrived
    assert not queue_engine(device).batching
    assert reactor.armed() == 0
    kicks = pair.transport.kicks
    io = drv.submit_read(0, 8)
    drv.wait(io)
    assert io.ok
    assert pair.transport.kicks == kicks + 1


def test_a_request_waiting_when_batch_mode_ends_is_served_and_interrupts_the_driver(
        rig: Rig) -> None:
    # The driver added one request without a kick (it was told not to), and the tick that
    # finds a single request ends batch mode: the request is not left for a kick that will
    # never come, and the driver waiting for it gets its interrupt.
    pair, device, drv, reactor = rig
    into_batch_mode(rig)
    interrupts = pair.transport.interrupts
    io = drv.submit_read(24, 8)
    drv.kick()
    assert io.status is None
    reactor.fire()
    assert not queue_engine(device).batching
    assert pair.transport.interrupts == interrupts + 1
    drv.wait(io, timeout=1.0)
    assert io.ok


def test_a_tick_after_the_queue_restarted_does_nothing(rig: Rig) -> None:
    _, device, _, reactor = rig
    into_batch_mode(rig)
    old = queue_engine(device)
    device.reset()
    reactor.fire()  # the old engine's tick: no drain of a queue that no longer exists
    assert not old.batching
    assert reactor.armed() == 0


@pytest.mark.parametrize("waiting", [0, 2])
def test_a_transport_that_holds_the_ring_back_gets_kicks_turned_on_again(
        rig: Rig, waiting: int) -> None:
    # vhost-user does not process a disabled vring: its poll_queue then does nothing, and
    # the engine must not stay in batch mode with kicks off and no tick.
    pair, device, drv, reactor = rig
    into_batch_mode(rig)
    device.poll_queue = lambda index: None
    ios = [drv.submit_read(8 * i, 8) for i in range(waiting)]
    drv.kick()
    reactor.fire()
    assert not queue_engine(device).batching
    assert reactor.armed() == 0
    device.poll_queue = device.kick
    device.kick(0)  # enabled again: the transport looks at the ring (as vhost-user does)
    kicks = pair.transport.kicks
    io = drv.submit_read(40, 8)
    drv.wait([*ios, io])
    assert pair.transport.kicks == kicks + 1
    assert all(i.ok for i in [*ios, io])


def test_without_an_interval_the_device_stays_kick_driven(
        image: GuardedImage, eager: None) -> None:
    with blk_pair(image.path) as (pair, device, drv):
        reactor = ManualReactor()
        device.reactor = reactor
        for sector in (0, 8, 16):
            kicks = pair.transport.kicks
            io = drv.submit_read(sector, 8)
            drv.wait(io)
            assert io.ok and pair.transport.kicks == kicks + 1
        assert not queue_engine(device).batching
        assert reactor.timers == []
