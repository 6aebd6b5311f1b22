"""Hostile front-ends on a switch port must cost real guests on the other ports nothing.

One ``pyvirtio serve net`` process with five ports: two UML guests (vm0, vm1) ping each
other the whole time while three hostile front-ends (our vhost-user client, descriptors
placed by hand) attack the others:

* vm2 transmits a chain shorter than the virtio-net header, a frame larger than any
  Ethernet frame, then a descriptor pointing outside its own guest memory;
* vm3 never posts a receive buffer while vm2 floods it with frames (its queue in the
  switch is bounded: ``--queue-frames``);
* vm4 posts receive buffers too small for the frames sent to it (the UML guest vm0 pings
  an address whose MAC is vm4's, and vm2 sends it big frames), and buffers too small for
  even a header.

Then: the guests lost no ping, the drops and errors are counted on the right ports, vm2's
device asks for a reset naming the bad descriptor, no receive buffer came back with a used
length beyond the bytes written into it, and the server is still up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.net import (
    CANARY,
    Cleanup,
    RawNetFrontend,
    SwitchProcess,
    eth_frame,
    net_setup,
    ping_until,
)
from peers import require_guest
from pyvirtio.device.net.endpoint import format_mac
from pyvirtio.guest import UmlGuest, VhostUserDevice
from pyvirtio.spec import ids
from pyvirtio.spec import net as N
from pyvirtio.spec import status as S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BASE_MAC = "02:70:79:76:10:01"
QUEUE_FRAMES = 16
FLOOD = 64
BROADCAST = b"\xff" * 6
A_IP, B_IP, TINY_IP = "10.0.1.1", "10.0.1.2", "10.0.1.99"
TINY_BAD, TINY_SMALL = 20, 64  # receive buffer sizes: below header + Ethernet header; small


def mac(i: int) -> bytes:
    return (int(BASE_MAC.replace(":", ""), 16) + i).to_bytes(6, "big")


def guest_script(ip: str, peer: str, extra: str = "") -> str:
    """Ping the peer continuously from "go" to "stop" (console), then 3 more times."""
    return net_setup(ip) + ping_until(peer) + extra + f"""
