"""Real Linux guests joined by ``pyvirtio join`` (run as a child process, as a user would):
User-Mode Linux 6.1 guests whose virtio_net / virtio_console drivers reach each other through
the joiner over vhost-user, with no switch and no device model between their rings.

* net: the two guests ping each other and stream 16 MiB over TCP (busybox nc), sha256 equal;
  once with both sides offered the same features, once with received offloads withheld from
  the receiving side (a guest that refused GUEST_CSUM/GUEST_TSO4/6) while the sending guest
  took HOST_TSO4: its TSO frames must be segmented, with checksums completed, on the way.
* console: a shell in one guest is driven from the other through /dev/hvc0.
* hostile: one side is our own vhost-user front-end posting malformed chains (outside its
  memory, looping) and then disconnecting; the guest on the other side keeps working and
  reads exactly the bytes a later, well-behaved front-end sends, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.net import (
    JoinProcess,
    PairRun,
    check_guest_pair,
    receiver_script,
    run_pair,
    sender_script,
)
from peers import require_guest
from pyvirtio.driver import base as driver_base
from pyvirtio.driver.console import ConsoleDriver
from pyvirtio.guest import UmlGuest, VhostUserDevice
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.spec import console as C
from pyvirtio.spec import ids
from pyvirtio.spec import split as SP

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def uml_net_pair(workdir: Path) -> PairRun:
    return run_pair(
        UmlGuest(sender_script("10.0.0.1", "10.0.0.2"), timeout=180,
                 devices=[VhostUserDevice(str(workdir / "a.sock"), ids.NET)]),
        UmlGuest(receiver_script("10.0.0.2", "10.0.0.1"), timeout=180,
                 devices=[VhostUserDevice(str(workdir / "b.sock"), ids.NET)]),
        "10.0.0.1", "10.0.0.2")


@contextlib.contextmanager
def joiner(kind: str, workdir: Path, *extra: str) -> Iterator[JoinProcess]:
    proc = JoinProcess(kind, ["--socket", str(workdir / "a.sock"),
                              "--socket", str(workdir / "b.sock"), "--stats", *extra])
    try:
        yield proc
    finally:
        proc.close()


def join_log(proc: JoinProcess) -> str:
    """For a failure: every warning the join logged (what it saw of the guests' rings,
    lost notifications made up for) and its last lines."""
    warnings = [x for x in proc.output().splitlines() if "WARNING" in x or "served" in x]
    return ("\n--- join warnings ---\n" + "\n".join(warnings[-30:])
            + f"\n--- join log ---\n{proc.tail(20)}")


def negotiated(proc: JoinProcess, side: str) -> str:
    """The features the join logged for ``side``'s driver (the last negotiation)."""
    found = re.findall(rf"{side}: features (\S+)", proc.output())
    assert found, proc.tail(40)
    return found[-1]


def net_counters(proc: JoinProcess, side: str) -> dict[str, int]:
    """The newest ``--stats`` line of ``side`` as counters (tx_frames, rx_converted...)."""
    start = proc.mark()
    proc.wait_for(rf"^{side}: tx ", 5.0, start)
    line = [x for x in proc.output().splitlines() if x.startswith(f"{side}: tx ")][-1]
    m = re.match(rf"{side}: tx (\d+) frames (\d+) bytes \(errors (\d+), dropped (\d+)\), "
                 r"rx (\d+) frames (\d+) bytes \(dropped (\d+), converted (\d+), busy (\d+)\)",
                 line)
    assert m, line
    keys = ("tx_frames", "tx_bytes", "tx_errors", "tx_dropped", "rx_frames", "rx_bytes",
            "rx_dropped", "rx_converted", "rx_busy")
    return dict(zip(keys, map(int, m.groups()), strict=True))


