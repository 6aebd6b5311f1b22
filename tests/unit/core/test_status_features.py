"""Feature negotiation and the device status state machine (VIRTIO 1.x §2.1, §2.2, §3.1)."""

from __future__ import annotations

import pytest

from pyvirtio.core import features as CF
from pyvirtio.core.status import judge
from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import Driver
from pyvirtio.driver.rng import RngDriver
from pyvirtio.errors import PeerError
from pyvirtio.ring import DescriptorChain
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair

ACK, DRV, FOK, DOK = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
V1 = F.bit(F.VERSION_1)


# ---- the pure state machine --------------------------------------------------------------


def test_the_initialisation_sequence_is_accepted_step_by_step() -> None:
    t = judge(0, ACK, modern=True, features_acceptable=None)
    assert t.accepted == ACK and not t.problems
    t = judge(ACK, ACK | DRV, modern=True, features_acceptable=None)
    assert t.accepted == ACK | DRV and not t.problems
    t = judge(ACK | DRV, ACK | DRV | FOK, modern=True, features_acceptable=None)
    assert t.accepted == ACK | DRV | FOK and t.features_ok and not t.problems
    t = judge(ACK | DRV | FOK, ACK | DRV | FOK | DOK, modern=True, features_acceptable=None)
    assert t.accepted == ACK | DRV | FOK | DOK and t.driver_ok and not t.problems


def test_writing_zero_resets() -> None:
    t = judge(ACK | DRV | FOK | DOK, 0, modern=True, features_acceptable=None)
    assert t.reset and t.accepted == 0


def test_features_ok_is_refused_for_unacceptable_features() -> None:
    t = judge(ACK | DRV, ACK | DRV | FOK, modern=True, features_acceptable="no thanks")
    assert t.accepted == ACK | DRV and not t.features_ok
    assert any("no thanks" in p for p in t.problems)


def test_features_ok_before_driver_is_refused() -> None:
    t = judge(ACK, ACK | FOK, modern=True, features_acceptable=None)
    assert not t.accepted & FOK and t.problems


def test_driver_ok_before_features_ok_is_refused_on_a_modern_device() -> None:
    t = judge(ACK | DRV, ACK | DRV | DOK, modern=True, features_acceptable=None)
    assert t.accepted == ACK | DRV and not t.driver_ok
    assert any("FEATURES_OK" in p for p in t.problems)


def test_a_legacy_driver_goes_straight_to_driver_ok() -> None:
    t = judge(ACK | DRV, ACK | DRV | DOK, modern=False, features_acceptable=None)
    assert t.accepted == ACK | DRV | DOK and t.driver_ok and not t.problems
    t = judge(ACK | DRV, ACK | DRV | DOK, modern=False, features_acceptable="bad bits")
    assert not t.accepted & DOK and any("bad bits" in p for p in t.problems)


def test_driver_ok_without_driver_is_refused() -> None:
    t = judge(ACK, ACK | DOK, modern=False, features_acceptable=None)
    assert not t.accepted & DOK and t.problems


def test_driver_before_acknowledge_is_reported() -> None:
    t = judge(0, DRV, modern=True, features_acceptable=None)
    assert any("ACKNOWLEDGE" in p for p in t.problems)


def test_bits_cannot_be_cleared_without_a_reset() -> None:
    t = judge(ACK | DRV | FOK, ACK, modern=True, features_acceptable=None)
    assert t.accepted == ACK | DRV | FOK
    assert any("cleared" in p for p in t.problems)


def test_only_the_device_sets_needs_reset() -> None:
    t = judge(ACK, ACK | S.DEVICE_NEEDS_RESET, modern=True, features_acceptable=None)
    assert not t.accepted & S.DEVICE_NEEDS_RESET and t.problems
    # ...and a driver writing the status back without it does not clear it
    t = judge(ACK | DRV | S.DEVICE_NEEDS_RESET, ACK | DRV, modern=True,
              features_acceptable=None)
    assert t.accepted & S.DEVICE_NEEDS_RESET and not t.problems


def test_failed_is_recorded() -> None:
    t = judge(ACK | DRV, ACK | DRV | S.FAILED, modern=True, features_acceptable=None)
    assert t.failed and t.accepted & S.FAILED


# ---- feature helpers ----------------------------------------------------------------------


def test_negotiate_keeps_the_common_subset_without_the_vhost_user_bit() -> None:
    device = V1 | F.bit(F.EVENT_IDX) | F.bit(F.VHOST_USER_PROTOCOL_FEATURES) | 0b101
    driver = V1 | F.bit(F.INDIRECT_DESC) | F.bit(F.VHOST_USER_PROTOCOL_FEATURES) | 0b001
    assert CF.negotiate(device, driver) == V1 | 0b001


