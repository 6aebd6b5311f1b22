"""Shared helpers for the virtio-net tests, in memory and against real guests.

* Frames are built byte by byte with struct (so tests control every field, including partial
  checksums) and verified with an independent, deliberately naive checksum loop, never with
  the code under test.
* ``pyvirtio serve net`` as a child process (:class:`SwitchProcess`), network namespaces
  (:class:`Netns`, joined like two hosts by :func:`join_namespaces`), guest scripts (two
  guests ping each other and stream 16 MiB: :func:`run_pair`, :func:`check_pair`), and
  :class:`RawNetFrontend`, a vhost-user front-end whose virtio-net descriptors the test
  places by hand (possibly hostile).

Every process and namespace made here is registered with a :class:`Cleanup` that the test's
fixture runs on any exit, so nothing outlives a failing test.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dpkt

from helpers.serve_process import ServeProcess
from pyvirtio.driver import base as driver_base
from pyvirtio.driver.base import Driver, Virtqueue
from pyvirtio.driver.net import NetDriver
from pyvirtio.guest import Guest, GuestResult
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.memory import GuestMemory
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import net as N
from pyvirtio.spec.net import NetHdr
from pyvirtio.testing.pair import DevicePair

BROADCAST = b"\xff" * 6
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_EXPERIMENTAL = 0x88B5  # IEEE local experimental


def mac(n: int) -> bytes:
    """A locally administered unicast MAC ending in ``n``."""
    return bytes((0x02, 0, 0, 0, 0, n))


def ip4(text: str) -> bytes:
    return socket.inet_aton(text)


def ip6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def inet_sum(data: bytes) -> int:
    """RFC 1071 the slow way: add 16-bit words with end-around carry."""
    total = 0
    for i in range(0, len(data), 2):
        word = data[i] << 8
        if i + 1 < len(data):
            word |= data[i + 1]
        total += word
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
    return total


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, src_mac, ip4(src_ip),
                       b"\0" * 6, ip4(target_ip))
    return eth(BROADCAST, src_mac, ETH_P_ARP, body + b"\0" * 18)


def ipv4_header(src: str, dst: str, proto: int, payload_len: int, ident: int = 1) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000,
                                64, proto, 0, ip4(src), ip4(dst)))
    struct.pack_into("!H", hdr, 10, 0xFFFF - inet_sum(bytes(hdr)))
    return bytes(hdr)


def pseudo4(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip4(src) + ip4(dst) + struct.pack("!BBH", 0, proto, length)


def pseudo6(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip6(src) + ip6(dst) + struct.pack("!I3xB", length, proto)


def udp_frame(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int,
              dport: int, payload: bytes, *, partial: bool = False) -> tuple[bytes, NetHdr]:
    """A UDP/IPv4 frame; with ``partial`` the UDP checksum field holds only the pseudo-header
    sum and the header asks for NEEDS_CSUM (what Linux sends with CSUM offload)."""
    ulen = 8 + len(payload)
    udp = bytearray(struct.pack("!HHHH", sport, dport, ulen, 0) + payload)
    pseudo = pseudo4(src_ip, dst_ip, 17, ulen)
    if partial:
        struct.pack_into("!H", udp, 6, inet_sum(pseudo))
        hdr = NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    else:
        csum = 0xFFFF - inet_sum(pseudo + bytes(udp))
        struct.pack_into("!H", udp, 6, csum or 0xFFFF)
        hdr = NetHdr()
    frame = eth(dst_mac, src_mac, ETH_P_IP,
                ipv4_header(src_ip, dst_ip, 17, len(udp)) + bytes(udp))
    return frame, hdr


def tcp_tso_frame(src_mac: bytes, dst_mac: bytes, payload: bytes, mss: int, *,
                  v6: bool = False, seq: int = 1000, flags: int = 0x18,
                  ips: tuple[str, str] = ("10.0.0.1", "10.0.0.2"),
                  ports: tuple[int, int] = (40000, 5001), ack: int = 1) -> tuple[bytes, NetHdr]:
    """One large TCP frame for TSO: partial checksum (pseudo-header sum with the full TCP
    length, as Linux computes it for GSO) and a TCPV4/TCPV6 header (``ips`` for IPv4)."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", *ports, seq, ack, 5 << 4, flags, 65535, 0,
                                0) + payload)
    tlen = len(tcp)
    if v6:
        src, dst = "fd00::1", "fd00::2"
        struct.pack_into("!H", tcp, 16, inet_sum(pseudo6(src, dst, 6, tlen)))
        l3 = struct.pack("!IHBB16s16s", 6 << 28, tlen, 6, 64, ip6(src), ip6(dst))
        frame = eth(dst_mac, src_mac, ETH_P_IPV6, l3 + bytes(tcp))
        gso = N.VIRTIO_NET_HDR_GSO_TCPV6
        start = 54
    else:
        src, dst = ips
        struct.pack_into("!H", tcp, 16, inet_sum(pseudo4(src, dst, 6, tlen)))
        frame = eth(dst_mac, src_mac, ETH_P_IP, ipv4_header(src, dst, 6, tlen) + bytes(tcp))
        gso = N.VIRTIO_NET_HDR_GSO_TCPV4
        start = 34
    hdr = NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, start + 20, mss, start, 16)
    return frame, hdr


