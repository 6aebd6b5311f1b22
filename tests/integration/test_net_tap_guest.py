"""A real guest reaches the host kernel through ``pyvirtio serve net --tap``.

Everything on the kernel's side happens in a network namespace the test creates and deletes:
the CLI server runs inside it (``ip netns exec``) so its tap is created there, the tap gets
an address there, and a TCP listener and tcpdump run there. The UML guest itself runs
outside: it only connects to the server's unix socket. The guest pings the tap's address
and streams 8 MiB over TCP to the listener; its driver negotiated HOST_TSO4, so its
TCP segments cross the switch and the tap whole: tcpdump on the tap sees frames larger
than the 1500-byte MTU.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dpkt
import pytest

from helpers.net import (
    TIMEOUT,
    Cleanup,
    Netns,
    SwitchProcess,
    net_setup,
    pcap_frames,
    ping_until,
    stop_process,
)
from peers import require_guest, require_root
from pyvirtio.guest import UmlGuest, VhostUserDevice
from pyvirtio.spec import ids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TAP = "pvtap1"
HOST_IP = "10.99.0.1"
GUEST_IP = "10.99.0.2"
PORT = 5002
PAYLOAD_MIB = 8

LISTENER = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
conn, _ = s.accept()
conn.settimeout(float(sys.argv[3]))
h, n = hashlib.sha256(), 0
while True:
    data = conn.recv(1 << 20)
    if not data:
        break
    h.update(data)
    n += len(data)
print(n, h.hexdigest(), flush=True)
conn.close()
"""

GUEST_SCRIPT = net_setup(GUEST_IP) + f"""
dd if=/dev/urandom of=/tmp/data bs=1M count={PAYLOAD_MIB} 2>/dev/null
result sent_sha $(sha256sum /tmp/data | cut -d' ' -f1)
{ping_until(HOST_IP)}
echo NET-WAITING-FOR-GO
read go
nc {HOST_IP} {PORT} < /tmp/data
result nc_send $?
"""


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    yield c
    c.run()


def test_a_guest_pings_the_kernel_and_its_tcp_stream_crosses_the_tap_segmentation_offloaded(
        tmp_path: Path, cleanup: Cleanup) -> None:
    require_guest("uml")
    require_root("network namespaces and taps")
    ns = Netns("tap")
    cleanup.add(ns.delete)
    sock = str(tmp_path / "vm0.sock")
    server = SwitchProcess(["--socket", sock, "--tap", TAP, "--stats",
                            "--pcap", str(tmp_path / "port-{port}.pcap")], netns=ns.name)
    cleanup.add(server.close)
    for cmd in (["sysctl", "-qw", f"net.ipv6.conf.{TAP}.disable_ipv6=1"],
                ["ip", "link", "set", TAP, "up"],
                ["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP]):
        ns.run(*cmd)

    capture = tmp_path / "tap.pcap"
    tcpdump = ns.popen("tcpdump", "-i", TAP, "-U", "-n", "-w", str(capture), "tcp",
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cleanup.add(lambda: stop_process(tcpdump))
    assert tcpdump.stderr is not None
    line = tcpdump.stderr.readline().decode()
    assert "listening on" in line, line
    listener = ns.popen(sys.executable, "-c", LISTENER, HOST_IP, str(PORT), str(TIMEOUT),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cleanup.add(lambda: stop_process(listener))
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == b"ready"

    mark = server.mark()
    with UmlGuest(GUEST_SCRIPT, timeout=120,
                  devices=[VhostUserDevice(sock, ids.NET)]) as guest:
        features = server.wait_for(r"port vm0: guest driver ready, features (\S+)", start=mark)
        guest.wait_for("NET-WAITING-FOR-GO", timeout=90)
        guest.write("go\n")
        result = guest.wait(timeout=90)
    assert result.ok, result.describe()
    assert result.results[f"ping_{HOST_IP}"] == "0", result.tail()
    assert result.results["nc_send"] == "0"
    size, digest = listener.stdout.readline().decode().split()
    assert int(size) == PAYLOAD_MIB << 20
    assert digest == result.results["sent_sha"]

    # The guest's driver took segmentation offload from our device ...
    assert "HOST_TSO4" in features.group(1).split("|")
    # ... and the kernel saw TCP frames beyond the MTU arrive on the tap.
    tcpdump.send_signal(signal.SIGINT)
    tcpdump.wait(TIMEOUT)
    frames = pcap_frames(capture)
    to_listener = [f for f in frames if _is_tcp_to(f, HOST_IP, PORT)]
    assert to_listener, "tcpdump saw none of the stream"
    stats = server.stats()  # the kernel's side: the tap port received the whole stream
    sizes = sorted({len(f) for f in to_listener})
    assert max(sizes) > 1514, (
        f"no frame beyond the MTU among {len(to_listener)} frames (sizes {sizes[:5]}.."
        f"{sizes[-5:]}); switch stats {stats}")
    assert int(stats[TAP]["rx_bytes"]) > PAYLOAD_MIB << 20
    assert stats[TAP]["drops"] == "0" and stats["vm0"]["errors"] == "0"

    assert server.stop() == 0, server.tail()
    # A clean shutdown closed the tap (the kernel deleted it) and removed the socket.
    assert ns.run("ip", "link", "show", TAP, check=False).returncode != 0
    assert not Path(sock).exists()
    # Our own capture of the tap port (closed at shutdown) holds the same whole frames.
    ours = pcap_frames(tmp_path / f"port-{TAP}.pcap")
    assert max(len(f) for f in ours if _is_tcp_to(f, HOST_IP, PORT)) > 1514


def _is_tcp_to(raw: bytes, ip: str, port: int) -> bool:
    eth = dpkt.ethernet.Ethernet(raw)
    pkt = eth.data
    return (isinstance(pkt, dpkt.ip.IP) and isinstance(pkt.data, dpkt.tcp.TCP)
            and pkt.dst == bytes(int(x) for x in ip.split(".")) and pkt.data.dport == port)