def test_check_acked_refuses_unoffered_bits_and_packed_without_version_1() -> None:
    CF.check_acked(V1 | 1, V1)
    with pytest.raises(CF.FeatureError) as err:
        CF.check_acked(V1, V1 | F.bit(F.EVENT_IDX) | F.bit(3))
    assert "EVENT_IDX" in str(err.value) and "bit 3" in str(err.value)
    with pytest.raises(CF.FeatureError):
        CF.check_acked(F.bit(F.RING_PACKED) | V1, F.bit(F.RING_PACKED))
    assert CF.describe(0) == "none"
    assert CF.describe(V1 | F.bit(5), {5: "MAC"}) == "MAC|VERSION_1"
    assert CF.is_modern(V1) and not CF.is_modern(F.bit(F.EVENT_IDX))


# ---- a real device judging a driver ---------------------------------------------------------


class PickyDevice(VirtioDevice):
    """Offers bits 0 and 1 but refuses the combination of both."""

    device_id = 0x7F01

    def __init__(self) -> None:
        super().__init__(1, 0b11, queue_size=8)
        self.events: list[str] = []

    def validate_features(self, features: int) -> str | None:
        return "bits 0 and 1 together" if features & 0b11 == 0b11 else None

    def on_features_ok(self) -> None:
        self.events.append("features_ok")

    def on_driver_ok(self) -> None:
        self.events.append("driver_ok")

    def on_reset(self) -> None:
        self.events.append("reset")

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        return 0


def walk(device: VirtioDevice, features: int) -> None:
    device.set_status(ACK)
    device.set_status(ACK | DRV)
    device.set_driver_features(features)
    device.set_status(ACK | DRV | FOK)


def test_device_refuses_features_ok_when_unoffered_bits_are_acked() -> None:
    d = PickyDevice()
    walk(d, V1 | F.bit(7))
    assert d.get_status() == ACK | DRV  # FEATURES_OK did not stick
    assert any("bit 7" in p for p in d.problems)
    assert d.events == []


def test_device_refuses_features_ok_when_it_rejects_the_combination() -> None:
    d = PickyDevice()
    walk(d, V1 | 0b11)
    assert not d.get_status() & FOK
    assert any("bits 0 and 1 together" in p for p in d.problems)


def test_device_accepts_good_features_then_driver_ok() -> None:
    d = PickyDevice()
    walk(d, V1 | 0b01)
    assert d.get_status() == ACK | DRV | FOK and d.events == ["features_ok"]
    assert d.has_feature(0) and not d.has_feature(1)
    d.set_status(ACK | DRV | FOK | DOK)
    assert d.get_status() == ACK | DRV | FOK | DOK
    assert d.events == ["features_ok", "driver_ok"]


def test_device_refuses_driver_ok_before_features_ok_on_modern() -> None:
    d = PickyDevice()
    d.set_status(ACK)
    d.set_status(ACK | DRV)
    d.set_driver_features(V1)
    d.set_status(ACK | DRV | DOK)
    assert not d.get_status() & DOK and "driver_ok" not in d.events


def test_legacy_driver_reaches_driver_ok_without_features_ok() -> None:
    d = PickyDevice()
    d.set_status(ACK)
    d.set_status(ACK | DRV)
    d.set_driver_features(0b01)
    d.set_status(ACK | DRV | DOK)
    assert d.get_status() == ACK | DRV | DOK
    assert d.events == ["features_ok", "driver_ok"]  # features became final at DRIVER_OK


def test_features_written_after_features_ok_are_ignored() -> None:
    d = PickyDevice()
    walk(d, V1)
    d.set_driver_features(V1 | 0b10)
    assert d.driver_features == V1
    assert any("after FEATURES_OK" in p for p in d.problems)


def test_reset_returns_the_device_to_its_initial_state() -> None:
    d = PickyDevice()
    walk(d, V1 | 1)
    d.set_status(ACK | DRV | FOK | DOK)
    d.set_status(0)
    assert d.get_status() == 0 and d.driver_features == 0 and d.events[-1] == "reset"
    assert all(q.ring is None and not q.enabled for q in d.queues)


def test_failed_sticks_until_reset() -> None:
    d = PickyDevice()
    d.set_status(ACK)
    d.set_status(ACK | S.FAILED)
    assert d.get_status() & S.FAILED
    d.set_status(ACK)  # clearing it without a reset is refused
    assert d.get_status() & S.FAILED
    d.set_status(0)
    assert d.get_status() == 0


