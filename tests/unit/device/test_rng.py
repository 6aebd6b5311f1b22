"""The entropy device and driver end to end: in one process (DevicePair) and across two
(ProcessDevicePair), with and without EVENT_IDX and INDIRECT. The driver's bytes must be
exactly the bytes the device served: their SHA-256 digests are compared."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import DeviceNeedsResetError
from pyvirtio.driver.rng import RngDriver
from pyvirtio.spec import features as F
from pyvirtio.testing.pair import DevicePair
from pyvirtio.testing.process_pair import ProcessDevicePair

V1 = F.bit(F.VERSION_1)
FEATURE_SETS = {
    "plain": V1,
    "event_idx": V1 | F.bit(F.EVENT_IDX),
    "indirect": V1 | F.bit(F.INDIRECT_DESC),
    "both": V1 | F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC),
}


def scattered_read(drv: RngDriver, sizes: list[int]) -> bytes:
    """One request spread over several writable buffers (an indirect table when INDIRECT
    is negotiated, a descriptor chain otherwise)."""
    alloc = drv.device.allocator
    bufs = [(alloc.alloc(n, 16), n) for n in sizes]
    try:
        drv.vq.add_buf([], bufs, token="scattered")
        drv.vq.kick()
        token, written = drv.vq.wait_buf(timeout=10)
        assert token == "scattered" and written == sum(sizes)
        return b"".join(drv.device.memory.read(a, n) for a, n in bufs)
    finally:
        for a, _ in bufs:
            alloc.free(a)


@pytest.mark.parametrize("features", FEATURE_SETS.values(), ids=FEATURE_SETS.keys())
def test_entropy_pair_in_process_delivers_exactly_what_the_device_served(
        features: int) -> None:
    device = RngDevice()
    with DevicePair(device) as pair:
        drv = pair.probe(features=features)
        assert isinstance(drv, RngDriver)
        assert device.driver_features == features
        ring = device.ring(0)
        assert ring is not None
        assert ring.event_idx == bool(features >> F.EVENT_IDX & 1)
        assert ring.indirect == bool(features >> F.INDIRECT_DESC & 1)
        got = drv.read(10_000) + scattered_read(drv, [100, 1, 300])
        assert len(got) == 10_401
        assert device.served == len(got)
        assert hashlib.sha256(got).hexdigest() == device.digest.hexdigest()


def test_entropy_pair_delivers_a_known_stream_in_order() -> None:
    counter = iter(range(1 << 30))

    def source(n: int) -> bytes:
        return bytes(next(counter) & 0xFF for _ in range(n))

    with DevicePair(RngDevice(source)) as pair:
        drv = pair.probe()
        assert isinstance(drv, RngDriver)
        assert drv.read(5000) == bytes(i & 0xFF for i in range(5000))


@pytest.fixture
def process_pair() -> Iterator[ProcessDevicePair]:
    pair = ProcessDevicePair("pyvirtio.device.rng:RngDevice")
    try:
        yield pair
    finally:
        pair.close()
        # the child is gone after close, also when the test failed
        assert pair.transport.proc.poll() is not None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("features", FEATURE_SETS.values(), ids=FEATURE_SETS.keys())
def test_entropy_pair_across_processes_delivers_exactly_what_the_device_served(
        process_pair: ProcessDevicePair, features: int) -> None:
    drv = process_pair.probe(features=features)
    assert isinstance(drv, RngDriver)
    assert process_pair.transport.device_attr("driver_features") == features
    got = drv.read(20_000) + scattered_read(drv, [64, 4000, 7])
    assert len(got) == 24_071
    assert process_pair.transport.device_attr("served") == len(got)
    assert process_pair.transport.device_attr("digest") == hashlib.sha256(got).hexdigest()


@pytest.mark.timeout(60)
def test_rate_limited_entropy_across_processes_completes_deferred_requests() -> None:
    pair = ProcessDevicePair("pyvirtio.device.rng:RngDevice", {"rate_limit": 20_000})
    try:
        drv = pair.probe()
        assert isinstance(drv, RngDriver)
        got = drv.read(3000)  # burst is 2000 bytes: later requests wait for the bucket
        assert pair.transport.device_attr("digest") == hashlib.sha256(got).hexdigest()
    finally:
        pair.close()


def test_token_bucket_grants_whole_buffers_or_nothing() -> None:
    from pyvirtio.device.rng import TokenBucket

    bucket = TokenBucket(rate=1000.0, burst=4096.0, now=0.0)
    assert bucket.take(4000, now=0.0) == 4000  # the initial burst covers it
    assert bucket.take(64, now=0.0) == 64
    assert bucket.take(64, now=0.0) == 0  # 32 tokens left: no partial grant
    assert bucket.take(64, now=0.040) == 64  # 32 + 40 refilled
    assert bucket.take(10_000, now=100.0) == 4096  # larger than the burst: a burst's worth


@pytest.mark.timeout(60)
def test_a_device_needing_reset_in_another_process_fails_the_blocked_driver_naming_why(
        process_pair: ProcessDevicePair) -> None:
    drv = process_pair.probe()
    assert isinstance(drv, RngDriver)
    # a buffer past the end of guest memory: the device process gives up on the queue
    drv.vq.add_buf([], [(process_pair.memory.size + 4096, 64)], token="bad")
    drv.vq.kick()
    with pytest.raises(DeviceNeedsResetError, match="DEVICE_NEEDS_RESET") as err:
        drv.vq.wait_buf(timeout=30.0)
    assert "not mapped" in str(err.value) or "outside" in str(err.value), str(err.value)
    assert drv.device.needs_reset  # until the driver resets the device
    drv.device.reset()
    again = process_pair.probe()
    assert isinstance(again, RngDriver)
    assert len(again.read(100, timeout=10.0)) == 100