echo NET-WAITING-FOR-GO
read go
ping -i 0.1 -W 5 {peer} &
pp=$!
read stop
kill -INT $pp
wait $pp
ping -c 3 -W 5 {peer}
result final_ping $?
"""


# A also sends echo requests (98-byte frames) to an address whose MAC is vm4's (busybox ip
# cannot add neighbours; arp can): vm4's 64-byte receive buffers cannot hold them.
TINY_PINGS = f"""
arp -s {TINY_IP} {format_mac(mac(4))}
ping -i 0.2 {TINY_IP} >/dev/null 2>&1 &
"""


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    yield c
    c.run()


def ping_totals(guest: UmlGuest) -> tuple[int, int]:
    m = guest.wait_for(r"(\d+) packets transmitted, (\d+) packets received", timeout=30)
    return int(m.group(1)), int(m.group(2))


def test_hostile_front_ends_are_contained_while_guests_keep_pinging(
        tmp_path: Path, cleanup: Cleanup) -> None:
    require_guest("uml")
    socks = [str(tmp_path / f"vm{i}.sock") for i in range(5)]
    server = SwitchProcess([*(a for s in socks for a in ("--socket", s)), "--mac", BASE_MAC,
                            "--queue-frames", str(QUEUE_FRAMES), "--stats"])
    cleanup.add(server.close)

    a = UmlGuest(guest_script(A_IP, B_IP, TINY_PINGS), timeout=120,
                 devices=[VhostUserDevice(socks[0], ids.NET)])
    b = UmlGuest(guest_script(B_IP, A_IP), timeout=120,
                 devices=[VhostUserDevice(socks[1], ids.NET)])
    a.start()
    cleanup.add(a.stop)
    b.start()
    cleanup.add(b.stop)

    evil, mute, tiny = (RawNetFrontend(socks[i]) for i in (2, 3, 4))
    for fe in (evil, mute, tiny):
        cleanup.add(fe.close)
    assert [evil.mac, mute.mac, tiny.mac] == [mac(2), mac(3), mac(4)]
    tiny.post_rx([TINY_BAD] * 4 + [TINY_SMALL] * 32)
    # Each announces itself once so that the switch learns where its MAC is.
    for fe in (mute, tiny):
        assert fe.send(eth_frame(BROADCAST, fe.mac, 16)) == 0

    for g in (a, b):
        g.wait_for("NET-WAITING-FOR-GO", timeout=90)
    for g in (a, b):
        g.write("go\n")
    for g in (a, b):
        g.wait_for(r"bytes from", timeout=30)  # the pings flow; now attack

    # vm3 never posts receive buffers: vm2 floods it.
    for i in range(FLOOD):
        evil.send(eth_frame(mute.mac, evil.mac, 60, fill=i))
    # vm4's buffers are too small for these, but fit these.
    big = [eth_frame(tiny.mac, evil.mac, 1000, fill=i) for i in range(8)]
    small = [eth_frame(tiny.mac, evil.mac, 30, fill=0x80 + i) for i in range(4)]
    for frame in big + small:
        evil.send(frame)
    # Malformed transmit chains: each comes back used (length 0) and is counted.
    assert evil.send_raw(b"\0" * 6) == 0  # shorter than the 12-byte header
    assert evil.send_raw(bytes(N.NET_HDR_SIZE) + eth_frame(mute.mac, evil.mac, 70000)) == 0
    start = server.mark()
    # A descriptor outside the front-end's guest memory breaks that queue, nothing else.
    bad_addr = evil.memory_size + 0x1000
    evil.send_sgs([(bad_addr, 64)], wait=False)
    problem = server.wait_for(r"port vm2: device needs reset: (.*)", start=start).group(1)
    assert f"0x{bad_addr:x}" in problem and "outside guest memory" in problem, problem
    assert evil.status() & S.DEVICE_NEEDS_RESET

    stats = server.stats()
    for g in (a, b):
        # Pings kept flowing through the attack: let each guest get a few more replies
        # (however quickly the attack itself went) before stopping them.
        g.wait_for(r"bytes from .*seq=5 ", timeout=30)
    for g in (a, b):
        g.write("stop\n")
    totals = [ping_totals(g) for g in (a, b)]
    results = [g.wait(timeout=60) for g in (a, b)]

    # The guests kept talking through all of it.
    for (sent, received), r in zip(totals, results, strict=True):
        assert r.ok, r.describe()
        assert r.results["final_ping"] == "0", r.tail()
        assert sent >= 5 and received >= sent - 1, (sent, received, r.tail())
    for port in ("vm0", "vm1"):
        assert stats[port]["drops"] == "0" and stats[port]["errors"] == "0", stats
    # Every abuse was counted on its own port.
    assert int(stats["vm2"]["errors"]) == 2, stats  # the short header and the giant frame
    assert stats["vm2"]["state"] == "needs-reset"
    assert stats["vm3"]["queued"] == str(QUEUE_FRAMES)
    assert int(stats["vm3"]["drops"]) >= FLOOD - QUEUE_FRAMES, stats
    assert int(stats["vm4"]["drops"]) >= len(big) + 1, stats  # + at least one of A's pings
    assert int(stats["vm4"]["errors"]) == 4, stats  # the 4 buffers too small for a header

    # No receive buffer was reported with more bytes than were written into it: past the
    # used length the canary is intact, and each used length is exactly one whole frame.
    hl = N.NET_HDR_SIZE
    delivered = []
    hello = eth_frame(BROADCAST, mute.mac, 16)
    for addr, length in tiny.used_rx():
        size = tiny.rx_posted[addr]
        raw = tiny.memory.read(addr, size)
        assert length <= size
        assert raw[length:] == bytes([CANARY]) * (size - length), "written past used length"
        if size == TINY_BAD:
            assert length == 0  # cannot hold a header: returned empty
            continue
        assert raw[:hl] == bytes(10) + b"\x01\x00"  # no offloads; num_buffers 1
        frame = bytes(raw[hl:length])
        # Besides ours, only the guests' ARP broadcasts (42 bytes) are small enough.
        assert frame in small or frame == hello or (frame[12:14] == b"\x08\x06"
                                                    and len(frame) == 42), frame.hex()
        delivered.append(frame)
    assert [f for f in delivered if f in small] == small

    # The switch is still up, and vm2's port serves the next front-end afresh.
    evil.close()
    start = server.mark()
    again = RawNetFrontend(socks[2])
    cleanup.add(again.close)
    assert not again.status() & S.DEVICE_NEEDS_RESET
    assert again.send(eth_frame(BROADCAST, again.mac, 60)) == 0
    server.wait_for(r"port vm2: guest driver ready", start=start)
    assert server.stop() == 0, server.tail()
