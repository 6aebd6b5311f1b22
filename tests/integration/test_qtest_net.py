"""pyvirtio's net driver against QEMU's virtio-net on a tap, over qtest, on every transport.

QEMU's virtio-net (``virtio-net-pci`` legacy and modern on ``-M pc``, ``virtio-net-device``
behind virtio-mmio version 1 and 2 on ``-M microvm``) runs inside a network namespace this
module creates (``ip netns exec``), with ``-netdev tap``: the tap QEMU opens is the
namespace's, and the kernel there is our driver's peer. Our driver answers ARP and ICMP echo
as a host would; the kernel's ``ping`` must get its replies, and our driver's own ARP request
and ping must be answered by the kernel. With CSUM and HOST_TSO4 negotiated, our driver sends
one TCP segment as large as IPv4 allows to a socket in a second namespace behind a veth
pair: the first kernel forwards it and segments it in software on the way out, and the
second kernel receives MSS-sized segments. One QEMU per transport serves every test of the
module; nothing is configured outside the namespaces, which are deleted at the end.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dpkt
import pytest

from helpers.net import (
    ETH_P_ARP,
    ETH_P_IP,
    Netns,
    Tcpdump,
    arp_request,
    eth,
    inet_sum,
    ip4,
    ipv4_header,
    stop_process,
    tcp_tso_frame,
)
from helpers.qtest import QTEST_TRANSPORTS, QtestBus
from peers import require_binaries, require_root
from pyvirtio.driver.base import probe
from pyvirtio.driver.net import NetDriver, RxFrame
from pyvirtio.guest.qtest import QtestMachine
from pyvirtio.spec import net as N

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QEMU = "qemu-system-x86_64"
TAP = "pvqtap0"
HOST_IP = "10.78.0.1"  # the kernel's side of the tap
GUEST_IP = "10.78.0.2"  # our driver's address
GUEST_MAC = bytes((0x02, 0, 0, 0x78, 0, 2))
VETH = ("pvqv0", "pvqv1")  # the first namespace's end, the second namespace's end
ROUTER_IP = "10.79.0.1"  # the first namespace on the veth
PEER_IP = "10.79.0.2"  # the second namespace, behind the first one
TIMEOUT = 10.0


@dataclass
class NetRig:
    ns: Netns
    machine: QtestMachine
    driver: NetDriver
    answered: dict[str, int] = field(default_factory=lambda: {"arp": 0, "icmp": 0})
    ignored: int = 0

    @property
    def host_mac(self) -> bytes:
        """The MAC address of the tap, the kernel's side."""
        text = self.ns.run("cat", f"/sys/class/net/{TAP}/address").stdout.strip()
        return bytes.fromhex(text.replace(":", ""))

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


@pytest.fixture(scope="module", params=QTEST_TRANSPORTS, ids=str)
def rig(request: pytest.FixtureRequest) -> Iterator[NetRig]:
    require_binaries(QEMU, "ip", "busybox", "tcpdump")  # busybox ping: iputils may be absent
    require_root("network namespaces and taps")
    bus: QtestBus = request.param
    ns = Netns("qtnet")
    machine: QtestMachine | None = None
    try:
        machine = bus.machine(
            ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
             *bus.device("virtio-net",
                         "netdev=n0,mac=" + ":".join(f"{b:02x}" for b in GUEST_MAC))],
            wrapper=["ip", "netns", "exec", ns.name])
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
        machine.start()
        ns.run("ip", "link", "set", TAP, "up")
        ns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP)
        (transport,) = bus.transports(machine)
        driver = probe(transport, NetDriver)
        assert isinstance(driver, NetDriver)
        yield NetRig(ns, machine, driver)
    finally:
        if machine is not None:
            machine.close()
        ns.delete()


