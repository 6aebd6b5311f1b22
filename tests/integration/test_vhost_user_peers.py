"""pyvirtio's vhost-user back-end with real front-ends: QEMU 7.2 and User-Mode Linux.

QEMU's vhost-user-rng-pci gives a Linux guest a virtio-rng device served by our RngDevice;
the guest's reads of /dev/hwrng must be bytes our device served. UML's virtio_uml must get
through its handshake (it fails vq setup without the BACKEND_REQ protocol feature) and set up
every vring of a console device. Each test also pins the request sequence the real
front-end sent, which is what the back-end was written against. The other way round,
pyvirtio's front-end drives qemu-storage-daemon's vhost-user-blk export (libvhost-user).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.vhost_user import RecordingRngDevice
from peers import require_guest
from pyvirtio.device.console import ConsoleDevice
from pyvirtio.driver.base import probe
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.guest import (
    QemuGuest,
    UmlGuest,
    VhostUserDevice,
    VhostUserRng,
)
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.ring import PackedDriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.testing.server import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]



@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vu.sock")


@pytest.fixture
def rng_server(sock_path: str) -> Iterator[VhostUserServer]:
    device = RecordingRngDevice()
    server = VhostUserServer(sock_path, lambda: device)
    with ServerThread(server):
        yield server


def _wait_closed(server: VhostUserServer, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while len(server.closed_reasons) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.closed_reasons) >= count, "the front-end never disconnected"


def test_a_qemu_guest_reads_the_entropy_our_device_serves(rng_server: VhostUserServer,
                                                          sock_path: str) -> None:
    require_guest("qemu")
    script = (
        "result current $(cat /sys/class/misc/hw_random/rng_current)\n"
        "result hex $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')\n"
        "result bytes $(dd if=/dev/hwrng bs=4096 count=4 2>/dev/null | wc -c)\n"
    )
    result = QemuGuest(script, devices=[VhostUserRng(sock_path)], timeout=120).run().check()
    assert result.results["current"] == "virtio_rng.0"
    assert result.results["bytes"] == "16384"
    guest_bytes = bytes.fromhex(result.results["hex"])
    device = rng_server.last_device
    assert isinstance(device, RecordingRngDevice)
    assert len(guest_bytes) == 64 and guest_bytes in device.stream
    assert device.served >= 64 + 16384
    _wait_closed(rng_server)
    assert rng_server.closed_reasons == ["front-end disconnected"]
    # What QEMU 7.2 sends: vhost_user_backend_init, then vhost_dev_start, then the stop at
    # power-off (call/err fds and status queries interleave; they are left out here).
    noise = {"SET_VRING_CALL", "SET_VRING_ERR", "GET_STATUS", "SET_STATUS", "GET_FEATURES"}
    core = [r for r in rng_server.requests_seen[-1] if r not in noise]
    assert core == ["GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
                    "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "SET_FEATURES",
                    "ADD_MEM_REG", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                    "SET_VRING_KICK", "SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_VRING_BASE"]
    assert "Flags mismatch" not in result.tail(400)


def test_qemu_acks_ring_features_the_device_never_offered(sock_path: str) -> None:
    """QEMU 7.2's vhost-user-rng passes on what the guest acked (its own offer), not what
    the back-end offered: the back-end must run the rings with EVENT_IDX and INDIRECT_DESC
    anyway, or guest and device disagree about notifications."""
    require_guest("qemu")
    device = RecordingRngDevice(transport_features=F.bit(F.VERSION_1))
    server = VhostUserServer(sock_path, lambda: device)
    script = "result bytes $(dd if=/dev/hwrng bs=4096 count=2 2>/dev/null | wc -c)\n"
    with ServerThread(server):
        result = QemuGuest(script, devices=[VhostUserRng(sock_path)], timeout=120).run()
        result.check()
        _wait_closed(server)
    assert result.results["bytes"] == "8192"
    assert device.offered_features == F.bit(F.VERSION_1)
    ring_features = F.bit(F.VERSION_1) | F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC)
    assert device.negotiated and device.negotiated[-1] & ring_features == ring_features
    assert "SET_FEATURES" in server.requests_seen[-1]
    assert not [p for p in device.problems if "feature" in p]


def test_uml_completes_the_handshake_for_a_device_it_has_no_driver_for(
        rng_server: VhostUserServer, sock_path: str) -> None:
    require_guest("uml")
    script = "result devices $(ls /sys/bus/virtio/devices | wc -l)\n"
    result = UmlGuest(script, devices=[VhostUserDevice(sock_path, ids.RNG)]).run().check()
    assert result.results["devices"] == "1"
    assert "Flags mismatch" not in result.tail(400)
    _wait_closed(rng_server)
    assert rng_server.requests_seen[-1] == [
        "SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
        "SET_BACKEND_REQ_FD"]


def test_uml_sets_up_every_vring_of_a_console(sock_path: str) -> None:
    require_guest("uml")
    device = ConsoleDevice()
    server = VhostUserServer(sock_path, lambda: device)
    script = (
        "result hvc $(ls /dev/hvc0)\n"
        "echo hello-from-uml > /dev/hvc0\n"
    )
    with ServerThread(server):
        result = UmlGuest(script, devices=[VhostUserDevice(sock_path, ids.CONSOLE)]).run()
        result.check()
        _wait_closed(server)
    assert result.results["hvc"] == "/dev/hvc0"
    assert "Flags mismatch" not in result.tail(400)
    conn = server.requests_seen[-1]
    assert conn.count("SET_VRING_ADDR") == conn.count("SET_VRING_KICK") == device.num_queues
    assert conn.index("SET_MEM_TABLE") < conn.index("SET_VRING_ADDR")
    port = device.ports[0].backend
    assert b"hello-from-uml" in bytes(port.output)  # type: ignore[attr-defined]
    assert device.status == 0  # reset when UML went away
    assert server.closed_reasons == ["front-end disconnected"]


@pytest.mark.parametrize("mem_slots", [True, False], ids=["add-mem-reg", "set-mem-table"])
def test_our_front_end_drives_qemu_storage_daemon(tmp_path: Path, mem_slots: bool) -> None:
    """The other direction: pyvirtio's front-end and BlkDriver against libvhost-user."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon missing (Debian package qemu-system-x86)")
    image, sock = tmp_path / "disk.img", tmp_path / "qsd.sock"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    qsd = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={image}",
         "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
         f"addr.path={sock},writable=on,num-queues=2"],
        stdin=subprocess.DEVNULL)
    try:
        with VhostUserClient(str(sock), ids.BLOCK, connect_timeout=10,
                             mem_slots=mem_slots) as client:
            driver = probe(client, BlkDriver)
            assert isinstance(driver, BlkDriver)
            assert client.num_queues == 2
            # libvhost-user has no packed ring: it does not offer it and we run split
            assert not client.backend_features & F.bit(F.RING_PACKED)
            assert not client.acked_features & F.bit(F.RING_PACKED)
            assert not any(type(vq.ring) is PackedDriverQueue for vq in client.vqs.values())
            data = os.urandom(8192)
            driver.write(8, data)
            driver.flush()
            assert driver.read(8, 16) == data
        assert ("ADD_MEM_REG" if mem_slots else "SET_MEM_TABLE") in client.trace
        with open(image, "rb") as f:
            f.seek(8 * 512)
            assert f.read(8192) == data
    finally:
        qsd.terminate()
        try:
            qsd.wait(10)
        except subprocess.TimeoutExpired:
            qsd.kill()
            qsd.wait()
