"""pyvirtio's console driver against QEMU's virtio-serial, over qtest, on every transport.

QEMU's virtio-serial (``virtio-serial-pci`` legacy and modern on ``-M pc``,
``virtio-serial-device`` behind virtio-mmio version 1 and 2 on ``-M microvm``) carries a
``virtconsole`` and a named ``virtserialport``, each backed by a unix-socket chardev this
test holds the other end of; one QEMU per transport serves every test of the module. Our
driver does the MULTIPORT handshake a Linux guest does; asserted is what QEMU told it (port
names, which port is the console, that a host peer is connected) and that bytes cross both
ways unchanged (sha256 of what one end sent equals sha256 of what the other end received).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.qtest import QTEST_TRANSPORTS, QtestBus
from peers import require_binaries
from pyvirtio.driver.base import probe
from pyvirtio.driver.console import ConsoleDriver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QEMU = "qemu-system-x86_64"
CONSOLE_NAME = "org.pyvirtio.console"
PORT_NAME = "org.pyvirtio.data"


class SerialMachine:
    """QEMU under qtest with a virtio-serial on ``bus``, its two ports' sockets connected."""

    def __init__(self, tmp: Path, bus: QtestBus) -> None:
        self.bus = bus
        self.paths = {name: str(tmp / f"{name}.sock") for name in ("console", "data")}
        self.machine = bus.machine([
            "-chardev", f"socket,id=c0,path={self.paths['console']},server=on,wait=off",
            "-chardev", f"socket,id=c1,path={self.paths['data']},server=on,wait=off",
            *bus.device("virtio-serial", "max_ports=4"),
            "-device", f"virtconsole,chardev=c0,name={CONSOLE_NAME}",
            "-device", f"virtserialport,chardev=c1,name={PORT_NAME}",
        ])
        self.sockets: dict[str, socket.socket] = {}

    def start(self) -> SerialMachine:
        self.machine.start()
        for name, path in self.paths.items():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sockets[name] = sock
            sock.settimeout(10)
            sock.connect(path)
        return self

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.machine.close()


@pytest.fixture(scope="module", params=QTEST_TRANSPORTS, ids=str)
def serial(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[SerialMachine]:
    require_binaries(QEMU)
    m = SerialMachine(tmp_path_factory.mktemp(f"serial-{request.param}"), request.param)
    try:
        yield m.start()
    finally:
        m.close()


@pytest.fixture(scope="module")
def console(serial: SerialMachine) -> tuple[SerialMachine, ConsoleDriver]:
    (transport,) = serial.bus.transports(serial.machine)
    driver = probe(transport, ConsoleDriver)
    assert isinstance(driver, ConsoleDriver)
    run_until(driver, lambda: {p.name for p in driver.ports.values()} >= {
        CONSOLE_NAME, PORT_NAME} and all(p.host_connected for p in driver.ports.values()))
    return serial, driver


def run_until(driver: ConsoleDriver, done: Callable[[], bool], timeout: float = 20) -> None:
    """Serve the driver's interrupts until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"console driver: condition not met in {timeout} s; ports "
                               f"{driver.ports}, problems {driver.problems}")
        driver.poll()
        driver.device.transport.wait(0.05)


def test_multiport_handshake_shows_qemus_port_names_and_console(
        console: tuple[SerialMachine, ConsoleDriver]) -> None:
    _, driver = console
    assert driver.multiport
    assert driver.max_nr_ports == 4
    by_name = {p.name: p for p in driver.ports.values()}
    assert by_name[CONSOLE_NAME].console  # QEMU said CONSOLE_PORT for the virtconsole
    assert not by_name[PORT_NAME].console
    assert by_name[CONSOLE_NAME].id != by_name[PORT_NAME].id
    assert all(p.host_connected for p in by_name.values())  # our sockets are connected
    assert driver.problems == []


@pytest.mark.parametrize("port", ["console", "data"])
def test_bytes_cross_both_ways_unchanged(
        console: tuple[SerialMachine, ConsoleDriver], port: str) -> None:
    serial, driver = console
    name = CONSOLE_NAME if port == "console" else PORT_NAME
    if not driver.port(name).open:
        driver.open(name)  # as a guest process opening /dev/vportNpM
    sock = serial.sockets[port]
    # QEMU throttles a virtserialport whose chardev is full, but drops what a virtconsole's
    # chardev does not take (hvc has no flow control): the console's bytes must fit in the
    # socket's buffer (~208 KiB here); the named port carries more than that.
    size = 64 * 1024 if port == "console" else 1024 * 1024

    # guest -> host: our driver writes, the socket QEMU's chardev writes to receives
    outbound = os.urandom(size)
    received = bytearray()

    def host_reads() -> None:
        while len(received) < size:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return  # the assertion below tells how much arrived
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=host_reads, daemon=True)
    reader.start()
    driver.write(name, outbound, timeout=30)
    run_until(driver, lambda: not reader.is_alive(), timeout=30)
    reader.join(1)
    assert len(received) == size
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(outbound).hexdigest()

    # host -> guest: the socket sends, our driver's receive buffers get the bytes
    inbound = os.urandom(size)
    writer = threading.Thread(target=sock.sendall, args=(inbound,), daemon=True)
    writer.start()
    got = driver.read(name, size, timeout=30)
    writer.join(10)
    assert not writer.is_alive()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(inbound).hexdigest()
    assert driver.read_available(name) == b""
    assert driver.problems == []
