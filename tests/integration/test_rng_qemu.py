"""pyvirtio's entropy device with a real Linux guest: QEMU 7.2 (TCG), vhost-user-rng-pci,
the Debian cloud kernel's virtio_rng.

The device serves a deterministic stream and records it; the guest reads 64 KiB from
/dev/hwrng and reports their sha256 and first 32 bytes. The first bytes locate the slice in
the served stream (they occur once), and the whole slice must hash to the guest's digest:
the guest got exactly the bytes pyvirtio served, in order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.guests import (
    HWRNG_BYTES,
    HWRNG_SCRIPT,
    RING_FEATURES,
    WAIT,
    RingFeatures,
    check_hwrng,
    recording_rng,
    served_slice,
    wait_closed,
)
from peers import require_guest
from pyvirtio.guest import QemuGuest
from pyvirtio.guest.qemu import qemu_args as guest_qemu_args
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids
from pyvirtio.testing.server import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@RING_FEATURES
def test_a_qemu_guest_reads_exactly_the_bytes_pyvirtio_served_from_dev_hwrng(
        tmp_path: Path, ring: RingFeatures) -> None:
    require_guest("qemu")
    device = recording_rng(seed=1, transport_features=ring.transport_features)
    server = VhostUserServer(tmp_path / "rng.sock", lambda: device)
    with ServerThread(server):
        qemu_args = guest_qemu_args(server.path, ids.RNG, extra=ring.qemu_device_props)
        result = QemuGuest(HWRNG_SCRIPT, extra_args=qemu_args, timeout=WAIT).run()
        assert result.ok, result.describe()
        wait_closed(server, 1)
    check_hwrng(result.results, ring)
    offset = served_slice(bytes(device.stream), result.results)
    # Before the slice: what the kernel took for itself at registration (early randomness,
    # khwrngd) before the script stopped khwrngd. After it: virtio_rng's read-ahead.
    assert offset + HWRNG_BYTES <= device.served == len(device.stream)
    assert device.negotiated and len(device.negotiated) == 1
    ring.check_negotiated(device.negotiated[0])
    assert device.problems == []
    assert server.closed_reasons == ["front-end disconnected"]


def test_a_rate_limited_device_still_serves_a_real_guest_every_byte_it_asks_for(
        tmp_path: Path) -> None:
    """The limiter grants whole buffers: dribbling tokens out made Linux stop reading."""
    require_guest("qemu")
    rate = 64 * 1024  # bytes/s: the 64 KiB read has to wait for the bucket several times
    device = recording_rng(seed=2, rate_limit=rate)
    server = VhostUserServer(tmp_path / "rng.sock", lambda: device)
    with ServerThread(server):
        result = QemuGuest(HWRNG_SCRIPT, extra_args=guest_qemu_args(server.path, ids.RNG),
                           timeout=WAIT).run()
        assert result.ok, result.describe()
        wait_closed(server, 1)
    served_slice(bytes(device.stream), result.results)
    assert device.throttled > 0, "the rate limit never engaged"
    assert device.problems == []