def test_two_uml_guests_joined_over_virtio_net_ping_and_stream_16_mib(tmp_path: Path) -> None:
    require_guest("uml")
    with joiner("net", tmp_path) as proc:
        run = uml_net_pair(tmp_path)
        check_guest_pair(run, join_log(proc))
        for side in ("side0", "side1"):
            feats = negotiated(proc, side)
            assert "MRG_RXBUF" in feats and "HOST_TSO4" in feats and "GUEST_TSO4" in feats
        # Same features both sides: frames pass as they are (TSO frames whole), nothing
        # converted: side 1 received at most the frames side 0 sent.
        sent, got = net_counters(proc, "side0"), net_counters(proc, "side1")
        assert got["rx_bytes"] > 16 << 20 and got["rx_converted"] == 0
        assert got["rx_frames"] <= sent["tx_frames"]


def test_a_guest_that_took_tso_streams_to_one_that_refused_it(tmp_path: Path) -> None:
    require_guest("uml")
    with joiner("net", tmp_path, "--withhold", "1:guest_csum,guest_tso4,guest_tso6") as proc:
        run = uml_net_pair(tmp_path)  # side 0 sends, side 1 receives
        check_guest_pair(run, join_log(proc))
        sender, receiver = negotiated(proc, "side0"), negotiated(proc, "side1")
        assert "HOST_TSO4" in sender.split("|") and "CSUM" in sender.split("|")
        assert "GUEST_TSO4" not in receiver.split("|")
        assert "GUEST_CSUM" not in receiver.split("|")
        # The receiver got complete frames: checksums completed, and TSO frames segmented:
        # side 1 received more frames than side 0 sent.
        sent, got = net_counters(proc, "side0"), net_counters(proc, "side1")
        assert got["rx_converted"] > 0 and got["rx_bytes"] > 16 << 20
        assert got["rx_frames"] > sent["tx_frames"], (sent, got)


SHELL_GUEST = """\
hostname shellguest
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
exec 3<>/dev/hvc0
stty raw -echo <&3
echo SHELL-READY
read go
# Started only once the other guest's hvc0 is raw and silent: an interactive shell prints a
# prompt at once, which a tty still echoing would send straight back as input.
sh <&3 >&3 2>&3 &
shpid=$!
wait $shpid
result shell_exit $?
"""

DRIVER_GUEST = """\
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
exec 3<>/dev/hvc0
stty raw -echo <&3
cat <&3 > /tmp/out &
catpid=$!
echo DRIVER-WAITING
read go
printf 'echo JOINED-$((6 * 7)) $(cat /proc/sys/kernel/hostname); exit 3\\n' >&3
n=0
until grep -q JOINED-42 /tmp/out || [ $n -ge 200 ]; do sleep 0.1; n=$((n+1)); done
kill $catpid
result answer "$(grep JOINED-42 /tmp/out | tail -n 1 | tr -d '\\r')"
"""


def test_a_shell_in_one_guest_is_driven_from_the_other_through_hvc0(tmp_path: Path) -> None:
    require_guest("uml")
    with joiner("console", tmp_path) as proc:
        shell = UmlGuest(SHELL_GUEST, timeout=120,
                         devices=[VhostUserDevice(str(tmp_path / "a.sock"), ids.CONSOLE)])
        driver = UmlGuest(DRIVER_GUEST, timeout=120,
                          devices=[VhostUserDevice(str(tmp_path / "b.sock"), ids.CONSOLE)])
        with shell, driver:
            shell.wait_for("SHELL-READY", timeout=90)
            driver.wait_for("DRIVER-WAITING", timeout=90)
            shell.write("go\n")
            driver.write("go\n")
            r_driver = driver.wait(timeout=60)
            r_shell = shell.wait(timeout=60)
        log = f"\n--- join log ---\n{proc.tail(40)}"
        assert r_driver.ok and r_shell.ok, r_driver.describe() + r_shell.describe() + log
        # The answer was computed by the shell guest (its own hostname), and its shell ran
        # the command read from the other guest, then exited with the status it was given.
        assert r_driver.results["answer"] == "JOINED-42 shellguest", r_driver.tail() + log
        assert r_shell.results["shell_exit"] == "3", r_shell.tail() + log


