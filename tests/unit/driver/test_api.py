"""The driver API (config ops, virtqueue ops, probe) against real pyvirtio devices."""

from __future__ import annotations

import struct

import pytest

from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import (
    Device,
    DeviceNeedsResetError,
    DeviceRefusedFeatures,
    Driver,
    NoDriverError,
    NoSuchQueueError,
    QueueDetachedError,
    Virtqueue,
    find_driver,
    probe,
)
from pyvirtio.driver.rng import RngDriver
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import GuestMemory, OutsideMemoryError
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DescriptorChain, DriverQueue, QueueFullError, RingError
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair
from pyvirtio.transport.loopback import LoopbackTransport

V1 = F.bit(F.VERSION_1)


class RecordingTransport(LoopbackTransport):
    """The loopback transport, noting every config op the driver makes, in order."""

    def __init__(self, device: VirtioDevice, size: int = 1 << 20,
                 contiguous: int | None = None, legacy: bool = False) -> None:
        self.log: list[tuple[str, int]] = []
        self._contiguous = contiguous
        self.gpa_memory = GuestMemory.anonymous(size)
        super().__init__(device, self.gpa_memory, Allocator(0, size), legacy=legacy)

    def set_status(self, status: int) -> None:
        self.log.append(("status", status))
        super().set_status(status)

    def set_features(self, features: int) -> None:
        self.log.append(("features", features))
        super().set_features(features)

    def setup_queue(self, index: int, ring: DriverQueue) -> None:
        self.log.append(("queue", index))
        super().setup_queue(index, ring)

    def vring_layout_contiguous(self) -> int | None:
        return self._contiguous

    def close(self) -> None:
        self.gpa_memory.close()


class MultiQueueDevice(VirtioDevice):
    """Three queues of different maximum sizes, 16 bytes of config, optional picky
    feature validation and a configurable number of config reads that race an update."""

    device_id = 0x7F02

    def __init__(self, refuse: str | None = None, racing_reads: int = 0) -> None:
        super().__init__(3, 0b1, config_size=16)
        self.queues[1].max_size = 64
        self.queues[2].max_size = 4
        self.config[:] = bytes(range(16))
        self.refuse = refuse
        self.racing_reads = racing_reads
        self.reads = 0

    def validate_features(self, features: int) -> str | None:
        return self.refuse

    def read_config(self, offset: int, length: int) -> bytes:
        self.reads += 1
        data = super().read_config(offset, length)
        if self.reads <= self.racing_reads:
            # the device changes its config while the driver is reading it
            self.update_config(0, bytes([self.reads]) * 4)
        return data

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        return chain.write(b"ok")


class MultiQueueDriver(Driver):
    device_ids = (0x7F02,)
    features = 0b1

    def probe(self) -> None:
        self.irqs: list[int] = []
        self.vqs = self.device.find_vqs(3, [self.on_irq, self.on_irq, None])

    def on_irq(self, vq: Virtqueue) -> None:
        self.irqs.append(vq.index)


def test_probe_follows_the_initialisation_sequence() -> None:
    t = RecordingTransport(MultiQueueDevice())
    try:
        drv = probe(t, MultiQueueDriver)
        assert t.log == [
            ("status", 0),
            ("status", S.ACKNOWLEDGE),
            ("status", S.ACKNOWLEDGE | S.DRIVER),
            ("features", V1 | F.bit(F.INDIRECT_DESC) | F.bit(F.EVENT_IDX)
             | F.bit(F.RING_PACKED) | 0b1),
            ("status", S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK),
            ("queue", 0), ("queue", 1), ("queue", 2),
            ("status", S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK),
        ]
        assert t.device.get_status() == (S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
                                         | S.DRIVER_OK)
        assert drv.device.features == t.device.driver_features
    finally:
        t.close()