def l4_checksum_ok(frame: bytes) -> bool:
    """Whether the UDP/TCP checksum of an IPv4 or IPv6 frame verifies."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_P_IP:
        ihl = (frame[14] & 0xF) * 4
        proto = frame[23]
        seg = frame[14 + ihl :]
        total_len = struct.unpack_from("!H", frame, 16)[0]
        seg = seg[: total_len - ihl]
        pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, len(seg))
    else:
        proto = frame[20]
        plen = struct.unpack_from("!H", frame, 18)[0]
        seg = frame[54 : 54 + plen]
        pseudo = frame[22:54] + struct.pack("!I3xB", len(seg), proto)
    return inet_sum(pseudo + seg) == 0xFFFF


def ipv4_header_ok(frame: bytes) -> bool:
    ihl = (frame[14] & 0xF) * 4
    return inet_sum(frame[14 : 14 + ihl]) == 0xFFFF


def probe(pair: DevicePair, driver: type[NetDriver] = NetDriver,
          features: int | None = None) -> NetDriver:
    drv = pair.probe(driver, features)
    assert isinstance(drv, NetDriver)
    return drv


def features_without(*bits: int) -> int:
    """NetDriver's default features (device and transport) minus ``bits``."""
    out = NetDriver.features | NetDriver.transport_features
    for b in bits:
        out &= ~(1 << b)
    return out


TIMEOUT = 30.0
VERBOSE = ["-v"]


# ---- the server process --------------------------------------------------------------------

class SwitchProcess(ServeProcess):
    """``pyvirtio -v serve net ARGS`` in a child process (optionally inside a network
    namespace), stderr joined to stdout; waits until every socket listens. :meth:`stats`
    parses the newest ``--stats`` table."""

    def __init__(self, args: Sequence[str], *, netns: str | None = None,
                 ready_timeout: float = 20.0) -> None:
        super().__init__("net", args, global_args=VERBOSE, netns=netns)
        try:
            # The banner ends with the last port's UML line: every socket listens by then.
            self.wait_for(r"^\s+UML:\s+virtio_uml\.device=" + re.escape(self._last_socket(args)),
                          ready_timeout)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _last_socket(args: Sequence[str]) -> str:
        sockets = [args[i + 1] for i, a in enumerate(args) if a == "--socket"]
        return sockets[-1]

    def stats(self, timeout: float = 5.0) -> dict[str, dict[str, str]]:
        """The next complete ``--stats`` table printed from now: port -> column -> value."""
        start = self.mark()
        self.wait_for(r"^learned \d+ addresses", timeout, start)
        with self._cond:
            lines = self.lines[start:]
        end = max(i for i, line in enumerate(lines) if line.startswith("learned "))
        head = max(i for i in range(end) if lines[i].startswith("port "))
        columns = lines[head].split()
        table = {}
        for line in lines[head + 1 : end]:
            values = line.split()
            table[values[0]] = dict(zip(columns, values, strict=True))
        return table


