"""pyvirtio's vhost-user back-end server, driven by pyvirtio's vhost-user front-end.

Our RngDriver runs over VhostUserClient (memfd guest memory, eventfds, the real socket
protocol) against VhostUserServer running an RngDevice in a thread or in a child process;
the bytes the driver reads must be exactly the bytes the device served.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.paths import SRC, TESTS
from helpers.vhost_user import (
    ConfigRngDevice,
    RawFrontend,
    read_entropy,
)
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import probe
from pyvirtio.driver.rng import RngDriver
from pyvirtio.errors import LocalError
from pyvirtio.guest.qemu import qemu_args, qemu_memory_args
from pyvirtio.guest.uml import uml_args
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids
from pyvirtio.spec import status as S
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.testing.server import ServerProcess, ServerThread
from pyvirtio.transport.vhost_user import codec as C

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vu.sock")


@pytest.fixture
def served(sock_path: str) -> Iterator[tuple[VhostUserServer, ServerThread]]:
    server = VhostUserServer(sock_path, RngDevice)
    thread = ServerThread(server)
    yield server, thread
    thread.stop()


MINIMAL = V.protocol_mask(PF.MQ, PF.BACKEND_REQ)  # no REPLY_ACK, no STATUS: like old QEMUs


@pytest.mark.parametrize(
    ("protocol", "mem_slots"),
    [
        pytest.param(None, True, id="all-protocol-features-add-mem-reg"),
        pytest.param(None, False, id="all-protocol-features-set-mem-table"),
        pytest.param(MINIMAL, False, id="no-reply-ack-no-status"),
        pytest.param(0, False, id="empty-protocol-features"),
        pytest.param("none", False, id="front-end-without-protocol-features"),
    ],
)
def test_driver_reads_exactly_the_bytes_the_device_served(
        served: tuple[VhostUserServer, ServerThread], sock_path: str,
        protocol: int | str | None, mem_slots: bool) -> None:
    server, _ = served
    kwargs: dict[str, object] = {"mem_slots": mem_slots}
    if protocol is not None:
        kwargs["protocol_features"] = None if protocol == "none" else protocol
    with VhostUserClient(sock_path, ids.RNG, **kwargs) as client:  # type: ignore[arg-type]
        driver = probe(client, RngDriver)
        assert isinstance(driver, RngDriver)
        data = driver.read(20000)
        device = server.last_device
        assert isinstance(device, RngDevice)
        assert device.served == len(data) == 20000
        assert hashlib.sha256(data).digest() == device.digest.digest()
        assert device.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
        if protocol == "none":
            assert "GET_PROTOCOL_FEATURES" not in client.trace
            assert "SET_VRING_ENABLE" not in client.trace  # rings start enabled then


def test_the_first_ring_start_is_traced_message_by_message(sock_path: str,
                                                             tmp_path: Path) -> None:
    with ServerProcess(sock_path, log_path=tmp_path / "server.log") as server:
        assert len(read_entropy(sock_path, 1000)) == 1000
        server.wait_for_log(r"connection closed: front-end disconnected")
        log = server.log_text()
    for line in ("<- GET_FEATURES flags=0x1 size=0",
                 "-> GET_FEATURES flags=0x5 size=8",
                 "<- SET_VRING_ADDR flags=0x9 size=40 vring 0",
                 "-> SET_VRING_ADDR flags=0x5 size=8 ack 0",
                 "vring 0 started: size 256"):
        assert line in log
    assert "WARNING" not in log


def test_the_server_outlives_a_sigkilled_front_end(
        served: tuple[VhostUserServer, ServerThread], sock_path: str) -> None:
    server, _ = served
    script = (
        "import sys, time\n"
        "from pyvirtio.io.vhost_user_client import VhostUserClient\n"
        "from pyvirtio.driver.base import probe\n"
        "from pyvirtio.driver.rng import RngDriver\n"
        f"c = VhostUserClient({sock_path!r}, 4)\n"
        "d = probe(c, RngDriver)\n"
        "d.read(4096)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout.readline().strip() == b"ready"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert len(read_entropy(sock_path, 512)) == 512
    assert server.accepted == 2
    assert server.closed_reasons[0] == "front-end disconnected"


def test_one_device_instance_is_reset_between_front_ends(sock_path: str) -> None:
    device = RngDevice()
    server = VhostUserServer(sock_path, lambda: device)
    with ServerThread(server):
        for _ in range(3):
            assert len(read_entropy(sock_path, 100)) == 100
    assert device.served == 300
    assert device.status == 0 and device.memory is None
    assert all(q.ring is None for q in device.queues)


def test_a_second_front_end_waits_until_the_first_leaves(sock_path: str) -> None:
    server = VhostUserServer(sock_path, RngDevice, max_connections=1)
    with ServerThread(server):
        first = VhostUserClient(sock_path, ids.RNG)
        try:
            probe(first, RngDriver)
            with RawFrontend(sock_path) as second:
                second.send(R.GET_FEATURES)
                ready, _, _ = select.select([second.sock], [], [], 0.3)
                assert not ready  # queued in the backlog, not served
                first.close()
                reply = second.recv(timeout=10)
                assert reply.request == R.GET_FEATURES
        finally:
            first.close()


def test_with_two_connections_allowed_each_front_end_gets_its_own_device(
        sock_path: str) -> None:
    devices: list[RngDevice] = []

    def factory() -> RngDevice:
        devices.append(RngDevice())
        return devices[-1]

    server = VhostUserServer(sock_path, factory, max_connections=2)
    with ServerThread(server):
        with VhostUserClient(sock_path, ids.RNG) as a, VhostUserClient(sock_path, ids.RNG) as b:
            ra, rb = probe(a, RngDriver), probe(b, RngDriver)
            assert isinstance(ra, RngDriver) and isinstance(rb, RngDriver)
            da, db = ra.read(100), rb.read(300)
    assert [d.served for d in devices] == [100, 300]
    assert hashlib.sha256(da).digest() == devices[0].digest.digest()
    assert hashlib.sha256(db).digest() == devices[1].digest.digest()


def test_config_space_and_config_change_notifications_cross_the_socket(
        sock_path: str) -> None:
    server = VhostUserServer(sock_path, ConfigRngDevice)
    with ServerThread(server), VhostUserClient(sock_path, ids.RNG) as client:
        probe(client, RngDriver)
        assert client.read_config(0, 8) == b"PVIO\0\0\0\0"
        client.write_config(4, b"hi")
        assert client.wait(5)  # CONFIG_CHANGE_MSG on the back-end channel
        assert client.config_changes == 1 and client.generation() == 1
        assert client.read_config(0, 8) == b"PVIOhihi"


def test_the_socket_file_is_removed_on_close_and_other_files_are_never_replaced(
        sock_path: str, tmp_path: Path) -> None:
    server = VhostUserServer(sock_path, RngDevice)
    assert Path(sock_path).exists()
    server.close()
    assert not Path(sock_path).exists()
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    with pytest.raises(LocalError, match="not a socket"):
        VhostUserServer(str(precious), RngDevice)
    assert precious.read_text() == "keep me"


def test_a_stale_socket_file_is_replaced_but_a_live_one_is_not(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()  # file left behind, nobody listening
    server = VhostUserServer(sock_path, RngDevice)
    try:
        with pytest.raises(LocalError, match="another server"):
            VhostUserServer(sock_path, RngDevice)
    finally:
        server.close()


def test_guest_args_say_how_to_attach_qemu_and_uml(sock_path: str) -> None:
    assert qemu_args(sock_path, ids.RNG) == ["-chardev", f"socket,id=vu0,path={sock_path}",
                                             "-device", "vhost-user-rng-pci,chardev=vu0"]
    assert uml_args(sock_path, ids.RNG) == [f"virtio_uml.device={sock_path}:4"]
    assert qemu_args(sock_path, ids.NET)[-1] == "virtio-net-pci,netdev=vu0-net"
    with pytest.raises(LocalError, match="no vhost-user front-end for console"):
        qemu_args(sock_path, ids.CONSOLE)
    assert "share=on" in " ".join(qemu_memory_args(256))


def test_server_process_stops_cleanly_on_sigterm(sock_path: str, tmp_path: Path) -> None:
    server = ServerProcess(sock_path, "helpers.vhost_user:ConfigRngDevice",
                           pythonpath=[TESTS], log_path=tmp_path / "log")
    assert len(read_entropy(sock_path, 64)) == 64
    assert server.stop() == 0
    assert not Path(sock_path).exists()
    assert "stopping: signal SIGTERM" in server.log_text()


def test_messages_are_answered_in_order_when_pipelined(
        served: tuple[VhostUserServer, ServerThread], sock_path: str) -> None:
    with RawFrontend(sock_path) as fe:
        burst = b"".join(C.request(r).encode() for r in
                         [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES] * 50)
        fe.send_raw(burst)
        for i in range(100):
            want = R.GET_FEATURES if i % 2 == 0 else R.GET_PROTOCOL_FEATURES
            assert fe.recv().request == want
