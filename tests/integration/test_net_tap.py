"""virtio-net over a real tap: the pyvirtio net driver talks to the Linux kernel's network
stack through our NetDevice and TapBackend.

Everything happens inside a network namespace the test creates (``ip netns add``) and
deletes in a finalizer; nothing is configured in the host's own namespace. The tap is opened
by a helper process that runs inside the namespace (``ip netns exec``) and passes the fd
back over a unix socket: a tap stays in the namespace where it was created.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from helpers.paths import SRC
from pyvirtio.device.net import NetDevice, link
from pyvirtio.device.net.switch import Switch
from pyvirtio.device.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap, TapBackend
from pyvirtio.driver.net import NetDriver, RxFrame
from pyvirtio.io.loop import EventLoop
from pyvirtio.spec import net as N
from pyvirtio.spec.net import NetHdr
from pyvirtio.testing.pair import DevicePair

pytestmark = pytest.mark.integration

TAP_NAME = "pvtap0"
HOST_IP = "10.77.0.1"  # the kernel's side of the tap
GUEST_IP = "10.77.0.2"  # our driver's address
GUEST_MAC = bytes((0x02, 0, 0, 0x77, 0, 2))
TIMEOUT = 10.0

OPEN_TAP = r"""
import socket, subprocess, sys
from pyvirtio.device.net.tap import Tap
sock = socket.socket(fileno=int(sys.argv[1]))
name, guest_mac = sys.argv[2], sys.argv[3]
tap = Tap.open(name)
for cmd in (
    ["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"],
    ["ip", "link", "set", name, "up"],
    ["ip", "addr", "add", "10.77.0.1/24", "dev", name],
    ["ip", "neigh", "replace", "10.77.0.2", "lladdr", guest_mac, "dev", name,
     "nud", "permanent"],
):
    subprocess.run(cmd, check=True)
socket.send_fds(sock, [name.encode()], [tap.fd])
"""


def ns_run(ns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True,
                          text=True, timeout=TIMEOUT).stdout


@pytest.fixture
def netns(require: Callable[..., None]) -> Iterator[str]:
    require("ip", "sysctl")
    if os.geteuid() != 0:
        message = "network namespaces and taps need root"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)  # CI must never go green by skipping the real thing
        pytest.skip(message)
    name = f"pyvirtio-net-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=TIMEOUT)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=TIMEOUT)


def open_tap_in(ns: str) -> Tap:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        helper = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", OPEN_TAP, str(theirs.fileno()),
             TAP_NAME, ":".join(f"{b:02x}" for b in GUEST_MAC)],
            pass_fds=[theirs.fileno()], env={**os.environ, "PYTHONPATH": SRC})
        theirs.close()
        try:
            ours.settimeout(TIMEOUT)
            _, fds, _, _ = socket.recv_fds(ours, 64, 1)
            assert helper.wait(TIMEOUT) == 0
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
    assert len(fds) == 1, "the namespace helper did not pass the tap fd"
    return Tap.from_fd(fds[0])


@dataclass
class TapRig:
    ns: str
    loop: EventLoop
    tap: Tap
    backend: TapBackend
    pair: DevicePair
    driver: NetDriver

    def wait_for(self, match: Callable[[RxFrame], bool], timeout: float = TIMEOUT
                 ) -> RxFrame:
        """Run the loop until the driver receives a frame ``match`` accepts."""
        found: list[RxFrame] = []

        def seen() -> bool:
            for f in self.driver.poll():
                if match(f):
                    found.append(f)
            return bool(found)

        self.loop.run(until=seen, timeout=timeout)
        assert found, f"no matching frame within {timeout} s"
        return found[0]

    def collect(self, done: Callable[[list[RxFrame]], bool],
                match: Callable[[RxFrame], bool], timeout: float = TIMEOUT) -> list[RxFrame]:
        """Frames ``match`` accepts, received until ``done(frames)`` (or the timeout)."""
        got: list[RxFrame] = []

        def finished() -> bool:
            got.extend(f for f in self.driver.poll() if match(f))
            return done(got)

        self.loop.run(until=finished, timeout=timeout)
        return got


@pytest.fixture
def make_rig(netns: str) -> Iterator[Callable[..., TapRig]]:
    rigs: list[TapRig] = []

    def make(features: int | None = None, switch: Switch | None = None) -> TapRig:
        """The guest's device linked to the tap directly, or both attached to ``switch``."""
        loop = EventLoop()
        tap = open_tap_in(netns)
        backend = TapBackend(tap, loop)
        pair = DevicePair(NetDevice(GUEST_MAC, name="guest"))
        pair.device.reactor = loop
        if switch is None:
            link(backend, pair.device)
        else:
            switch.add_port(pair.device, "guest")
            switch.add_port(backend, "tap")
        drv = pair.probe(NetDriver, features)
        assert isinstance(drv, NetDriver)
        rig = TapRig(netns, loop, tap, backend, pair, drv)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.backend.close()
        rig.pair.close()
        rig.loop.close()


