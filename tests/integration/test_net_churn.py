"""Guest churn on the switch (issue 9): four UML guests on one ``pyvirtio serve net``; two
keep an iperf3 stream running while a third is killed (SIGKILL, a crash: its vhost-user
connection just drops) and restarted ten times, and the fourth stays up. The stream never
stops for a second, and the switch ends with the memory and fd count it had after the first
round.

The gap is measured by iperf3 itself: the client reports every 0.25 s (``--forceflush``
streams the lines to the console), and four zero-byte intervals in a row would be a second
without data. The fd count must be equal; RSS may differ by at most RSS_SLACK (CPython's
allocator keeps freed arenas, and the log lines of ten connections pass through buffers),
a leak of a connection's mappings or buffers per round would exceed it.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.net import SwitchProcess, net_setup, ping_until
from peers import require_guest
from pyvirtio.guest import UmlGuest, VhostUserDevice
from pyvirtio.spec import ids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(290)]

ROUNDS = 10
INTERVAL = 0.25
RSS_SLACK = 2 << 20

SERVER = net_setup("10.0.0.1") + """
host_run /usr/bin/iperf3 -s > /dev/null 2>&1 &
until netstat -ltn 2>/dev/null | grep -q ':5201 '; do usleep 50000; done
echo IPERF-LISTENING
read go
"""

CLIENT = net_setup("10.0.0.2") + ping_until("10.0.0.1") + f"""
host_run /usr/bin/iperf3 -c 10.0.0.1 -t 900 -i {INTERVAL} --forceflush &
read go
"""


def bystander(ip: str) -> str:
    return net_setup(ip) + ping_until("10.0.0.1") + "echo GUEST-UP\nread go\n"


INTERVAL_LINE = re.compile(r"^\[\s*\d+\]\s+([\d.]+)-([\d.]+)\s+sec\s+([\d.]+)\s+([KMG]?)Bytes",
                           re.M)


def intervals(console: str) -> list[tuple[float, float, float]]:
    """(start, end, bytes) of every per-interval report (not the final summary)."""
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    out = []
    for m in INTERVAL_LINE.finditer(console):
        start, end = float(m.group(1)), float(m.group(2))
        if end - start <= INTERVAL * 1.5:
            out.append((start, end, float(m.group(3)) * scale[m.group(4)]))
    return out


def longest_stall(reports: list[tuple[float, float, float]]) -> float:
    """The longest run of consecutive zero-byte intervals, in seconds."""
    longest = run = 0.0
    for start, end, nbytes in reports:
        run = run + (end - start) if nbytes == 0 else 0.0
        longest = max(longest, run)
    return longest


def footprint(pid: int) -> tuple[int, int]:
    """(RSS in bytes, open fds) of process ``pid``, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) << 10  # type: ignore[union-attr]
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[tuple[SwitchProcess, list[str]]]:
    require_guest("uml")
    socks = [str(tmp_path / f"vm{i}.sock") for i in range(4)]
    proc = SwitchProcess([a for s in socks for a in ("--socket", s)])
    try:
        yield proc, socks
    finally:
        proc.close()


def test_a_guest_restarted_ten_times_neither_stalls_a_stream_nor_leaks(
        switch: tuple[SwitchProcess, list[str]]) -> None:
    proc, socks = switch
    rng = random.Random()

    def guest(script: str, i: int) -> UmlGuest:
        return UmlGuest(script, timeout=280, devices=[VhostUserDevice(socks[i], ids.NET)])

    server, client, idle = guest(SERVER, 0), guest(CLIENT, 1), guest(bystander("10.0.0.4"), 3)
    churned: list[UmlGuest] = []
    try:
        server.start()
        idle.start()
        server.wait_for("IPERF-LISTENING", timeout=120)
        client.start()
        client.wait_for(r"^\[\s*\d+\]\s+0\.00-", timeout=120)  # the stream runs
        idle.wait_for("GUEST-UP", timeout=120)
        first: tuple[int, int] | None = None
        for round_ in range(ROUNDS):
            churn = guest(bystander("10.0.0.3"), 2)
            churned.append(churn)
            churn.start()
            churn.wait_for("GUEST-UP", timeout=120)
            if round_ == 1:  # the first restart has connected: the baseline
                first = footprint(proc.pid)
            time.sleep(rng.uniform(0, 1.0))  # pinging or idle: crash it anywhere
            churn.kill()
            churn.stop()
        last_churn = guest(bystander("10.0.0.3"), 2)
        churned.append(last_churn)
        last_churn.start()
        last_churn.wait_for("GUEST-UP", timeout=120)
        last = footprint(proc.pid)
        time.sleep(2.0)  # a few more reports with the last guest connected
    finally:
        for g in (*churned, client, idle, server):
            if g.pid is not None:
                g.stop()
    reports = intervals(client.console)
    stall = longest_stall(reports)
    moved = sum(n for _, _, n in reports)
    assert first is not None
    made_up = [line for line in proc.output().splitlines()
               if "without a kick" in line or "interrupted again" in line]
    print(f"churn: {ROUNDS} restarts; iperf3 {len(reports)} intervals, {moved / 2**20:.0f} MiB, "
          f"longest stall {stall:.2f} s; switch rss/fds after round 1 {first}, at the end "
          f"{last}; queues the watch moved on: {len(made_up)}", *made_up[:5], sep="\n")
    assert reports and moved > 0, client.console[-3000:]
    assert stall < 1.0, (f"the stream stopped for {stall} s\n--- client ---\n"
                         f"{client.console[-2500:]}\n--- switch ---\n{proc.tail(80)}")
    assert last[1] == first[1], f"fd count {first[1]} -> {last[1]}"
    assert abs(last[0] - first[0]) <= RSS_SLACK, f"RSS {first[0]} -> {last[0]}"