# ---- a hostile side -------------------------------------------------------------------------

HOSTILE_BYTES = 200_000

RECEIVING_GUEST = f"""\
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
exec 3<>/dev/hvc0
stty raw -echo <&3
echo GUEST-READING
head -c {HOSTILE_BYTES} <&3 > /tmp/in
result in_bytes $(wc -c < /tmp/in)
result in_sha $(sha256sum /tmp/in | cut -d' ' -f1)
printf 'still-alive' >&3
sleep 30
"""


def post_looping_chain(drv: ConsoleDriver, client: VhostUserClient) -> None:
    """Make a transmit chain available whose descriptor's NEXT points at itself."""
    vq = drv.vqs[C.port_transmitq(0)]
    ring = vq.ring
    buf = client.allocator.alloc(64)
    head = 0
    client.memory.write(ring.desc_addr + head * SP.VRING_DESC_SIZE,
                        struct.pack("<QIHH", buf, 64, SP.VRING_DESC_F_NEXT, head))
    avail_idx_addr = ring.avail_addr + 2
    (idx,) = struct.unpack("<H", client.memory.read(avail_idx_addr, 2))
    client.memory.write(ring.avail_addr + 4 + 2 * (idx % ring.size), struct.pack("<H", head))
    client.memory.write(avail_idx_addr, struct.pack("<H", (idx + 1) & 0xFFFF))
    client.notify(vq.index)  # the driver's own kick logic does not know of this chain


def test_a_hostile_side_breaks_only_itself_and_the_guest_reads_only_copied_bytes(
        tmp_path: Path) -> None:
    require_guest("uml")
    # printable text: the guest's hvc0 is a tty (raw mode, but no control bytes to doubt)
    data = random.Random(14).randbytes(HOSTILE_BYTES // 2).hex().encode()
    with joiner("console", tmp_path) as proc:
        guest = UmlGuest(RECEIVING_GUEST, timeout=120,
                         devices=[VhostUserDevice(str(tmp_path / "a.sock"), ids.CONSOLE)])
        with guest:
            guest.wait_for("GUEST-READING", timeout=90)
            # 1: a transmit descriptor outside the front-end's memory.
            with contextlib.closing(VhostUserClient(str(tmp_path / "b.sock"), ids.CONSOLE,
                                                    memory_size=1 << 20)) as client:
                drv = driver_base.probe(client, ConsoleDriver)
                assert isinstance(drv, ConsoleDriver)
                tvq = drv.vqs[C.port_transmitq(0)]
                tvq.add_buf([(client.memory.size + (1 << 20), 4096)], [], token="outside")
                tvq.kick()
                proc.wait_for(r"side1 queue 1.*outside guest memory", 10)
            # 2: a looping chain, then the front-end disappears without a word.
            with contextlib.closing(VhostUserClient(str(tmp_path / "b.sock"), ids.CONSOLE,
                                                    memory_size=1 << 20)) as client:
                drv = driver_base.probe(client, ConsoleDriver)
                assert isinstance(drv, ConsoleDriver)
                post_looping_chain(drv, client)
                proc.wait_for(r"side1 queue 1.*a loop", 10)
            # 3: a well-behaved front-end sends the real bytes.
            with contextlib.closing(VhostUserClient(str(tmp_path / "b.sock"), ids.CONSOLE,
                                                    memory_size=4 << 20)) as client:
                drv = driver_base.probe(client, ConsoleDriver)
                assert isinstance(drv, ConsoleDriver)
                drv.write(0, data, timeout=60)
                answer = drv.read(0, len(b"still-alive"), timeout=60)
            guest.wait_for(r"in_sha", timeout=30)
            out = guest.stop()  # it lingers so that its answer is read before it goes
        log = f"\n--- join log ---\n{proc.tail(60)}"
        assert answer == b"still-alive", log
        assert out.results["in_bytes"] == str(HOSTILE_BYTES), out.tail() + log
        assert out.results["in_sha"] == hashlib.sha256(data).hexdigest(), out.tail() + log
