"""pyvirtio's console device with a real Linux guest: User-Mode Linux 6.1 and virtio_console.

One guest per ring-feature setting does everything: it writes text on /dev/hvc0 that must
reach the host byte for byte, reads a line the host types, and moves 1 MiB each way at once
through a named port, with sha256 computed in the guest (busybox) and on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.guests import (
    DATA_BYTES,
    DATA_PORT,
    RING_FEATURES,
    ConsoleClient,
    RecordingConsoleDevice,
    RingFeatures,
    console_guest_round,
    wait_closed,
)
from peers import require_guest
from pyvirtio.device.console import Port
from pyvirtio.device.console.ports import UnixSocketPort
from pyvirtio.guest import VhostUserDevice
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import console as C
from pyvirtio.spec import ids
from pyvirtio.spec.features import bit
from pyvirtio.testing.server import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def console_setup(tmp_path: Path, ring: RingFeatures
                  ) -> Iterator[tuple[RecordingConsoleDevice, VhostUserServer, Path]]:
    device = RecordingConsoleDevice(
        [Port(UnixSocketPort(str(tmp_path / "hvc0.sock"))),
         Port(UnixSocketPort(str(tmp_path / "data.sock")), name=DATA_PORT)],
        cols=132, rows=43, transport_features=ring.transport_features)
    server = VhostUserServer(tmp_path / "vu.sock", lambda: device)
    device.reactor = server.loop  # the ports accept their host clients before any guest
    try:
        with ServerThread(server):
            yield device, server, tmp_path
    finally:
        device.close()


@RING_FEATURES
def test_a_uml_guest_talks_to_the_host_through_hvc0_and_a_named_port(
        console_setup: tuple[RecordingConsoleDevice, VhostUserServer, Path],
        ring: RingFeatures) -> None:
    require_guest("uml")
    device, server, tmp = console_setup
    console = ConsoleClient(str(tmp / "hvc0.sock"))
    try:
        results = console_guest_round([VhostUserDevice(server.path, ids.CONSOLE)], console,
                            str(tmp / "data.sock"), 7, ring)
    finally:
        console.close()
    wait_closed(server, 1)
    assert server.closed_reasons == ["front-end disconnected"]
    # What the device itself negotiated with virtio_console.
    assert len(device.negotiated) == 1
    features = device.negotiated[0]
    ring.check_negotiated(features)
    assert features & bit(C.VIRTIO_CONSOLE_F_MULTIPORT)
    assert features & bit(C.VIRTIO_CONSOLE_F_SIZE)
    assert results["hvc_size"] == "43 132"  # rows cols, from our RESIZE
    assert device.problems == []
    hvc0, port = device.ports
    assert port.from_guest == DATA_BYTES and port.to_guest == DATA_BYTES
    assert hvc0.dropped == 0 and port.dropped == 0