def test_finalize_features_acknowledges_only_what_both_support() -> None:
    t = RecordingTransport(MultiQueueDevice())
    try:
        dev = Device(t)
        dev.reset()
        dev.add_status(S.ACKNOWLEDGE)
        dev.add_status(S.DRIVER)
        acked = dev.finalize_features(V1 | F.bit(F.EVENT_IDX) | 0b110
                                      | F.bit(F.VHOST_USER_PROTOCOL_FEATURES))
        assert acked == V1 | F.bit(F.EVENT_IDX)  # 0b110 was not offered
        assert t.device.driver_features == acked
        assert dev.has_feature(F.EVENT_IDX) and not dev.has_feature(F.INDIRECT_DESC)
    finally:
        t.close()


def test_a_device_refusing_features_ok_fails_the_probe_with_failed_set() -> None:
    t = RecordingTransport(MultiQueueDevice(refuse="not today"))
    try:
        with pytest.raises(DeviceRefusedFeatures):
            probe(t, MultiQueueDriver)
        assert t.device.get_status() & S.FAILED
        assert not t.device.get_status() & S.FEATURES_OK
        assert ("queue", 0) not in t.log  # no queue was set up
    finally:
        t.close()


def test_legacy_negotiation_skips_features_ok() -> None:
    t = RecordingTransport(MultiQueueDevice(), legacy=True)
    try:
        probe(t, MultiQueueDriver, features=0b1 | F.bit(F.EVENT_IDX))
        statuses = [v for k, v in t.log if k == "status"]
        assert not any(v & S.FEATURES_OK for v in statuses)
        assert t.device.get_status() & S.DRIVER_OK
        assert t.device.driver_features == 0b1 | F.bit(F.EVENT_IDX)
    finally:
        t.close()


def test_a_failing_driver_probe_sets_failed() -> None:
    class Broken(MultiQueueDriver):
        def probe(self) -> None:
            raise RuntimeError("driver bug")

    t = RecordingTransport(MultiQueueDevice())
    try:
        with pytest.raises(RuntimeError):
            probe(t, Broken)
        assert t.device.get_status() & S.FAILED
        assert not t.device.get_status() & S.DRIVER_OK
    finally:
        t.close()


def test_probe_without_a_matching_driver_is_refused() -> None:
    class Nobody(VirtioDevice):
        device_id = 0x7FFF

    t = RecordingTransport(Nobody(1))
    try:
        with pytest.raises(NoDriverError):
            probe(t)
        with pytest.raises(NoDriverError):
            find_driver(0x7FFF, 0x1AF4)
    finally:
        t.close()


def test_registered_drivers_are_found_by_device_id() -> None:
    import pyvirtio.driver.all  # noqa: F401

    assert find_driver(ids.RNG, 0x1AF4) is RngDriver


def test_config_reads_retry_while_the_generation_changes() -> None:
    t = RecordingTransport(MultiQueueDevice(racing_reads=2))
    try:
        drv = probe(t, MultiQueueDriver)
        data = drv.device.read_config(0, 8)
        assert t.device.reads == 3  # two torn reads, then a stable one
        assert data == bytes([2]) * 4 + bytes(range(4, 8))  # the value after the last update
        assert t.device.config_generation == 2
    finally:
        t.close()


def test_config_reads_give_up_when_the_generation_never_settles() -> None:
    t = RecordingTransport(MultiQueueDevice(racing_reads=10_000))
    try:
        drv = probe(t, MultiQueueDriver)
        with pytest.raises(PeerError):
            drv.device.read_config(0, 4)
    finally:
        t.close()


def test_find_vqs_sizes_queues_by_the_device_maximum_and_binds_callbacks() -> None:
    t = RecordingTransport(MultiQueueDevice())
    try:
        drv = probe(t, MultiQueueDriver)
        assert isinstance(drv, MultiQueueDriver)
        assert [vq.ring.size for vq in drv.vqs] == [256, 64, 4]
        dev = t.device
        for i, vq in enumerate(drv.vqs):
            q = dev.queues[i]
            assert (q.size, q.desc, q.avail, q.used) == (
                vq.ring.size, vq.ring.desc_addr, vq.ring.avail_addr, vq.ring.used_addr)
            assert q.ring is not None and q.ring.event_idx and q.ring.indirect
        buf = t.allocator.alloc(8)
        drv.vqs[1].add_buf([], [(buf, 8)], token="x")
        drv.vqs[1].kick()
        assert drv.irqs == [1]  # the device's interrupt reached queue 1's callback
        assert drv.vqs[1].get_buf() == ("x", 2)
        assert t.memory.read(buf, 2) == b"ok"
        extra = drv.device.setup_vq(2, size=2)  # a smaller size on request
        assert extra.ring.size == 2
        with pytest.raises(NoSuchQueueError):
            drv.device.setup_vq(3)  # the device has no queue 3
    finally:
        t.close()


