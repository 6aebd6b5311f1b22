"""Our vhost-user front-end and back-end on the packed ring, over a real socket: the ring
format is negotiated, the back-end serves the packed ring across wraps, and GET_VRING_BASE
answers the avail and used positions with their wrap counters (vhost-user.rst: bits 0-14
and 15, then 16-30 and 31)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import probe
from pyvirtio.driver.rng import RngDriver
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.ring import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.testing.server import ServerThread

pytestmark = pytest.mark.timeout(60)


def test_packed_ring_across_the_socket_and_its_base_carries_both_wrap_counters(
        tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    server = VhostUserServer(sock, RngDevice)
    thread = ServerThread(server)
    try:
        with VhostUserClient(sock, ids.RNG, queue_size=8) as client:
            driver = probe(client, RngDriver)
            assert isinstance(driver, RngDriver)
            assert client.acked_features & F.bit(F.RING_PACKED)
            assert type(driver.vq.ring) is PackedDriverQueue
            assert len(b"".join(driver.read(64) for _ in range(20))) == 20 * 64
            device = server.last_device
            assert device is not None and isinstance(device.ring(0), PackedDeviceQueue)
            # 20 one-descriptor buffers on an 8-slot ring: position 4 after two wraps
            # (wrap counter 1 -> 0 -> 1), for avail and used alike.
            assert client.get_vring_base(0) == 0x8004 | 0x8004 << 16
    finally:
        thread.stop()
