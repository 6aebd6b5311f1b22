"""Run the uppercase echo device and its driver together, twice:

1. in one process, over the loopback transport (``DevicePair``: one guest memory, a kick is
   a method call, an interrupt a callback);
2. across a real vhost-user socket: the device behind ``VhostUserServer`` (its event loop in
   a thread), the driver behind ``VhostUserClient``, which shares a memfd as guest memory
   and an eventfd pair per queue, exactly as QEMU or User-Mode Linux would.

Usage: python examples/run_echo.py [SOCKET_DIR]
"""

import sys
import tempfile
from pathlib import Path

from echo_device import EchoDevice
from echo_driver import EchoDriver
from echo_spec import ECHO_ID

from pyvirtio.driver.base import DeviceNeedsResetError, probe
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.testing.pair import DevicePair
from pyvirtio.testing.server import ServerThread

WORDS = [b"hello, virtio", b"both ends of the ring", b"x" * 4096]


def exercise(where: str, driver: EchoDriver, device: EchoDevice) -> None:
    for word in WORDS:
        answer = driver.echo(word)
        expected = word.upper()[::-1] if driver.reverses else word.upper()
        if answer != expected:
            raise SystemExit(f"{where}: sent {word[:30]!r}, got back {answer[:30]!r}")
        print(f"{where}: {word[:30].decode()!r} -> {answer[:30].decode()!r}")
    print(f"{where}: features REVERSE={driver.reverses}, max_len={driver.max_len}")
    print(f"{where}: device served {device.served} requests")


def in_process() -> None:
    device = EchoDevice()
    with DevicePair(device) as pair:
        driver = pair.probe()  # finds EchoDriver by device id
        assert isinstance(driver, EchoDriver)
        exercise("loopback", driver, device)
    with DevicePair(EchoDevice(max_len=64)) as pair:
        driver = pair.probe(features=0)  # a wish list without REVERSE
        assert isinstance(driver, EchoDriver)
        print("loopback without REVERSE:", driver.echo(b"plain").decode())
        # A misbehaving driver: a reply buffer shorter than its request. The device refuses
        # it, marks the queue broken and sets DEVICE_NEEDS_RESET; nothing else breaks.
        driver.vq.add_buf([(driver.request, 64)], [(driver.reply, 8)], token="bad")
        driver.vq.kick()
        try:
            driver.vq.wait_buf(timeout=5)
            raise SystemExit("the device accepted a reply buffer too short for the request")
        except DeviceNeedsResetError as exc:
            print("loopback, bad request refused:", exc)


def over_vhost_user(socket_dir: Path) -> None:
    path = socket_dir / "echo.sock"
    server = VhostUserServer(path, EchoDevice)
    with ServerThread(server), VhostUserClient(path, ECHO_ID) as client:
        driver = probe(client)
        assert isinstance(driver, EchoDriver)
        device = server.last_device  # the device serving this connection
        assert isinstance(device, EchoDevice)
        exercise("vhost-user", driver, device)
        print(f"vhost-user: {server.kicks} kicks, {server.calls} interrupts")


if __name__ == "__main__":
    in_process()
    if len(sys.argv) > 1:
        over_vhost_user(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            over_vhost_user(Path(tmp))