class JoinProcess(ServeProcess):
    """``pyvirtio -v join KIND ARGS`` in a child process, stderr joined to stdout; waits
    until every socket listens (the banner's last UML line names the last socket)."""

    def __init__(self, kind: str, args: Sequence[str], *, ready_timeout: float = 20.0) -> None:
        super().__init__(kind, args, global_args=VERBOSE, command="join")
        try:
            last = SwitchProcess._last_socket(args)
            self.wait_for(r"virtio_uml\.device=" + re.escape(last), ready_timeout)
        except BaseException:
            self.close()
            raise


# ---- namespaces ----------------------------------------------------------------------------

class Netns:
    """A network namespace the test owns (``ip netns add``), deleted by :meth:`delete`."""

    def __init__(self, tag: str = "net") -> None:
        self.name = f"pyvirtio-{tag}-{os.getpid()}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=TIMEOUT)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd: str, check: bool = True, timeout: float = TIMEOUT
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=check,
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd],  # type: ignore[call-overload]
                                start_new_session=True, **kwargs)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True, timeout=TIMEOUT, check=False).stdout
        return [int(p) for p in out.split()]

    def delete(self) -> None:
        for pid in self.pids():  # nothing may keep the namespace (or its taps) alive
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=TIMEOUT)


def join_namespaces(a: Netns, b: Netns, a_addr: str, b_addr: str, *, name: str = "veth",
                    mtu: int | None = None) -> tuple[str, str]:
    """A veth pair between two namespaces (two hosts on one link): ``{name}0`` in ``a``
    with address ``a_addr``, ``{name}1`` in ``b`` with ``b_addr`` (CIDR), both up. The
    pair is made inside ``a``, so no name ever appears in the host's own namespace; it goes
    away with the namespaces."""
    ends = f"{name}0", f"{name}1"
    a.run("ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1], "netns",
          b.name)
    for ns, end, addr in ((a, ends[0], a_addr), (b, ends[1], b_addr)):
        if mtu is not None:
            ns.run("ip", "link", "set", end, "mtu", str(mtu))
        ns.run("ip", "addr", "add", addr, "dev", end)
        ns.run("ip", "link", "set", end, "up")
    return ends


def pcap_frames(path: str | os.PathLike[str]) -> list[bytes]:
    """Every frame of a pcap file (tcpdump -w), in order."""
    with open(path, "rb") as f:
        return [bytes(raw) for _, raw in dpkt.pcap.Reader(f)]


class Tcpdump:
    """``tcpdump`` capturing ``interface`` of namespace ``ns`` into ``path`` (``filter``:
    a pcap filter expression's words), ready once constructed; :meth:`frames` stops it and
    returns what it captured, :meth:`stop` (idempotent) only stops it.

    Each frame is handed over as it arrives (``--immediate-mode``) into a ring of
    ``buffer_kib`` KiB cut into slots of ``snaplen`` bytes: a burst of small frames needs a
    small snap length, a 64 KiB frame a large one. ``dropped`` tells what the kernel could
    not queue (parsed from tcpdump's summary)."""

    def __init__(self, ns: Netns, interface: str, path: str | os.PathLike[str],
                 *filter: str, snaplen: int = 2048, buffer_kib: int = 8192) -> None:
        self.path = path
        self.dropped: int | None = None
        self.proc = ns.popen("tcpdump", "-i", interface, "--immediate-mode", "-s",
                             str(snaplen), "-B", str(buffer_kib), "-U", "-n", "-w", str(path),
                             *filter, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert self.proc.stderr is not None
            line = self.proc.stderr.readline().decode()
            if "listening on" not in line:
                raise RuntimeError(f"tcpdump on {interface} did not start: {line}")
        except BaseException:
            stop_process(self.proc)
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # it writes what it holds and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(TIMEOUT)
        stop_process(self.proc)
        if self.dropped is None and self.proc.stderr is not None:
            summary = self.proc.stderr.read().decode()
            self.proc.stderr.close()
            found = re.search(r"(\d+) packets? dropped by kernel", summary)
            self.dropped = int(found.group(1)) if found else None

    def frames(self) -> list[bytes]:
        """Stop, and every frame captured (a capture that lost frames is an error)."""
        self.stop()
        if self.dropped:
            raise AssertionError(f"tcpdump: the kernel dropped {self.dropped} frames: "
                                 "a larger buffer or smaller snap length is needed")
        return pcap_frames(self.path)


class Cleanup:
    """Finalizers run in reverse order, each even if an earlier one failed."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], object]] = []

    def add(self, action: Callable[[], object]) -> None:
        self._actions.append(action)

    def run(self) -> None:
        errors = []
        while self._actions:
            action = self._actions.pop()
            try:
                action()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Kill a child started in its own session (and its children), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


# ---- guest scripts -------------------------------------------------------------------------

def net_setup(ip: str, mtu: int | None = None) -> str:
    """Shell lines that bring eth0 up with a static address (busybox ip)."""
    lines = [
        "ip link set lo up",
        "ip link set eth0 up" + (f" mtu {mtu}" if mtu else ""),
        f"ip addr add {ip}/24 dev eth0",
        "result mac $(cat /sys/class/net/eth0/address)",
    ]
    return "\n".join(lines) + "\n"


def ping_until(ip: str, tries: int = 50) -> str:
    """Shell lines: ping ``ip`` once a try until it answers (the peer may still be booting),
    then 3 more; ``result ping_IP 0`` on success."""
    return f"""
i=0
until ping -c 1 -W 1 {ip} >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -ge {tries} ] && break
done
ping -c 3 -i 0.2 -W 2 {ip}
result ping_{ip} $?
"""


# ---- two guests stream to each other ---------------------------------------------------------

#: what :func:`sender_script` sends, and the port :func:`receiver_script` listens on
PAYLOAD_MIB = 16
PORT = 5001


def receiver_script(ip: str, peer: str) -> str:
    """Guest shell: eth0 gets ``ip``, nc listens on :data:`PORT` (``NET-LISTENING``), the
    peer answers pings, and what arrives is reported (``recv_size``, ``recv_sha``)."""
    return net_setup(ip) + f"""
