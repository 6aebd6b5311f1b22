"""pyvirtio's net driver against QEMU's virtio-net-pci on a tap, over qtest.

QEMU runs inside a network namespace this module creates (``ip netns exec``), with
``-netdev tap``: the tap QEMU opens is the namespace's, and the kernel there is our
driver's peer. Our driver answers ARP and ICMP echo as a host would; the kernel's ``ping``
must get its replies, and our driver's own ARP request and ping must be answered by the
kernel. Nothing is configured outside the namespace, which is deleted at the end.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from helpers.net import (
    ETH_P_ARP,
    ETH_P_IP,
    arp_request,
    eth,
    inet_sum,
    ip4,
    ipv4_header,
    tcp_tso_frame,
)
from peers import require_binaries, require_root
from pyvirtio.driver.base import probe
from pyvirtio.driver.net import NetDriver, RxFrame
from pyvirtio.guest.qtest import QtestMachine
from pyvirtio.spec import net as N
from pyvirtio.transport.virtio_pci import VirtioPciModern

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QEMU = "qemu-system-x86_64"
TAP = "pvqtap0"
HOST_IP = "10.78.0.1"  # the kernel's side of the tap
GUEST_IP = "10.78.0.2"  # our driver's address
GUEST_MAC = bytes((0x02, 0, 0, 0x78, 0, 2))
TIMEOUT = 10.0


def ns_run(ns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True,
                          text=True, timeout=TIMEOUT).stdout


@dataclass
class NetRig:
    ns: str
    machine: QtestMachine
    driver: NetDriver
    answered: dict[str, int] = field(default_factory=lambda: {"arp": 0, "icmp": 0})
    ignored: int = 0

    def answer(self, frame: RxFrame) -> bool:
        """Answer ``frame`` if it is an ARP request or ICMP echo request for us."""
        data = frame.data
        ethertype = struct.unpack_from("!H", data, 12)[0]
        if (ethertype == ETH_P_ARP and struct.unpack_from("!H", data, 20)[0] == 1
                and data[38:42] == ip4(GUEST_IP)):
            sender_mac, sender_ip = data[22:28], data[28:32]
            reply = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 2, GUEST_MAC,
                                ip4(GUEST_IP), sender_mac, sender_ip)
            self.driver.send(eth(sender_mac, GUEST_MAC, ETH_P_ARP, reply + b"\0" * 18))
            self.answered["arp"] += 1
            return True
        if (ethertype == ETH_P_IP and data[23] == 1 and data[30:34] == ip4(GUEST_IP)
                and data[34] == 8):
            ihl = (data[14] & 0xF) * 4
            total = struct.unpack_from("!H", data, 16)[0]
            icmp = bytearray(data[14 + ihl : 14 + total])
            icmp[0] = 0  # echo reply, same id, sequence and data
            struct.pack_into("!H", icmp, 2, 0)
            struct.pack_into("!H", icmp, 2, 0xFFFF - inet_sum(bytes(icmp)))
            src = ".".join(str(b) for b in data[26:30])
            ip = ipv4_header(GUEST_IP, src, 1, len(icmp))
            self.driver.send(eth(data[6:12], GUEST_MAC, ETH_P_IP, ip + bytes(icmp)))
            self.answered["icmp"] += 1
            return True
        return False

    def serve(self, want: Callable[[RxFrame], bool] | None = None,
              stop: Callable[[], bool] = lambda: False, timeout: float = 20.0
              ) -> RxFrame | None:
        """Answer ARP/ICMP for us until a frame ``want`` accepts arrives (returned) or
        ``stop()`` (None); frames that are neither are counted in :attr:`ignored`."""
        deadline = time.monotonic() + timeout
        while not stop():
            if time.monotonic() > deadline:
                raise TimeoutError(f"net rig: nothing wanted in {timeout} s; answered "
                                   f"{self.answered}, ignored {self.ignored}")
            frame = self.driver.recv(timeout=0.05)
            if frame is None:
                continue
            if want is not None and want(frame):
                return frame
            if not self.answer(frame):
                self.ignored += 1
        return None


@pytest.fixture(scope="module")
def rig() -> Iterator[NetRig]:
    require_binaries(QEMU, "ip", "busybox")  # busybox ping: iputils may be absent
    require_root("network namespaces and taps")
    ns = f"pyvirtio-qtnet-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=TIMEOUT)
    machine = QtestMachine(
        ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
         "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,mac="
         + ":".join(f"{b:02x}" for b in GUEST_MAC)],
        wrapper=["ip", "netns", "exec", ns])
    try:
        machine.start()
        for cmd in (["sysctl", "-qw", f"net.ipv6.conf.{TAP}.disable_ipv6=1"],
                    ["ip", "link", "set", TAP, "up"],
                    ["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP]):
            ns_run(ns, *cmd)
        (transport,) = machine.virtio_transports()
        assert type(transport) is VirtioPciModern
        driver = probe(transport, NetDriver)
        assert isinstance(driver, NetDriver)
        yield NetRig(ns, machine, driver)
    finally:
        machine.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=TIMEOUT)


def test_driver_has_qemus_mac_and_the_link_is_up(rig: NetRig) -> None:
    assert rig.driver.mac == GUEST_MAC  # from QEMU's config space
    assert rig.driver.link_up


def test_the_kernel_pings_our_driver_and_gets_every_reply(rig: NetRig) -> None:
    ns_run(rig.ns, "ip", "neigh", "flush", "dev", TAP)  # so the kernel must ARP for us
    ping = subprocess.Popen(
        ["ip", "netns", "exec", rig.ns, "busybox", "ping", "-c", "3", "-W", "5",
         GUEST_IP], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        before = dict(rig.answered)
        rig.serve(stop=lambda: ping.poll() is not None)
        out = ping.communicate(timeout=TIMEOUT)[0]
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait(TIMEOUT)
    assert ping.returncode == 0, out
    assert "3 packets received" in out
    assert rig.answered["icmp"] - before["icmp"] == 3
    assert rig.answered["arp"] - before["arp"] >= 1  # the kernel resolved us first


def test_our_driver_resolves_and_pings_the_kernel(rig: NetRig) -> None:
    host_mac = bytes.fromhex(
        ns_run(rig.ns, "cat", f"/sys/class/net/{TAP}/address").strip().replace(":", ""))
    rig.driver.send(arp_request(GUEST_MAC, GUEST_IP, HOST_IP))

    def arp_reply(f: RxFrame) -> bool:
        return f.data[12:14] == b"\x08\x06" and struct.unpack_from("!H", f.data, 20)[0] == 2

    reply = rig.serve(arp_reply)
    assert reply is not None
    assert reply.data[22:28] == host_mac and reply.data[28:32] == ip4(HOST_IP)
    assert reply.data[32:38] == GUEST_MAC and reply.data[38:42] == ip4(GUEST_IP)

    body = b"pyvirtio-qtest-ping-" + bytes(range(64))
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x5151, 7) + body)
    struct.pack_into("!H", icmp, 2, 0xFFFF - inet_sum(bytes(icmp)))
    rig.driver.send(eth(host_mac, GUEST_MAC, ETH_P_IP,
                        ipv4_header(GUEST_IP, HOST_IP, 1, len(icmp)) + bytes(icmp)))

    def echo_reply(f: RxFrame) -> bool:
        return f.data[12:14] == b"\x08\x00" and f.data[23] == 1 and f.data[34] == 0

    echo = rig.serve(echo_reply)
    assert echo is not None
    assert echo.data[0:6] == GUEST_MAC and echo.data[6:12] == host_mac
    assert echo.data[26:30] == ip4(HOST_IP) and echo.data[30:34] == ip4(GUEST_IP)
    assert struct.unpack_from("!HH", echo.data, 38) == (0x5151, 7)
    assert echo.data[42:] == body
    assert inet_sum(echo.data[34:]) == 0xFFFF  # the kernel's ICMP checksum verifies


LISTENER = r"""
import hashlib, socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(20)
print("listening", flush=True)
conn, _ = srv.accept()
conn.settimeout(20)
want, got = int(sys.argv[3]), bytearray()
while len(got) < want:
    chunk = conn.recv(65536)
    if not chunk:
        break
    got += chunk