@pytest.fixture(scope="module")
def peer(rig: NetRig) -> Iterator[Netns]:
    """A second namespace behind a veth pair, routed through the first (which forwards)."""
    ns = Netns("qtpeer")
    try:
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
        rig.ns.run("ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1],
                   "netns", ns.name)
        rig.ns.run("ip", "addr", "add", f"{ROUTER_IP}/24", "dev", VETH[0])
        rig.ns.run("ip", "link", "set", VETH[0], "up")
        rig.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns.run("ip", "addr", "add", f"{PEER_IP}/24", "dev", VETH[1])
        ns.run("ip", "link", "set", VETH[1], "up")
        ns.run("ip", "route", "add", "default", "via", ROUTER_IP)
        yield ns
    finally:
        ns.delete()


def test_driver_has_qemus_mac_and_the_link_is_up(rig: NetRig) -> None:
    assert rig.driver.mac == GUEST_MAC  # from QEMU's config space
    assert rig.driver.link_up


def test_the_kernel_pings_our_driver_and_gets_every_reply(rig: NetRig) -> None:
    rig.ns.run("ip", "neigh", "flush", "dev", TAP)  # so the kernel must ARP for us
    ping = subprocess.Popen(
        ["ip", "netns", "exec", rig.ns.name, "busybox", "ping", "-c", "3", "-W", "5",
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
    host_mac = rig.host_mac
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
# Linux's first window is at most 65535 (unscaled, whatever the SYN says), rounded down to
# a multiple of the MSS when the receive buffer is small: 64240 with the default buffer.
# With a larger buffer it is 65535 and one 65495-byte segment fits.
srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
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

#: the largest TCP payload of one IPv4 packet: its total length is 16 bits, less the IPv4
#: and TCP headers (no options)
MAX_TCP4_PAYLOAD = 0xFFFF - 20 - 20


def snmp(ns: Netns, group: str) -> dict[str, int]:
    """The namespace kernel's ``/proc/net/snmp`` counters of ``group`` ("Tcp", "Ip")."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith(f"{group}:")]
    names, values = lines
    return {n: int(v) for n, v in zip(names[1:], values[1:], strict=True)}


def tcp_mss_option(frame: bytes) -> int | None:
    """The MSS option of the TCP/IPv4 ``frame``, if it has one."""
    tcp = dpkt.ethernet.Ethernet(frame).data.data
    for kind, value in dpkt.tcp.parse_opts(tcp.opts):
        if kind == dpkt.tcp.TCP_OPT_MSS:
            return int(struct.unpack("!H", value)[0])
    return None


def tcp4_payloads(frames: list[bytes], src: str, dst: str) -> list[tuple[int, int, bytes]]:
    """(IPv4 total length, TCP sequence number, payload) of each TCP/IPv4 frame from ``src``
    to ``dst`` that carries data."""
    out = []
    for frame in frames:
        ip = dpkt.ethernet.Ethernet(frame).data
        if (isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP)
                and (ip.src, ip.dst) == (ip4(src), ip4(dst)) and ip.data.data):
            out.append((ip.len, ip.data.seq, bytes(ip.data.data)))
    return out


def test_the_largest_tso_segment_from_our_driver_reaches_the_kernel_as_mss_segments(
        rig: NetRig, peer: Netns, tmp_path: Path) -> None:
    """With CSUM and HOST_TSO4 negotiated, one TCP frame carrying 65,495 bytes (IPv4's
    largest; partial checksum, GSO TCPV4 with the MSS the receiver announced) leaves our
    driver, and QEMU hands it to the tap whole, with its header: tcpdump on the tap sees
    one 65,549-byte frame. The first namespace's kernel forwards it to the veth, which does
    not take a tap's untrusted (SKB_GSO_DODGY) GSO packets whole (no NETIF_F_GSO_ROBUST),
    so it is segmented in software on the way out: the second namespace's kernel receives
    MSS-sized segments (tcpdump there sees them; its TcpInSegs counts each) and its socket
    reads exactly the bytes sent."""
    for bit in (N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_HOST_TSO4):
        assert rig.driver.device.has_feature(bit)
    port, sport = 5001, 40000 + os.getpid() % 20000
    payload = os.urandom(MAX_TCP4_PAYLOAD)
    on_tap = Tcpdump(rig.ns, TAP, tmp_path / "tap.pcap", "tcp", "port", str(port),
                     snaplen=0x10000 + 64)
    on_peer = Tcpdump(peer, VETH[1], tmp_path / "peer.pcap", "tcp", "port", str(port))
    listener = peer.popen(sys.executable, "-c", LISTENER, PEER_IP, str(port),
                          str(len(payload)), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == b"listening"
        before = snmp(peer, "Tcp")

        def segment(data: bytes, seq: int, ack: int, flags: int, mss: int = 0) -> None:
            frame, hdr = tcp_tso_frame(GUEST_MAC, rig.host_mac, data, mss, seq=seq, ack=ack,
                                       flags=flags, ips=(GUEST_IP, PEER_IP),
                                       ports=(sport, port))
            if not mss:
                hdr = hdr._replace(gso_type=N.VIRTIO_NET_HDR_GSO_NONE, hdr_len=0)
            rig.driver.send(frame, hdr)

        def tcp_from_peer(flags: int) -> Callable[[RxFrame], bool]:
            def match(f: RxFrame) -> bool:
                return (f.data[12:14] == b"\x08\x00" and f.data[23] == 6
                        and struct.unpack_from("!HH", f.data, 34) == (port, sport)
                        and f.data[47] & flags == flags)
            return match

        isn = 7000
        segment(b"", isn, 0, 0x02)  # SYN
        synack = rig.serve(tcp_from_peer(0x12))
        assert synack is not None
        their_isn, window = struct.unpack_from("!I", synack.data, 38)[0], \
            struct.unpack_from("!H", synack.data, 48)[0]
        mss = tcp_mss_option(synack.data)
        assert mss == 1460  # the veth's MTU of 1500, less the IPv4 and TCP headers
        assert window >= len(payload)
        segment(b"", isn + 1, their_isn + 1, 0x10)  # ACK
        segment(payload, isn + 1, their_isn + 1, 0x18, mss=mss)  # one TSO frame, PSH|ACK

        def acks_everything(f: RxFrame) -> bool:
            return (tcp_from_peer(0x10)(f)
                    and struct.unpack_from("!I", f.data, 42)[0] == isn + 1 + len(payload))

        assert rig.serve(acks_everything) is not None
        out = listener.communicate(timeout=TIMEOUT)[0].decode()
        after = snmp(peer, "Tcp")
        segment(b"", isn + 1 + len(payload), their_isn + 1, 0x04)  # RST: leave nothing open
    finally:
        stop_process(listener)
        on_tap.stop()
        on_peer.stop()
    assert out.split() == [str(len(payload)), hashlib.sha256(payload).hexdigest()]

    # The tap's kernel received one frame: IPv4's largest packet, the whole payload
    ((total, seq, data),) = tcp4_payloads(on_tap.frames(), GUEST_IP, PEER_IP)
    assert (total, seq, data) == (0xFFFF, isn + 1, payload)
    # The second kernel received MSS-sized segments, in order, carrying the payload
    segments = tcp4_payloads(on_peer.frames(), GUEST_IP, PEER_IP)
    sizes = [mss] * (len(payload) // mss) + [len(payload) % mss]  # 44 * 1460 + 1255
    assert [len(d) for _, _, d in segments] == sizes
    assert [s for _, s, _ in segments] == [isn + 1 + i * mss for i in range(len(sizes))]
    assert b"".join(d for _, _, d in segments) == payload
    # ... and TCP counted each: the SYN, the ACK and the segments (one each: Linux counts
    # TcpInSegs per packet tcp_v4_rcv receives, not per segment a GSO packet stands for)
    assert after["InSegs"] - before["InSegs"] == 2 + len(sizes)
    assert after["InErrs"] == before["InErrs"]
