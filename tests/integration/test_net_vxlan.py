"""Guests on two hosts share one L2 segment: each host's ``pyvirtio serve net --tap`` is
bridged to a kernel VXLAN device, and the two VXLAN devices talk over the hosts' link
(the recipe of docs/vxlan.md).

Two network namespaces the test creates are the two hosts, joined by a veth pair (the
"physical" link, 192.168.77.0/24). On each: the switch runs inside it with its tap, and a
bridge joins the tap and ``vxlan0`` (VNI 4242, UDP 4789, unicast to the other host). One UML
guest per host attaches to its host's switch socket (UML itself runs outside: it only needs
the socket). The guests ping each other and stream 16 MiB over TCP with equal sha256; the
VXLAN devices carried the stream (their counters), and each switch saw the other host's
guest arrive through its tap (its capture of the tap port holds frames from that MAC) and
learned it there (the stream was forwarded, not flooded).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import dpkt
import pytest

from helpers.net import (
    PAYLOAD_MIB,
    Cleanup,
    Netns,
    SwitchProcess,
    check_pair,
    join_namespaces,
    pcap_frames,
    receiver_script,
    run_pair,
    sender_script,
)
from peers import require_guest, require_root
from pyvirtio.guest import UmlGuest, VhostUserDevice
from pyvirtio.spec import ids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TAP = "pvtap0"
VXLAN = "vxlan0"
VNI = 4242
UNDERLAY = ("192.168.77.1", "192.168.77.2")
GUEST_IPS = ("10.88.0.1", "10.88.0.2")
GUEST_MACS = ("02:70:79:78:00:01", "02:70:79:78:00:02")
# VXLAN adds 50 bytes: a 1600-byte link carries the guests' 1500-byte frames whole.
LINK_MTU = 1600


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    yield c
    c.run()


def vxlan_host(ns: Netns, switch_args: list[str], local: str, remote: str, link: str
               ) -> SwitchProcess:
    """One host of the recipe: the switch with its tap, a VXLAN device to the other host,
    a bridge joining the two."""
    switch = SwitchProcess([*switch_args, "--tap", TAP], netns=ns.name)
    for cmd in (
        ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
        ["ip", "link", "add", VXLAN, "type", "vxlan", "id", str(VNI), "local", local,
         "remote", remote, "dstport", "4789", "dev", link],
        ["ip", "link", "add", "br0", "type", "bridge"],
        ["ip", "link", "set", TAP, "master", "br0"],
        ["ip", "link", "set", VXLAN, "master", "br0"],
        ["ip", "link", "set", TAP, "up"],
        ["ip", "link", "set", VXLAN, "up"],
        ["ip", "link", "set", "br0", "up"],
    ):
        ns.run(*cmd)
    return switch


def counter(ns: Netns, ifname: str, name: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/{ifname}/statistics/{name}").stdout)


def test_guests_on_two_hosts_joined_by_vxlan_ping_and_stream_16_mib(
        tmp_path: Path, cleanup: Cleanup) -> None:
    require_guest("uml")
    require_root("network namespaces, taps, bridges and VXLAN devices")
    hosts = Netns("vxlan-a"), Netns("vxlan-b")
    for ns in hosts:
        cleanup.add(ns.delete)
    links = join_namespaces(*hosts, f"{UNDERLAY[0]}/24", f"{UNDERLAY[1]}/24", name="link",
                            mtu=LINK_MTU)
    socks = [str(tmp_path / f"host{i}.sock") for i in range(2)]
    switches = []
    for i, ns in enumerate(hosts):
        switch = vxlan_host(ns, ["--socket", socks[i], "--mac", GUEST_MACS[i], "--stats",
                                 "--pcap", str(tmp_path / f"host{i}-{{port}}.pcap")],
                            UNDERLAY[i], UNDERLAY[1 - i], links[i])
        cleanup.add(switch.close)
        switches.append(switch)

    run = run_pair(
        UmlGuest(sender_script(GUEST_IPS[0], GUEST_IPS[1]), timeout=180,
                 devices=[VhostUserDevice(socks[0], ids.NET)]),
        UmlGuest(receiver_script(GUEST_IPS[1], GUEST_IPS[0]), timeout=180,
                 devices=[VhostUserDevice(socks[1], ids.NET)]),
        GUEST_IPS[0], GUEST_IPS[1])
    check_pair(run, *switches)
    assert run.sender.results["mac"] == GUEST_MACS[0]
    assert run.receiver.results["mac"] == GUEST_MACS[1]

    # The stream crossed the hosts' link inside VXLAN: out of host 0's vxlan0, into host 1's.
    stream = PAYLOAD_MIB << 20
    assert counter(hosts[0], VXLAN, "tx_bytes") > stream
    assert counter(hosts[1], VXLAN, "rx_bytes") > stream
    assert counter(hosts[0], links[0], "tx_bytes") > stream  # encapsulated, on the wire

    # Each switch learned the other host's guest on its tap: the guests' unicast frames went
    # to the port the MAC was learned on instead of being flooded (a few broadcasts and
    # frames before the first answer are).
    for switch in switches:
        table = switch.stats()
        learned, flooded = (int(x) for x in re.findall(
            r"^learned (\d+) addresses, flooded (\d+) frames", switch.output(), re.M)[-1])
        guest_frames = int(table["vm0"]["tx_frames"])
        assert learned >= 2, (learned, table)
        assert flooded * 10 < guest_frames, (flooded, table)
        assert int(table[TAP]["tx_bytes"]) > 0 and int(table[TAP]["rx_bytes"]) > 0, table
        assert table[TAP]["errors"] == "0" and table["vm0"]["errors"] == "0", table
    for switch in switches:
        assert switch.stop() == 0, switch.tail()
    for i in range(2):
        remote_mac = bytes.fromhex(GUEST_MACS[1 - i].replace(":", ""))
        local_mac = bytes.fromhex(GUEST_MACS[i].replace(":", ""))
        frames = pcap_frames(tmp_path / f"host{i}-{TAP}.pcap")
        sources = {dpkt.ethernet.Ethernet(f).src for f in frames}
        # The remote guest's frames came in through the tap, the local guest's went out.
        assert remote_mac in sources, f"host {i}: no frame from the other host's guest"
        assert local_mac in sources, f"host {i}: no frame of its own guest on the tap"