def test_a_broken_queue_puts_the_device_in_needs_reset_and_raises_a_config_interrupt() -> None:
    with DevicePair(RngDevice()) as pair:
        driver = pair.probe(features=V1)  # a split ring, written by hand below
        assert driver.read(16)  # works
        ring = driver.vq.ring  # type: ignore[attr-defined]
        # A hostile driver: avail ring entry naming descriptor 300 in a 256-entry queue.
        slot = ring.avail_idx % ring.size
        pair.memory.write(ring.avail_addr + 4 + 2 * slot, (300).to_bytes(2, "little"))
        pair.memory.write(ring.avail_addr + 2, ((ring.avail_idx + 1) & 0xFFFF).to_bytes(
            2, "little"))
        interrupts_before = pair.transport.config_interrupts
        pair.transport.notify(0)
        status = pair.device.get_status()
        assert status & S.DEVICE_NEEDS_RESET
        assert status & DOK  # the rest of the status stays as it was
        assert pair.transport.config_interrupts == interrupts_before + 1
        assert any("descriptor index 300" in p for p in pair.device.problems)
        device_ring = pair.device.ring(0)
        assert device_ring is not None and device_ring.broken
        # the driver writing its status back does not clear it; a reset does
        pair.transport.set_status(status & ~S.DEVICE_NEEDS_RESET)
        assert pair.device.get_status() & S.DEVICE_NEEDS_RESET
        pair.transport.reset()
        assert pair.device.get_status() == 0
        driver2 = pair.probe()  # and the device works again
        assert len(driver2.read(32)) == 32  # type: ignore[attr-defined]


def test_a_queue_beyond_the_device_maximum_or_outside_memory_is_refused() -> None:
    with DevicePair(RngDevice()) as pair:
        pair.probe()
        with pytest.raises(PeerError):
            pair.device.start_queue(0, 512, 0, 0x10000, 0x20000)  # max is 256
        with pytest.raises(PeerError):
            pair.device.start_queue(5, 8, 0, 0x10000, 0x20000)  # no such queue
        with pytest.raises(PeerError):
            pair.device.start_queue(0, 8, 1 << 40, 0x10000, 0x20000)  # outside memory


# ---- a device touches its queues only while DRIVER_OK (and not NEEDS_RESET) -------------


def _post_read(drv: Driver, vq_index: int = 0) -> int:
    """Make one 64-byte writable buffer available on queue ``vq_index`` and return it."""
    addr = drv.device.allocator.alloc(64, 16)
    drv.device.vqs[vq_index].add_buf([], [(addr, 64)], token="early")
    return addr


def test_a_kick_before_driver_ok_is_not_served_but_recorded_and_driver_ok_serves_it() -> None:
    device = RngDevice()
    with DevicePair(device) as pair:
        drv = pair.probe()
        dev = drv.device
        dev.reset()  # status 0: the device must not touch a queue from here
        dev.vqs.clear()
        dev.add_status(S.ACKNOWLEDGE | S.DRIVER)
        dev.finalize_features(RngDriver.features | RngDriver.transport_features)
        (vq,) = dev.find_vqs(1)
        _post_read(drv)
        pair.transport.notify(0)  # a driver that kicks anyway (the driver API does not)
        assert vq.get_buf() is None
        assert device.served == 0
        assert any("before DRIVER_OK" in p for p in device.problems)
        dev.ready()  # DRIVER_OK: the device looks at its rings once
        got = vq.get_buf()
        assert got is not None and got == ("early", 64)
        assert device.served == 64



def test_a_driver_holds_a_kick_made_before_driver_ok_and_sends_it_at_driver_ok() -> None:
    # QEMU's balloon serves its stats queue only when kicked: a kick made during probe must
    # not be lost, nor sent before DRIVER_OK.
    device = RngDevice()
    device._look_at_rings = lambda: None  # type: ignore[method-assign]  # like QEMU's balloon
    with DevicePair(device) as pair:
        drv = pair.probe()
        dev = drv.device
        dev.reset()
        dev.add_status(S.ACKNOWLEDGE | S.DRIVER)
        dev.finalize_features(RngDriver.features | RngDriver.transport_features)
        (vq,) = dev.find_vqs(1)
        sent: list[int] = []
        notify = pair.transport.notify
        pair.transport.notify = lambda index: (sent.append(index), notify(index))[1]
        _post_read(drv)
        assert vq.kick() is False and sent == []  # held: no notification before DRIVER_OK
        dev.ready()
        assert sent == [0]  # sent once DRIVER_OK is set
        assert vq.get_buf() == ("early", 64)
