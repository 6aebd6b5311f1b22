"""Real Linux guests on one pyvirtio switch: ``pyvirtio serve net`` with three sockets, run as
a child process exactly as a user would, and UML / QEMU TCG guests whose virtio_net drivers
talk to it over vhost-user.

Each pair of guests runs concurrently: both configure static addresses (busybox ip), ping
each other until the peer answers, then one streams 16 MiB of random data to the other with
busybox nc; the receiver listens before the sender is told (over its console) to start. The
switch captures every frame to a pcap file, which must hold the guests' echo requests and
replies. Guest memory, rings and every frame cross only unix sockets and shared memory; no
network interface is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dpkt
import pytest

from helpers.net import (
    PAYLOAD_MIB,
    PairRun,
    RawNetFrontend,
    SwitchProcess,
    check_pair,
    eth_frame,
    receiver_script,
    run_pair,
    sender_script,
)
from helpers.paths import SRC
from peers import require_guest
from pyvirtio.guest import QemuGuest, UmlGuest, VhostUserDevice, VhostUserNet
from pyvirtio.spec import ids
from pyvirtio.spec import net as N

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MACS = ["02:70:79:76:00:01", "02:70:79:76:00:02", "02:70:79:76:00:03"]


@dataclass
class Lan:
    """The switch process shared by the guest tests, and where its sockets and capture are."""

    proc: SwitchProcess
    workdir: Path

    def sock(self, i: int) -> str:
        return str(self.workdir / f"vm{i}.sock")

    @property
    def capture(self) -> Path:
        return self.workdir / "switch.pcap"


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    require_guest("uml", "qemu")
    d = tmp_path_factory.mktemp("net-guests")
    proc = SwitchProcess([*(a for i in range(3) for a in ("--socket", str(d / f"vm{i}.sock"))),
                          "--mac", MACS[0], "--pcap", str(d / "switch.pcap"), "--stats"])
    yield Lan(proc, d)
    proc.close()


@pytest.fixture(scope="module")
def uml_pair(lan: Lan) -> PairRun:
    return run_pair(
        UmlGuest(sender_script("10.0.0.1", "10.0.0.2"), timeout=180,
                 devices=[VhostUserDevice(lan.sock(0), ids.NET)]),
        UmlGuest(receiver_script("10.0.0.2", "10.0.0.1"), timeout=180,
                 devices=[VhostUserDevice(lan.sock(1), ids.NET)]),
        "10.0.0.1", "10.0.0.2")


def test_two_uml_guests_ping_each_other_and_stream_16_mib_intact(uml_pair: PairRun,
                                                                 lan: Lan) -> None:
    check_pair(uml_pair, lan.proc)
    # The guests use the MACs the CLI assigned (--mac base, incremented per socket).
    assert uml_pair.sender.results["mac"] == MACS[0]
    assert uml_pair.receiver.results["mac"] == MACS[1]
    out = lan.proc.output()
    for port in ("vm0", "vm1"):
        line = next(x for x in out.splitlines() if f"port {port}: guest driver ready" in x)
        assert "MRG_RXBUF" in line and "HOST_TSO4" in line


def test_a_uml_and_a_qemu_guest_ping_each_other_and_stream_16_mib_intact(
        uml_pair: PairRun, lan: Lan) -> None:
    # The UML guest reuses vm0's socket: the device was reset when the first guest left.
    check_pair(run_pair(
        QemuGuest(sender_script("10.0.0.3", "10.0.0.1"), timeout=180,
                  devices=[VhostUserNet(lan.sock(2), mac=MACS[2])]),
        UmlGuest(receiver_script("10.0.0.1", "10.0.0.3"), timeout=180,
                 devices=[VhostUserDevice(lan.sock(0), ids.NET)]),
        "10.0.0.3", "10.0.0.1"), lan.proc)
    stats = lan.proc.stats()
    # vm0 sent the first stream and received the second (counters outlive its guests).
    for port, column in (("vm2", "tx_bytes"), ("vm0", "rx_bytes"), ("vm0", "tx_bytes")):
        assert int(stats[port][column]) > PAYLOAD_MIB << 20, stats


def icmp_echoes(path: Path) -> list[tuple[int, bytes, bytes, int, int]]:
    """(ICMP type, source, destination, id, sequence) of every echo in a pcap file."""
    found = []
    with open(path, "rb") as f:
        for _, raw in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(raw)
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.icmp.ICMP):
                icmp = ip.data
                if icmp.type in (dpkt.icmp.ICMP_ECHO, dpkt.icmp.ICMP_ECHOREPLY):
                    echo = icmp.data
                    found.append((icmp.type, ip.src, ip.dst, echo.id, echo.seq))
    return found


def test_the_capture_holds_the_guests_echo_requests_and_replies(uml_pair: PairRun,
                                                               lan: Lan) -> None:
    lan.proc.stats()  # the capture is flushed every second, before the stats
    echoes = icmp_echoes(lan.capture)
    a, b = socket.inet_aton(uml_pair.sender_ip), socket.inet_aton(uml_pair.receiver_ip)
    requests = {(src, dst, i, s) for t, src, dst, i, s in echoes if t == dpkt.icmp.ICMP_ECHO}
    replies = {(src, dst, i, s) for t, src, dst, i, s in echoes
               if t == dpkt.icmp.ICMP_ECHOREPLY}
    for src, dst in ((a, b), (b, a)):
        sent = {(i, s) for s_, d_, i, s in requests if (s_, d_) == (src, dst)}
        answered = {(i, s) for s_, d_, i, s in replies if (s_, d_) == (dst, src)}
        assert len(sent & answered) >= 3, (
            f"fewer than 3 answered echo requests {src.hex()} -> {dst.hex()}: {echoes}")
        assert answered <= sent, "a reply whose request was not captured"


# ---- shutdown --------------------------------------------------------------------------------

def test_sigint_flushes_the_capture_and_removes_the_sockets(tmp_path: Path) -> None:
    """Frames sent just before SIGINT are in the per-port captures, whole; the sockets are
    gone; the exit status is 0."""
    socks = [str(tmp_path / f"s{i}.sock") for i in range(2)]
    proc = SwitchProcess(["--socket", socks[0], "--socket", socks[1], "--mac", MACS[0],
                          "--pcap", str(tmp_path / "cap-{port}.pcap")])
    try:
        with contextlib.closing(RawNetFrontend(socks[0])) as a, \
                contextlib.closing(RawNetFrontend(socks[1])) as b:
            frames = [eth_frame(b.mac, a.mac, 60 + i, fill=i) for i in range(5)]
            b.post_rx([2048] * len(frames))
            for frame in frames:
                assert a.send(frame) == 0
            got: list[bytes] = []
            while len(got) < len(frames):
                addr, length = b.drv.rx.wait_buf(10)
                assert isinstance(addr, int)
                got.append(bytes(b.memory.read(addr, length)[N.NET_HDR_SIZE :]))
        assert got == frames
        assert proc.stop(signal.SIGINT) == 0, proc.tail()
    finally:
        proc.close()
    assert not any(Path(s).exists() for s in socks)
    for port in ("vm0", "vm1"):  # vm0 sent them, vm1 received them
        with open(tmp_path / f"cap-{port}.pcap", "rb") as f:
            assert [bytes(raw) for _, raw in dpkt.pcap.Reader(f)] == frames


def test_mac_options_are_a_base_or_one_per_socket(tmp_path: Path) -> None:
    socks = [str(tmp_path / f"m{i}.sock") for i in range(2)]
    args = [a for s in socks for a in ("--socket", s)]
    bad = subprocess.run([sys.executable, "-m", "pyvirtio", "serve", "net", *args,
                          *(a for m in MACS for a in ("--mac", m))],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert bad.returncode == 2
    assert "--mac was given 3 times for 2 sockets" in bad.stderr
    assert not any(Path(s).exists() for s in socks)
    proc = SwitchProcess([*args, "--mac", MACS[2], "--mac", MACS[0]])
    try:
        assert proc.wait_for(r"^port vm0 \((\S+),").group(1) == MACS[2]
        assert proc.wait_for(r"^port vm1 \((\S+),").group(1) == MACS[0]
        assert proc.stop() == 0
    finally:
        proc.close()
