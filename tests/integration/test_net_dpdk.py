"""Our packed front-end on a foreign back-end: DPDK's vhost-user (testpmd's vhost PMD, C).

Two instances of our net driver, each behind our vhost-user front-end, are the two ports
of ``dpdk-testpmd --forward-mode=io``: what one sends, testpmd forwards to the other. DPDK
offers RING_PACKED (and IN_ORDER, and CTRL_VQ, whose queue it never serves); our driver
negotiates the packed ring and no control queue, and 10,000 frames of random sizes cross
intact and in order.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import require_binaries
from pyvirtio.driver.base import probe
from pyvirtio.driver.net import NetDriver
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.ring import PackedDriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import net as N

pytestmark = [pytest.mark.integration, pytest.mark.timeout(280)]

TESTPMD = "dpdk-testpmd"
STARTUP = 150.0  # seconds for testpmd to create its sockets (it maps 1 GiB without hugepages)
FRAMES = 10_000
BATCH = 32
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental
PROBE_ETHERTYPE = b"\x88\xb6"  # the other local experimental type: link probes, not counted
#: what our driver asks for: the packed ring, mergeable receive buffers, no control queue
WISH = (F.bit(F.VERSION_1) | F.bit(F.RING_PACKED) | F.bit(F.EVENT_IDX) | F.bit(F.IN_ORDER)
        | F.bit(F.INDIRECT_DESC) | F.bit(N.VIRTIO_NET_F_MRG_RXBUF))


class DpdkTestpmd:
    """dpdk-testpmd forwarding between two vhost-user server sockets; always stopped."""

    def __init__(self, tmp: Path) -> None:
        self.socks = [tmp / "vhost0.sock", tmp / "vhost1.sock"]
        self.prefix = f"pyvirtio-{os.getpid()}-{tmp.name}"
        self.log = tmp / "testpmd.log"
        args = [TESTPMD, "-l", "0,1", "--no-huge", "-m", "1024", "--no-pci",
                "--iova-mode=va", f"--file-prefix={self.prefix}",
                "--vdev", f"net_vhost0,iface={self.socks[0]},queues=1",
                "--vdev", f"net_vhost1,iface={self.socks[1]},queues=1",
                "--", "--forward-mode=io", "--nb-cores=1", "--no-numa",
                "--total-num-mbufs=16384"]
        with open(self.log, "wb") as log:
            # Non-interactive testpmd forwards at once and exits on a newline on stdin.
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP
        while not all(s.exists() for s in self.socks):
            if self.proc.poll() is not None:
                raise AssertionError(f"testpmd exited ({self.proc.returncode}):\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"testpmd made no sockets within {STARTUP} s:\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"\n")
                self.proc.stdin.close()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)


@pytest.fixture
def testpmd(tmp_path: Path) -> Iterator[DpdkTestpmd]:
    require_binaries(TESTPMD)
    t = DpdkTestpmd(tmp_path)
    try:
        t.wait_ready()
        yield t
    finally:
        t.stop()


def frame(dst: bytes, src: bytes, seq: int, rng: random.Random) -> bytes:
    size = rng.randrange(64, 1515)
    body = struct.pack(">I", seq) + rng.randbytes(size - 18)
    return dst + src + ETHERTYPE + body


def wait_until_forwarding(drivers: list[NetDriver], clients: list[VhostUserClient],
                          macs: list[bytes]) -> None:
    """Send probe frames each way until one crosses, then drain the stragglers.

    testpmd drops what arrives for a port whose queues it does not yet see enabled (its
    vring-state callbacks run on its own schedule after our front-end starts the rings),
    so frames sent in the first moments can vanish inside DPDK. The counted exchange
    starts once both directions forward.
    """
    for src in (0, 1):
        dst = 1 - src
        probe_frame = macs[dst] + macs[src] + PROBE_ETHERTYPE + bytes(50)
        deadline = time.monotonic() + 60
        while not any(bytes(f.data)[12:14] == PROBE_ETHERTYPE
                      for f in drivers[dst].recv_all()):
            assert time.monotonic() < deadline, f"testpmd never forwarded to port {dst}"
            drivers[src].send_many([probe_frame])
            clients[dst].wait(0.2)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 0.5:  # late probes must not reach the count
        for d, c in zip(drivers, clients, strict=True):
            if d.recv_all():
                quiet_since = time.monotonic()
            c.wait(0.05)


def test_two_packed_net_drivers_exchange_10000_frames_through_testpmd(
        testpmd: DpdkTestpmd) -> None:
    clients = [VhostUserClient(s, ids.NET, memory_size=32 << 20, timeout=10)
               for s in testpmd.socks]
    try:
        offered = clients[0].get_features()
        assert offered & F.bit(F.RING_PACKED) and offered & F.bit(N.VIRTIO_NET_F_CTRL_VQ)
        drivers = [probe(c, NetDriver, features=WISH) for c in clients]
        for c, d in zip(clients, drivers, strict=True):
            assert isinstance(d, NetDriver)
            assert c.acked_features & F.bit(F.RING_PACKED)
            assert c.acked_features & F.bit(F.IN_ORDER)  # DPDK offers it; our rings run it
            assert not c.acked_features & F.bit(N.VIRTIO_NET_F_CTRL_VQ)
            assert d.ctrl_vq is None
            assert all(type(vq.ring) is PackedDriverQueue for vq in d.rx_vqs + d.tx_vqs)
        macs = [bytes((2, 0, 0, 0, 0, 1)), bytes((2, 0, 0, 0, 0, 2))]
        wait_until_forwarding(drivers, clients, macs)
        rng = random.Random(11)
        sent: list[list[bytes]] = [[], []]
        received: list[list[bytes]] = [[], []]
        seq = 0
        while seq < FRAMES:
            src = (seq // BATCH) % 2  # batches alternate direction
            dst = 1 - src
            batch = [frame(macs[dst], macs[src], seq + i, rng)
                     for i in range(min(BATCH, FRAMES - seq))]
            seq += len(batch)
            drivers[src].send_many(batch)
            sent[dst] += batch
            deadline = time.monotonic() + 20
            while len(received[dst]) < len(sent[dst]):
                got = drivers[dst].recv_all()
                received[dst] += [bytes(f.data) for f in got]
                if not got:
                    assert time.monotonic() < deadline, (
                        f"frames lost: {len(sent[dst]) - len(received[dst])} of the batch "
                        f"ending at {seq} never reached port {dst}")
                    clients[dst].wait(0.1)
        for port in (0, 1):
            assert len(received[port]) == len(sent[port])
            assert received[port] == sent[port]  # intact and in order
        assert len(sent[0]) + len(sent[1]) == FRAMES
    finally:
        for c in clients:
            c.close()