def test_a_legacy_transport_gets_one_contiguous_aligned_vring() -> None:
    t = RecordingTransport(MultiQueueDevice(), contiguous=4096)
    try:
        drv = probe(t, MultiQueueDriver)
        assert isinstance(drv, MultiQueueDriver)
        for vq in drv.vqs:
            r = vq.ring
            layout = SP.LegacyLayout(r.size, 4096)
            assert r.desc_addr % 4096 == 0
            assert r.avail_addr - r.desc_addr == layout.avail
            assert r.used_addr - r.desc_addr == layout.used
    finally:
        t.close()


def test_add_buf_on_a_full_queue_raises_queue_full() -> None:
    t = RecordingTransport(MultiQueueDevice())
    try:
        drv = probe(t, MultiQueueDriver, features=V1 | 1)  # no INDIRECT: 2 descriptors each
        assert isinstance(drv, MultiQueueDriver)
        vq = drv.vqs[2]  # 4 entries
        buf = t.allocator.alloc(16)
        vq.add_buf([(buf, 8)], [(buf + 8, 8)], token=1)
        vq.add_buf([(buf, 8)], [(buf + 8, 8)], token=2)
        assert vq.num_free == 0
        with pytest.raises(QueueFullError):
            vq.add_buf([(buf, 8)], [], token=3)
        vq.kick()
        assert {vq.get_buf(), vq.get_buf()} == {(1, 2), (2, 2)}
        assert vq.num_free == 4
    finally:
        t.close()


def test_wait_buf_times_out_when_the_device_never_completes() -> None:
    class Silent(MultiQueueDevice):
        def handle(self, queue: int, chain: DescriptorChain) -> int | None:
            return None

    t = RecordingTransport(Silent())
    try:
        drv = probe(t, MultiQueueDriver)
        assert isinstance(drv, MultiQueueDriver)
        buf = t.allocator.alloc(8)
        drv.vqs[0].add_buf([], [(buf, 8)], token=1)
        drv.vqs[0].kick()
        with pytest.raises(TimeoutError):
            drv.vqs[0].wait_buf(timeout=0.05)
    finally:
        t.close()


def test_kick_is_skipped_while_the_device_polls() -> None:
    t = RecordingTransport(MultiQueueDevice())
    try:
        drv = probe(t, MultiQueueDriver, features=V1 | 1)  # flags, not EVENT_IDX
        assert isinstance(drv, MultiQueueDriver)
        ring = t.device.ring(0)
        assert ring is not None
        ring.disable_notifications()
        buf = t.allocator.alloc(8)
        drv.vqs[0].add_buf([], [(buf, 8)], token=1)
        assert drv.vqs[0].kick() is False
        assert t.kicks == 0
        assert ring.enable_notifications() is True  # the device sees what arrived
    finally:
        t.close()


# ---- a hostile device ---------------------------------------------------------------------


class HostileDevice(VirtioDevice):
    """Answers each request with a used element of its choosing (in a split used ring, which
    it writes by hand: it does not offer the packed ring)."""

    device_id = 0x7F03

    def __init__(self, lie: str) -> None:
        super().__init__(1, queue_size=8,
                         transport_features=V1 | F.bit(F.INDIRECT_DESC) | F.bit(F.EVENT_IDX))
        self.lie = lie

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        q = self.queues[queue]
        ring = q.ring
        assert ring is not None and self.memory is not None
        head, length = chain.head, chain.writable_len
        if self.lie == "id":
            head = (chain.head + 1) % q.size  # a descriptor that is not in flight
        elif self.lie == "huge-id":
            head = 0xFFFFFFFF
        elif self.lie == "length":
            length = chain.writable_len + 1
        slot = ring.used_idx % q.size
        self.memory.write(q.used + 4 + 8 * slot, struct.pack("<II", head, length))
        ring.used_idx = (ring.used_idx + 1) & 0xFFFF
        self.memory.write(q.used + 2, struct.pack("<H", ring.used_idx))
        self.notify_queue(queue)
        return None