# busybox nc quits as soon as either input ends, and a background job's stdin is
# /dev/null: hand the connection to a program that reads it to the sender's end instead.
printf '#!/bin/sh\\nexec cat > /tmp/recv\\n' > /tmp/save
chmod +x /tmp/save
nc -l -p {PORT} -e /tmp/save &
ncpid=$!
until netstat -ltn 2>/dev/null | grep -q ':{PORT} '; do usleep 50000; done
echo NET-LISTENING
{ping_until(peer)}
wait $ncpid
result nc_listen $?
result recv_size $(stat -c %s /tmp/recv)
result recv_sha $(sha256sum /tmp/recv | cut -d' ' -f1)
"""


def sender_script(ip: str, peer: str) -> str:
    """Guest shell: eth0 gets ``ip``, the peer answers pings (``NET-WAITING-FOR-GO``), and
    on "go" :data:`PAYLOAD_MIB` MiB of random bytes go to the peer (``sent_sha``)."""
    return net_setup(ip) + f"""
dd if=/dev/urandom of=/tmp/data bs=1M count={PAYLOAD_MIB} 2>/dev/null
result sent_sha $(sha256sum /tmp/data | cut -d' ' -f1)
{ping_until(peer)}
echo NET-WAITING-FOR-GO
read go
nc {peer} {PORT} < /tmp/data
result nc_send $?
"""


@dataclass
class PairRun:
    sender: GuestResult
    receiver: GuestResult
    sender_ip: str
    receiver_ip: str


def run_pair(sender: Guest, receiver: Guest, sender_ip: str, receiver_ip: str) -> PairRun:
    """Boot both guests at once; start the sender's stream once the receiver listens."""
    with receiver, sender:
        receiver.wait_for("NET-LISTENING", timeout=120)
        sender.wait_for("NET-WAITING-FOR-GO", timeout=120)
        sender.write("go\n")
        r_sender = sender.wait(timeout=120)
        r_receiver = receiver.wait(timeout=60)
    return PairRun(r_sender, r_receiver, sender_ip, receiver_ip)


def check_pair(run: PairRun, *switches: ServeProcess) -> None:
    """:func:`check_guest_pair` with the switches' logs going with a failure (what they saw
    of the guests' rings)."""
    check_guest_pair(run, "".join(f"\n--- switch log ---\n{p.tail(40)}" for p in switches))


# ---- a raw virtio-net front-end ------------------------------------------------------------

