"""A front-end that dies (SIGKILL, mid-traffic) leaves pyvirtio's server listening, and the
next guest gets a working device: QEMU 7.2 on the entropy device, UML on the console.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.guests import (
    DATA_PORT,
    HWRNG_SCRIPT,
    RING_FEATURES,
    WAIT,
    ConsoleClient,
    DataPeer,
    RecordingConsoleDevice,
    RingFeatures,
    check_hwrng,
    console_guest_round,
    recording_rng,
    served_slice,
    wait_closed,
)
from helpers.vhost_user import RecordingRngDevice
from peers import require_guest
from pyvirtio.device.console import Port
from pyvirtio.device.console.ports import UnixSocketPort
from pyvirtio.guest import QemuGuest, UmlGuest, VhostUserDevice
from pyvirtio.guest.qemu import qemu_args as guest_qemu_args
from pyvirtio.io import unixsock
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids
from pyvirtio.testing.server import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The first guest keeps the device busy until it is killed.
BUSY_HWRNG = """\
result current $(cat /sys/class/misc/hw_random/rng_current)
while :; do head -c 4096 /dev/hwrng > /dev/null; done &
sleep 0.2
result busy yes
sleep 600
"""


@RING_FEATURES
def test_killing_qemu_mid_read_leaves_the_server_serving_the_next_guest(
        tmp_path: Path, ring: RingFeatures) -> None:
    require_guest("qemu")
    devices: list[RecordingRngDevice] = []

    def factory() -> RecordingRngDevice:
        devices.append(recording_rng(seed=len(devices),
                                     transport_features=ring.transport_features))
        return devices[-1]

    server = VhostUserServer(tmp_path / "rng.sock", factory)
    qemu_args = guest_qemu_args(server.path, ids.RNG, extra=ring.qemu_device_props)
    with ServerThread(server):
        first = QemuGuest(BUSY_HWRNG, extra_args=qemu_args, timeout=WAIT)
        try:
            first.start()
            first.wait_for("PYVIRTIO-RESULT busy=yes", timeout=WAIT)
            served_before_kill = devices[0].served
            first.kill()
        finally:
            killed = first.stop()
        assert killed.killed and not killed.finished
        assert killed.results["current"] == "virtio_rng.0"
        assert served_before_kill > 0
        wait_closed(server, 1)
        assert server.closed_reasons == ["front-end disconnected"]
        assert os.path.exists(server.path) and not server.connections

        second = QemuGuest(HWRNG_SCRIPT, extra_args=qemu_args, timeout=WAIT).run()
        assert second.ok, second.describe()
        wait_closed(server, 2)
    assert server.accepted == 2 and len(devices) == 2
    check_hwrng(second.results, ring)
    served_slice(bytes(devices[1].stream), second.results)
    for device in devices:
        assert len(device.negotiated) == 1
        ring.check_negotiated(device.negotiated[0])
        assert device.problems == []


#: The first guest writes to the named port in a loop (the host drains it) until killed.
BUSY_CONSOLE = f"""\
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = "{DATA_PORT}" ] && DATA=/dev/${{p##*/}}
done
dd if=/dev/urandom of=/tmp/blob bs=65536 count=4 2>/dev/null
(while :; do cat /tmp/blob; done > $DATA) &
sleep 0.2
result busy yes
sleep 600
"""


class Drain:
    """A host client that reads and discards whatever a port sends."""

    def __init__(self, path: str) -> None:
        self.peer = DataPeer(path, b"", expect=1 << 62)

    @property
    def received(self) -> int:
        return len(self.peer.received)

    def close(self) -> None:
        self.peer.close()


@RING_FEATURES
def test_killing_uml_mid_transfer_leaves_the_server_serving_the_next_guest(
        tmp_path: Path, ring: RingFeatures) -> None:
    require_guest("uml")
    hvc0_path, data_path = str(tmp_path / "hvc0.sock"), str(tmp_path / "data.sock")
    device = RecordingConsoleDevice(
        [Port(UnixSocketPort(hvc0_path)), Port(UnixSocketPort(data_path), name=DATA_PORT)],
        transport_features=ring.transport_features)
    server = VhostUserServer(tmp_path / "vu.sock", lambda: device)
    device.reactor = server.loop
    uml_device = [VhostUserDevice(server.path, ids.CONSOLE)]
    console = ConsoleClient(hvc0_path)
    try:
        with ServerThread(server):
            drain = Drain(data_path)
            first = UmlGuest(BUSY_CONSOLE, devices=uml_device, timeout=WAIT)
            try:
                first.start()
                first.wait_for("PYVIRTIO-RESULT busy=yes", timeout=WAIT)
                first.kill()
            finally:
                killed = first.stop()
                drain.close()  # the port forgets output its host peer never took
            assert killed.killed and not killed.finished
            assert drain.received > 0
            wait_closed(server, 1)
            assert server.closed_reasons == ["front-end disconnected"]
            assert os.path.exists(server.path) and not server.connections
            with unixsock.connect(server.path, timeout=5):
                pass  # still listening: a front-end may connect
            wait_closed(server, 2)

            console_guest_round(uml_device, console, data_path, 3, ring)
            wait_closed(server, 3)
    finally:
        console.close()
        device.close()
    assert server.accepted == 3
    assert len(device.negotiated) == 2
    for features in device.negotiated:
        ring.check_negotiated(features)
    assert device.problems == []
