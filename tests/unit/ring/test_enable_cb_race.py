"""The race of the virtio paper (§3.1): buffers used between the driver's last get_buf()
returning None and its enable_cb() raise no interrupt (callbacks were off), so enable_cb()
must return False and the driver must poll again — else those buffers wait forever."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.ring import RingPair, make_pair
from pyvirtio.device.base import VirtioDevice
from pyvirtio.driver.base import Driver, Virtqueue
from pyvirtio.ring import DescriptorChain, DeviceQueue
from pyvirtio.spec import features as F
from pyvirtio.testing.pair import DevicePair


@pytest.fixture(params=[False, True], ids=["flags", "event_idx"])
def pair(request: pytest.FixtureRequest) -> Iterator[RingPair]:
    p = make_pair(8, event_idx=request.param)
    yield p
    p.close()


def add(p: RingPair, n: int) -> None:
    for t in range(n):
        addr = p.alloc.alloc(16)
        p.driver.add_buf([], [(addr, 16)], token=t)


def warm_up(p: RingPair) -> None:
    """One buffer round trip, so the device has signalled once (a fresh EVENT_IDX queue
    always interrupts for its first completion: it has no reference point yet)."""
    addr = p.alloc.alloc(16)
    p.driver.add_buf([], [(addr, 16)], token="warm-up")
    chain = p.device.pop()
    assert chain is not None
    p.device.push(chain, 0)
    assert p.device.needs_notification()
    assert p.driver.get_buf() == ("warm-up", 0)


def test_buffers_used_before_enable_cb_make_it_return_false(pair: RingPair) -> None:
    add(pair, 2)
    first, second = pair.device.pop(), pair.device.pop()
    assert first is not None and second is not None
    pair.device.push(first, 1)
    assert pair.device.needs_notification()  # the interrupt for the first buffer
    # The driver's interrupt handler: callbacks off, drain the ring.
    pair.driver.disable_cb()
    assert pair.driver.get_buf() == (0, 1)
    assert pair.driver.get_buf() is None
    # ... and right here, before the driver re-enables callbacks, the device completes.
    pair.device.push(second, 2)
    assert not pair.device.needs_notification()  # suppressed: the driver said no interrupts
    assert pair.driver.enable_cb() is False  # so enable_cb must report the race
    assert pair.driver.get_buf() == (1, 2)  # and polling again finds the buffer
    assert pair.driver.enable_cb() is True  # now nothing is pending


def test_without_the_race_enable_cb_returns_true_and_the_next_completion_interrupts(
        pair: RingPair) -> None:
    add(pair, 2)
    first, second = pair.device.pop(), pair.device.pop()
    assert first is not None and second is not None
    pair.device.push(first, 1)
    assert pair.device.needs_notification()
    pair.driver.disable_cb()
    assert pair.driver.get_buf() == (0, 1)
    assert pair.driver.get_buf() is None
    assert pair.driver.enable_cb() is True
    pair.device.push(second, 2)
    assert pair.device.needs_notification()  # the driver sleeps on it: it must be woken


def test_enable_cb_delayed_reports_buffers_used_past_its_threshold(pair: RingPair) -> None:
    warm_up(pair)
    add(pair, 4)
    chains = [pair.device.pop() for _ in range(4)]
    pair.driver.disable_cb()
    assert pair.driver.get_buf() is None
    for c in chains:  # all four used while callbacks were off
        assert c is not None
        pair.device.push(c, 0)
        assert not pair.device.needs_notification()
    # 4 outstanding: the driver asks for an interrupt after 3 of them; 4 are already used.
    assert pair.driver.enable_cb_delayed() is False
    assert [pair.driver.get_buf() for _ in range(4)] == [(t, 0) for t in range(4)]


def test_enable_cb_delayed_below_its_threshold_waits_for_the_interrupt(pair: RingPair) -> None:
    warm_up(pair)
    add(pair, 4)
    chains = [pair.device.pop() for _ in range(4)]
    pair.driver.disable_cb()
    for c in chains[:3]:
        assert c is not None
        pair.device.push(c, 0)
        assert not pair.device.needs_notification()
    assert pair.driver.enable_cb_delayed() is True  # 3 used, threshold 3: not past it
    last = chains[3]
    assert last is not None
    pair.device.push(last, 0)
    assert pair.device.needs_notification()  # the 4th crosses the threshold: interrupt


def test_a_restored_queue_interrupts_for_its_first_completion_even_after_an_idle_check(
) -> None:
    """A back-end that restarts (vhost-user SET_VRING_BASE) does not know what its
    predecessor signalled, so its first completion must interrupt — even if it asked
    needs_notification() once before completing anything."""
    p = make_pair(8, event_idx=True)
    try:
        add(p, 2)
        first, second = p.device.pop(), p.device.pop()
        assert first is not None and second is not None
        p.device.push(first, 1)  # ... and the back-end dies before signalling it
        d = p.driver
        restored = DeviceQueue(p.memory, 8, d.desc_addr, d.avail_addr, d.used_addr,
                               event_idx=True, last_avail_idx=1)  # re-offers the 2nd chain
        assert restored.needs_notification() is False  # nothing new since the restore
        again = restored.pop()
        assert again is not None and again.head == second.head
        restored.push(again, 2)
        assert restored.needs_notification() is True  # the driver waits at used_event 0
        assert [p.driver.get_buf(), p.driver.get_buf()] == [(0, 1), (1, 2)]
    finally:
        p.close()


# ---- the same race through a device and a driver, counting real interrupts ---------------


class DeferredDevice(VirtioDevice):
    """A device that completes requests only when the test says so."""

    device_id = 0x7F00

    def __init__(self) -> None:
        super().__init__(1, queue_size=8)
        self.waiting: list[DescriptorChain] = []

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        self.waiting.append(chain)
        return None


class PollingDriver(Driver):
    device_ids = (0x7F00,)

    def probe(self) -> None:
        self.interrupts = 0
        (self.vq,) = self.device.find_vqs(1, [self.on_interrupt])

    def on_interrupt(self, vq: Virtqueue) -> None:
        self.interrupts += 1


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_race_between_get_buf_and_enable_cb_with_a_real_device(event_idx: bool) -> None:
    device = DeferredDevice()
    with DevicePair(device) as pair:
        features = F.bit(F.VERSION_1) | (F.bit(F.EVENT_IDX) if event_idx else 0)
        driver = pair.probe(PollingDriver, features=features)
        assert isinstance(driver, PollingDriver)
        vq = driver.vq
        bufs = [pair.allocator.alloc(32) for _ in range(2)]
        for t, b in enumerate(bufs):
            vq.add_buf([], [(b, 32)], token=t)
        assert vq.kick()
        assert len(device.waiting) == 2
        device.complete(0, device.waiting.pop(0), 8)
        assert driver.interrupts == 1
        vq.disable_cb()
        assert vq.get_buf() == (0, 8)
        assert vq.get_buf() is None
        device.complete(0, device.waiting.pop(0), 9)  # the race window
        assert driver.interrupts == 1  # no interrupt: callbacks were off
        assert vq.enable_cb() is False
        assert vq.get_buf() == (1, 9)
        assert vq.enable_cb() is True