class PlainDriver(Driver):
    device_ids = (0x7F03,)

    def probe(self) -> None:
        (self.vq,) = self.device.find_vqs(1)


@pytest.mark.parametrize("lie", ["id", "huge-id", "length"])
def test_a_device_returning_a_bad_used_element_breaks_the_driver_queue(lie: str) -> None:
    with DevicePair(HostileDevice(lie)) as pair:
        drv = pair.probe(PlainDriver)
        assert isinstance(drv, PlainDriver)
        buf = pair.allocator.alloc(16)
        drv.vq.add_buf([], [(buf, 16)], token="req")
        drv.vq.kick()
        with pytest.raises(RingError) as err:
            drv.vq.get_buf()
        assert drv.vq.ring.broken is not None
        if lie == "length":
            assert "17 bytes" in str(err.value)
        else:
            assert "not an in-flight buffer" in str(err.value)
        with pytest.raises(RingError):
            drv.vq.add_buf([], [(buf, 16)], token="again")


def test_an_honest_hostile_device_works() -> None:
    """The same device telling the truth: the test above fails for the lie, not the setup."""
    with DevicePair(HostileDevice("none")) as pair:
        drv = pair.probe(PlainDriver)
        assert isinstance(drv, PlainDriver)
        buf = pair.allocator.alloc(16)
        drv.vq.add_buf([], [(buf, 16)], token="req")
        drv.vq.kick()
        assert drv.vq.get_buf() == ("req", 16)


def test_closing_a_pair_removes_the_driver_and_resets_the_device() -> None:
    device = RngDevice()
    pair = DevicePair(device)
    drv = pair.probe()
    assert isinstance(drv, RngDriver)
    allocations = pair.allocator.allocations
    pair.close()
    assert device.get_status() == 0
    assert pair.allocator.allocations == allocations - 1  # the driver freed its buffer


def test_a_wish_list_without_version_1_still_negotiates_a_modern_device() -> None:
    t = RecordingTransport(MultiQueueDevice())
    try:
        probe(t, MultiQueueDriver, features=1 << 5 | 0b1)
        assert t.device.driver_features & F.bit(F.VERSION_1)
        assert any(k == "status" and v & S.FEATURES_OK for k, v in t.log)
    finally:
        t.close()


def test_a_driver_acknowledges_ring_packed_and_in_order_when_offered_and_wished() -> None:
    device = MultiQueueDevice()
    # A device (DPDK's vhost PMD does this) offering the packed ring and IN_ORDER.
    device.offered_features |= F.bit(F.RING_PACKED) | F.bit(F.IN_ORDER)
    t = RecordingTransport(device)
    try:
        wish = V1 | 1 | F.bit(F.RING_PACKED) | F.bit(F.IN_ORDER)
        drv = probe(t, MultiQueueDriver, features=wish)
        assert device.driver_features & F.bit(F.RING_PACKED)
        assert device.driver_features & F.bit(F.IN_ORDER)
        assert device.get_status() & S.DRIVER_OK
        assert type(drv.vqs[0].ring).__name__ == "PackedDriverQueue"
        assert drv.vqs[0].ring.in_order
        assert type(device.ring(0)).__name__ == "PackedDeviceQueue"
    finally:
        t.close()


def test_a_legacy_negotiation_never_acknowledges_ring_packed() -> None:
    from pyvirtio.core.features import negotiate
    assert negotiate(F.bit(F.RING_PACKED) | 1, F.bit(F.RING_PACKED) | 1) == 1
    assert negotiate(V1 | F.bit(F.RING_PACKED), V1 | F.bit(F.RING_PACKED)) == (
        V1 | F.bit(F.RING_PACKED))