class RawNet(Driver):
    """A virtio-net "driver" that only sets up the receive and transmit queues: the test
    then places descriptors itself (``rx``/``tx`` are the virtqueues, rings in ``.ring``).
    Nothing is posted and nothing is polled unless the test does it."""

    device_ids = (ids.NET,)
    features = 0

    def probe(self) -> None:
        self.rx: Virtqueue = self.device.setup_vq(0, None, 64)
        self.tx: Virtqueue = self.device.setup_vq(1, None, 64)


CANARY = 0xA5


class RawNetFrontend:
    """Our vhost-user front-end with :class:`RawNet` on one switch port: VERSION_1 only (a
    12-byte header, one receive buffer per frame), every descriptor placed by hand."""

    def __init__(self, path: str, memory_size: int = 4 << 20) -> None:
        self.client = VhostUserClient(path, ids.NET, memory_size=memory_size)
        try:
            feats = self.client.get_features() & (F.bit(F.VERSION_1)
                                                  | F.bit(N.VIRTIO_NET_F_MAC))
            drv = driver_base.probe(self.client, RawNet, features=feats)
            assert isinstance(drv, RawNet)
            self.drv = drv
            self.mac = self.client.read_config(N.CFG_MAC, 6)
        except BaseException:
            self.client.close()
            raise
        self.memory_size = memory_size
        self.closed = False
        self.rx_posted: dict[int, int] = {}  # address -> size of each receive buffer

    @property
    def memory(self) -> GuestMemory:
        return self.client.memory

    def status(self) -> int:
        return self.client.get_status()

    def send(self, frame: bytes, *, wait: bool = True) -> int:
        """Transmit one well-formed frame (zero header); returns the used length."""
        return self.send_raw(bytes(N.NET_HDR_SIZE) + frame, wait=wait)

    def send_raw(self, data: bytes, *, wait: bool = True) -> int:
        """Transmit a chain whose one readable descriptor holds exactly ``data``."""
        addr = self.client.allocator.alloc(max(len(data), 1), 64)
        self.memory.write(addr, data)
        return self.send_sgs([(addr, len(data))], wait=wait)

    def send_sgs(self, sgs: Sequence[tuple[int, int]], *, wait: bool = True) -> int:
        """Transmit a chain of readable descriptors as given (addresses unchecked)."""
        self.drv.tx.add_buf(sgs, [], sgs)
        self.drv.tx.kick()
        if not wait:
            return -1
        _, length = self.drv.tx.wait_buf(TIMEOUT)
        return length

    def post_rx(self, sizes: Sequence[int]) -> None:
        """Post one receive buffer per size, each filled with :data:`CANARY` bytes."""
        for size in sizes:
            addr = self.client.allocator.alloc(size, 64)
            self.memory.write(addr, bytes([CANARY]) * size)
            self.drv.rx.add_buf([], [(addr, size)], addr)
            self.rx_posted[addr] = size
        self.drv.rx.kick()

    def used_rx(self) -> list[tuple[int, int]]:
        """(buffer address, used length) of every receive buffer returned so far."""
        out = []
        while (got := self.drv.rx.get_buf()) is not None:
            addr, length = got
            assert isinstance(addr, int)
            out.append((addr, length))
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()


def eth_frame(dst: bytes, src: bytes, size: int, fill: int = 0x42) -> bytes:
    """An Ethernet frame of ``size`` bytes with the local experimental ethertype 0x88b5
    (guests' stacks ignore it)."""
    return eth(dst, src, ETH_P_EXPERIMENTAL, bytes([fill]) * (size - 14))


def check_guest_pair(run: PairRun, context: str = "") -> None:
    """Both guests pinged each other and the receiver got the sender's 16 MiB intact;
    ``context`` (e.g. the server's log) goes with a failure."""
    s, r = run.sender, run.receiver
    assert s.ok, s.describe() + context
    assert r.ok, r.describe() + context
    assert s.results[f"ping_{run.receiver_ip}"] == "0", s.tail() + context
    assert r.results[f"ping_{run.sender_ip}"] == "0", r.tail() + context
    assert s.results["nc_send"] == "0", s.tail() + context
    assert r.results["recv_size"] == str(PAYLOAD_MIB << 20), r.tail() + context
    assert r.results["recv_sha"] == s.results["sent_sha"], context