class NsProcess:
    """A python snippet running inside the namespace, stopped by the test on any exit."""

    def __init__(self, ns: str, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self._out = b""
        self._eof = False

    def readline(self, loop: EventLoop, timeout: float = TIMEOUT) -> str:
        """One output line, running ``loop`` meanwhile (our side must keep serving)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()

        def readable() -> None:
            chunk = os.read(fd, 4096)
            self._out += chunk
            self._eof = not chunk

        loop.add_reader(fd, readable)
        try:
            loop.run(until=lambda: b"\n" in self._out or self._eof, timeout=timeout)
        finally:
            loop.remove_reader(fd)
        line, sep, self._out = self._out.partition(b"\n")
        assert sep, f"no output line; stderr: {self.stderr()}"
        return line.decode().strip()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def ns_processes() -> Iterator[list[NsProcess]]:
    procs: list[NsProcess] = []
    yield procs
    for p in procs:
        p.stop()


# ---- frames ------------------------------------------------------------------------------

def csum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def eth(dst: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + GUEST_MAC + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, payload: bytes, dst: str = HOST_IP, ident: int = 7) -> bytes:
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64,
                              proto, 0, socket.inet_aton(GUEST_IP), socket.inet_aton(dst)))
    struct.pack_into("!H", h, 10, 0xFFFF - csum(bytes(h)))
    return bytes(h) + payload


def pseudo(proto: int, length: int) -> bytes:
    return (socket.inet_aton(GUEST_IP) + socket.inet_aton(HOST_IP)
            + struct.pack("!BBH", 0, proto, length))


def host_mac(ns: str) -> bytes:
    text = ns_run(ns, "cat", f"/sys/class/net/{TAP_NAME}/address").strip()
    return bytes(int(x, 16) for x in text.split(":"))


def is_ipv4(f: RxFrame, proto: int) -> bool:
    return len(f.data) > 34 and f.data[12:14] == b"\x08\x00" and f.data[23] == proto


# ---- tests -------------------------------------------------------------------------------

def test_arp_request_is_answered_by_the_kernel(make_rig: Callable[..., TapRig]) -> None:
    rig = make_rig()
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC,
                      socket.inet_aton(GUEST_IP), b"\0" * 6, socket.inet_aton(HOST_IP))
    rig.driver.send(eth(b"\xff" * 6, 0x0806, arp + b"\0" * 18))

    def is_reply(f: RxFrame) -> bool:
        return f.data[12:14] == b"\x08\x06" and struct.unpack_from("!H", f.data, 20)[0] == 2

    reply = rig.wait_for(is_reply)
    sender_mac, sender_ip = reply.data[22:28], reply.data[28:32]
    assert sender_ip == socket.inet_aton(HOST_IP)
    assert sender_mac == host_mac(rig.ns)
    assert reply.data[32:38] == GUEST_MAC
    assert rig.backend.tx_frames >= 1 and rig.backend.rx_frames >= 1


def ping(rig: TapRig) -> RxFrame:
    dst = host_mac(rig.ns)
    body = b"pyvirtio-ping-" + bytes(range(50))
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + body)
    struct.pack_into("!H", icmp, 2, 0xFFFF - csum(bytes(icmp)))
    rig.driver.send(eth(dst, 0x0800, ipv4(1, bytes(icmp))))
    reply = rig.wait_for(lambda f: is_ipv4(f, 1) and f.data[34] == 0)
    assert reply.data[6:12] == dst and reply.data[0:6] == GUEST_MAC
    assert struct.unpack_from("!HH", reply.data, 38) == (0x4242, 1)
    assert reply.data[42:] == body
    assert csum(reply.data[34:]) == 0xFFFF
    return reply


def test_ping_gets_an_echo_reply(make_rig: Callable[..., TapRig]) -> None:
    ping(make_rig())


def test_switch_joins_a_guest_and_the_kernel(make_rig: Callable[..., TapRig]) -> None:
    switch = Switch()
    rig = make_rig(switch=switch)
    # The switch passes any offload on (each receiver converts), so the kernel may send
    # the tap port partial checksums and TSO frames.
    assert rig.tap.offload_flags == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    ping(rig)
    guest, tap = switch.port("guest").stats, switch.port("tap").stats
    assert guest.tx_frames >= 1 and tap.rx_frames >= 1
    assert guest.rx_frames >= 1 and tap.tx_frames >= 1
    assert switch.lookup(GUEST_MAC) is switch.port("guest")
    assert switch.lookup(host_mac(rig.ns)) is switch.port("tap")


UDP_LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.77.0.1", 9999))
s.settimeout(float(sys.argv[1]))
print("ready", flush=True)
got = []
try:
    while True:
        data, _ = s.recvfrom(2048)
        got.append(data.decode())
        if data == b"last":
            break
except socket.timeout:
    pass
print(",".join(got), flush=True)
"""


def test_partial_checksum_crosses_to_the_kernel_and_bad_checksums_do_not(
        make_rig: Callable[..., TapRig], ns_processes: list[NsProcess]) -> None:
    rig = make_rig()
    listener = NsProcess(rig.ns, UDP_LISTENER, str(TIMEOUT))
    ns_processes.append(listener)
    assert listener.readline(rig.loop) == "ready"
    dst = host_mac(rig.ns)

    def udp(payload: bytes, how: str) -> tuple[bytes, NetHdr]:
        seg = bytearray(struct.pack("!HHHH", 5555, 9999, 8 + len(payload), 0) + payload)
        ps = pseudo(17, len(seg))
        hdr = NetHdr()
        if how == "partial":  # pseudo-header sum only; the kernel is asked to finish it
            struct.pack_into("!H", seg, 6, csum(ps))
            hdr = NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6)
        elif how == "full":
            struct.pack_into("!H", seg, 6, (0xFFFF - csum(ps + bytes(seg))) or 0xFFFF)
        else:  # a wrong full checksum: the kernel must drop it
            struct.pack_into("!H", seg, 6, 0x1234)
        return eth(dst, 0x0800, ipv4(17, bytes(seg))), hdr

    for payload, how in ((b"bad", "wrong"), (b"partial", "partial"), (b"full", "full"),
                         (b"last", "full")):
        frame, hdr = udp(payload, how)
        rig.driver.send(frame, hdr)
    assert listener.readline(rig.loop).split(",") == ["partial", "full", "last"]


