"""The packed ring as negotiated: every device type runs on it with our driver in memory,
vhost-user's ring base carries its positions and wrap counters, and a front-end that sends
0 for a fresh packed ring (User-Mode Linux) still gets a working ring."""

from __future__ import annotations

import pytest

from pyvirtio.device.rng import RngDevice
from pyvirtio.memory import GuestMemory
from pyvirtio.ring import PackedDeviceQueue, PackedDriverQueue, fresh_base
from pyvirtio.ring.packed import FRESH, base_of_zero
from pyvirtio.spec import features as F
from pyvirtio.testing.pair import DevicePair
from pyvirtio.transport.vhost_user.backend import decode_vring_base, encode_vring_base

PACKED = F.bit(F.VERSION_1) | F.bit(F.RING_PACKED)


@pytest.mark.parametrize("wish", [0, F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC)])
def test_rng_pair_negotiates_the_packed_ring_and_reads_across_wraps(wish: int) -> None:
    with DevicePair(RngDevice(queue_size=8)) as pair:
        driver = pair.probe(features=PACKED | wish)
        assert pair.device.driver_features & F.bit(F.RING_PACKED)
        assert isinstance(pair.device.ring(0), PackedDeviceQueue)
        assert isinstance(driver.vq.ring, PackedDriverQueue)  # type: ignore[attr-defined]
        assert len(b"".join(driver.read(64) for _ in range(40))) == 40 * 64  # type: ignore


def test_without_ring_packed_in_the_wish_list_the_rings_are_split() -> None:
    device = RngDevice(transport_features=F.bit(F.VERSION_1))
    with DevicePair(device) as pair:
        pair.probe()
        assert not device.driver_features & F.bit(F.RING_PACKED)
        assert not isinstance(device.ring(0), PackedDeviceQueue)


def test_vring_base_encodes_positions_and_wrap_counters_per_format() -> None:
    assert fresh_base(PACKED) == FRESH == 0x8000 and fresh_base(F.bit(F.VERSION_1)) == 0
    # split: the 16-bit avail index only
    assert decode_vring_base(0, 0x1234) == (0x1234, None)
    # packed: avail in bits 0-15, used in 16-31 (0 there: same as avail, QEMU 7.2)
    assert decode_vring_base(PACKED, 0x8005) == (0x8005, None)
    assert decode_vring_base(PACKED, 0x0003_8005) == (0x8005, 0x0003)
    assert decode_vring_base(PACKED, None) == (None, None)


def test_a_stopped_packed_ring_answers_both_positions() -> None:
    memory = GuestMemory.anonymous(1 << 16)
    ring = PackedDeviceQueue(memory, 8, 0x1000, 0x2000, 0x3000, last_avail_idx=0x0005,
                             used_idx=0x8003)
    assert encode_vring_base(PACKED, ring) == 0x8003_0005
    assert decode_vring_base(PACKED, encode_vring_base(PACKED, ring)) == (0x0005, 0x8003)


def test_base_zero_on_a_ring_that_never_wrapped_starts_fresh() -> None:
    memory = GuestMemory.anonymous(1 << 16)
    # a fresh ring (zeroed) and one whose driver already made slot 0 available (wrap 1)
    assert base_of_zero(memory, 0x1000) == FRESH
    memory.write(0x1000 + 14, (1 << 7).to_bytes(2, "little"))
    assert base_of_zero(memory, 0x1000) == FRESH
    # slot 0 holds a used descriptor of wrap 1: one lap done, 0 means what it says
    memory.write(0x1000 + 14, (1 << 7 | 1 << 15).to_bytes(2, "little"))
    assert base_of_zero(memory, 0x1000) == 0