print(len(got), hashlib.sha256(got).hexdigest(), flush=True)
"""


def test_a_tso_segment_from_our_driver_reaches_a_kernel_socket_whole(rig: NetRig) -> None:
    """With CSUM and HOST_TSO4 negotiated, one ~64 KiB TCP frame (partial checksum, GSO
    TCPV4, MSS 1448) leaves our driver; QEMU hands it to the tap with its header, and a
    socket in the namespace reads exactly its bytes (the kernel acks all of them)."""
    for bit in (N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_HOST_TSO4):
        assert rig.driver.device.has_feature(bit)
    port, sport = 5001, 40000 + os.getpid() % 20000
    host_mac = bytes.fromhex(
        ns_run(rig.ns, "cat", f"/sys/class/net/{TAP}/address").strip().replace(":", ""))
    payload = os.urandom(60000)  # one frame: IPv4 total length and the window cap it
    listener = subprocess.Popen(
        ["ip", "netns", "exec", rig.ns, sys.executable, "-c", LISTENER, HOST_IP, str(port),
         str(len(payload))], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"

        def segment(data: bytes, seq: int, ack: int, flags: int, mss: int = 0) -> None:
            frame, hdr = tcp_tso_frame(GUEST_MAC, host_mac, data, mss, seq=seq, ack=ack,
                                       flags=flags, ips=(GUEST_IP, HOST_IP),
                                       ports=(sport, port))
            if not mss:
                hdr = hdr._replace(gso_type=N.VIRTIO_NET_HDR_GSO_NONE, hdr_len=0)
            rig.driver.send(frame, hdr)

        def tcp_from_host(flags: int) -> Callable[[RxFrame], bool]:
            def match(f: RxFrame) -> bool:
                return (f.data[12:14] == b"\x08\x00" and f.data[23] == 6
                        and struct.unpack_from("!HH", f.data, 34) == (port, sport)
                        and f.data[47] & flags == flags)
            return match

        isn = 7000
        segment(b"", isn, 0, 0x02)  # SYN
        synack = rig.serve(tcp_from_host(0x12))
        assert synack is not None
        their_isn, window = struct.unpack_from("!I", synack.data, 38)[0], \
            struct.unpack_from("!H", synack.data, 48)[0]
        assert window >= len(payload)
        segment(b"", isn + 1, their_isn + 1, 0x10)  # ACK
        segment(payload, isn + 1, their_isn + 1, 0x18, mss=1448)  # one TSO frame, PSH|ACK

        def acks_everything(f: RxFrame) -> bool:
            return (tcp_from_host(0x10)(f)
                    and struct.unpack_from("!I", f.data, 42)[0] == isn + 1 + len(payload))

        assert rig.serve(acks_everything) is not None
        out = listener.communicate(timeout=TIMEOUT)[0]
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(TIMEOUT)
    assert out.split() == [str(len(payload)), hashlib.sha256(payload).hexdigest()]
    segment(b"", isn + 1 + len(payload), their_isn + 1, 0x04)  # RST: leave nothing open