UDP_SENDER = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"k" * 300, ("10.77.0.2", 7777))
print("sent", flush=True)
"""


@pytest.mark.parametrize("guest_csum", [True, False], ids=["guest_csum", "no_guest_csum"])
def test_kernel_offloads_checksums_only_to_a_guest_that_negotiated_guest_csum(
        make_rig: Callable[..., TapRig], ns_processes: list[NsProcess],
        guest_csum: bool) -> None:
    features = NetDriver.features | NetDriver.transport_features
    if not guest_csum:
        for bit in (N.VIRTIO_NET_F_GUEST_CSUM, N.VIRTIO_NET_F_GUEST_TSO4,
                    N.VIRTIO_NET_F_GUEST_TSO6):
            features &= ~(1 << bit)
    rig = make_rig(features)
    expected = (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) if guest_csum else 0
    assert rig.tap.offload_flags == expected
    sender = NsProcess(rig.ns, UDP_SENDER)
    ns_processes.append(sender)
    got = rig.wait_for(lambda f: is_ipv4(f, 17) and f.data[36:38] == b"\x1e\x61")
    seg = got.data[34:]
    assert seg[8:] == b"k" * 300
    if guest_csum:
        # The kernel left the checksum to us: the field holds the pseudo-header sum.
        assert got.hdr.flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM
        assert (got.hdr.csum_start, got.hdr.csum_offset) == (34, 6)
    else:
        assert got.hdr.flags == 0
        ps = got.data[26:34] + struct.pack("!BBH", 0, 17, len(seg))
        assert csum(ps + seg) == 0xFFFF


def test_tso_frame_is_taken_whole_by_the_kernel(make_rig: Callable[..., TapRig]) -> None:
    """A 20 000-byte TCP segment with TCPV4 GSO to a closed port: the kernel's reset
    acknowledges every byte, so it took the frame whole with its virtio-net header."""
    rig = make_rig()
    dst = host_mac(rig.ns)
    payload = bytes(range(256)) * 78 + b"x" * 32  # 20 000 bytes
    seq = 123456
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5999, seq, 0, 5 << 4, 0x08, 65535, 0, 0)
                    + payload)  # PSH without ACK: the reset then acks seq + len
    struct.pack_into("!H", tcp, 16, csum(pseudo(6, len(tcp))))
    hdr = NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, N.VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)
    rig.driver.send(eth(dst, 0x0800, ipv4(6, bytes(tcp))), hdr)
    rst = rig.wait_for(lambda f: is_ipv4(f, 6) and bool(f.data[47] & 0x04))
    ack = struct.unpack_from("!I", rst.data, 42)[0]
    assert ack == seq + len(payload)


TCP_CLIENT = r"""
import socket
s = socket.create_connection(("10.77.0.2", 5001), timeout=8)
s.sendall(b"t" * 60000)
print("sent", flush=True)
"""


@pytest.mark.parametrize("guest_tso", [True, False], ids=["guest_tso", "no_guest_tso"])
def test_kernel_sends_tso_frames_only_to_a_guest_that_negotiated_guest_tso(
        make_rig: Callable[..., TapRig], ns_processes: list[NsProcess],
        guest_tso: bool) -> None:
    """A kernel TCP client in the namespace connects to us; we answer its SYN by hand and
    watch what its data segments look like."""
    features = NetDriver.features | NetDriver.transport_features
    if not guest_tso:
        features &= ~(1 << N.VIRTIO_NET_F_GUEST_TSO4) & ~(1 << N.VIRTIO_NET_F_GUEST_TSO6)
    rig = make_rig(features)
    client = NsProcess(rig.ns, TCP_CLIENT)
    ns_processes.append(client)
    syn = rig.wait_for(lambda f: is_ipv4(f, 6) and f.data[47] & 0x12 == 0x02)
    sport = struct.unpack_from("!H", syn.data, 34)[0]
    their_seq = struct.unpack_from("!I", syn.data, 38)[0]
    dst = host_mac(rig.ns)
    # SYN-ACK with MSS 1460 and a window of 65535 (no scaling): room for a 64 KiB burst.
    opts = struct.pack("!BBH", 2, 4, 1460)
    tcp = bytearray(struct.pack("!HHIIBBHHH", 5001, sport, 777, their_seq + 1, 6 << 4, 0x12,
                                65535, 0, 0) + opts)
    struct.pack_into("!H", tcp, 16, 0xFFFF - csum(pseudo(6, len(tcp)) + bytes(tcp)))
    rig.driver.send(eth(dst, 0x0800, ipv4(6, bytes(tcp))))
    # We never acknowledge: the kernel sends its initial congestion window (10 segments).
    burst = 10 * 1460
    data = rig.collect(lambda got: sum(len(f.data) - 54 for f in got) >= burst,
                       match=lambda f: is_ipv4(f, 6) and len(f.data) > 54)
    assert sum(len(f.data) - 54 for f in data) >= burst
    biggest = max(len(f.data) for f in data)
    if guest_tso:
        assert any(f.hdr.gso_type == N.VIRTIO_NET_HDR_GSO_TCPV4 for f in data)
        assert biggest > 1514
        gso = next(f for f in data if f.hdr.gso_type)
        assert gso.hdr.gso_size <= 1460
    else:
        assert all(f.hdr.gso_type == N.VIRTIO_NET_HDR_GSO_NONE for f in data)
        assert biggest <= 1514