def test_wished_features_the_device_does_not_offer_are_logged_as_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    t = RecordingTransport(MultiQueueDevice())
    try:
        with caplog.at_level("INFO", logger="pyvirtio.driver"):
            probe(t, MultiQueueDriver, features=V1 | 1 | 1 << 7)
        assert t.device.driver_features == V1 | 1
        assert "bit 7: not offered by the device" in caplog.text
    finally:
        t.close()


def test_a_device_never_offers_ring_features_the_rings_do_not_implement() -> None:
    device = RngDevice(transport_features=V1 | F.bit(F.RING_PACKED) | F.bit(F.IN_ORDER)
                       | F.bit(F.NOTIFICATION_DATA))
    assert device.offered_features & F.bit(F.VERSION_1)
    assert device.offered_features & F.bit(F.RING_PACKED)
    assert device.offered_features & F.bit(F.IN_ORDER)
    assert not device.offered_features & F.bit(F.NOTIFICATION_DATA)


# ---- whose fault: the caller's own mistakes are LocalErrors ----------------------------


def test_writing_past_the_end_of_guest_memory_through_the_api_is_the_callers_fault() -> None:
    with DevicePair(RngDevice()) as pair:
        with pytest.raises(OutsideMemoryError) as err:
            pair.memory.write(pair.memory.size - 2, b"abcd")
        assert isinstance(err.value, LocalError) and not isinstance(err.value, PeerError)
        with pytest.raises(OutsideMemoryError):
            pair.memory.read(pair.memory.size, 1)


def test_using_a_driver_after_its_pair_is_closed_is_the_callers_fault() -> None:
    pair = DevicePair(RngDevice())
    rng = pair.probe()
    assert isinstance(rng, RngDriver)
    pair.close()
    with pytest.raises(QueueDetachedError, match="DevicePair is closed") as err:
        rng.read(16, timeout=1.0)
    assert isinstance(err.value, LocalError)
    with pytest.raises(LocalError):
        rng.device.memory.write(0, b"x")


def test_asking_for_more_queues_than_the_device_has_is_the_callers_fault() -> None:
    with DevicePair(RngDevice()) as pair:
        rng = pair.probe()
        with pytest.raises(NoSuchQueueError, match="has no queue 1") as err:
            rng.device.find_vqs(2)
        assert isinstance(err.value, LocalError) and not isinstance(err.value, PeerError)


# ---- a device that needs a reset: the driver hears it, not a timeout --------------------


class ConfigWatcher(RngDriver):
    """The entropy driver, counting config-change callbacks."""

    def probe(self) -> None:
        super().probe()
        self.config_changes = 0

    def config_changed(self) -> None:
        self.config_changes += 1


def read_outside_memory(drv: RngDriver, memory_size: int) -> None:
    """Make the device give up: a buffer that points past the end of guest memory."""
    drv.vq.add_buf([], [(memory_size + 4096, 64)], token="bad")
    drv.vq.kick()


def test_a_driver_blocked_on_a_device_that_needs_reset_fails_at_once_naming_why() -> None:
    with DevicePair(RngDevice(), memory_size=1 << 20) as pair:
        drv = pair.probe(ConfigWatcher)
        assert isinstance(drv, ConfigWatcher)
        read_outside_memory(drv, 1 << 20)
        assert drv.config_changes == 1  # the paper's config-change callback ran
        assert drv.device.needs_reset
        with pytest.raises(DeviceNeedsResetError) as err:
            drv.vq.wait_buf(timeout=60.0)
        message = str(err.value)
        assert "DEVICE_NEEDS_RESET" in message
        assert "outside guest memory" in message or "not mapped" in message, message
        assert isinstance(err.value, PeerError)


def test_reset_and_probe_again_bring_a_needs_reset_queue_back() -> None:
    with DevicePair(RngDevice(), memory_size=1 << 20) as pair:
        drv = pair.probe()
        assert isinstance(drv, RngDriver)
        read_outside_memory(drv, 1 << 20)
        with pytest.raises(DeviceNeedsResetError):
            drv.read(16, timeout=60.0)
        drv.device.reset()
        again = pair.probe()
        assert isinstance(again, RngDriver)
        assert len(again.read(32, timeout=5.0)) == 32
