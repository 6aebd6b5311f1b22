"""pyvirtio's balloon with a real Linux guest: User-Mode Linux 6.1 and virtio_balloon.

The server is the real command line (``pyvirtio serve balloon``) and the target is changed
with the real client (``pyvirtio balloon CONTROL --target SIZE --wait``). What the host got
back is measured on the memory file UML itself sent over vhost-user: the server reports its
allocated blocks (``st_blocks``) in every control reply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.paths import SRC
from helpers.serve_process import ServeProcess
from peers import require_guest
from pyvirtio.guest import UmlGuest, VhostUserDevice
from pyvirtio.io.balloon_control import request
from pyvirtio.spec import ids
from pyvirtio.testing.guests import memory_pattern_md5, memory_pattern_shell

pytestmark = [pytest.mark.integration, pytest.mark.timeout(200)]

MIB = 1 << 20

# Guest helpers: fill /dev/shm/NAME with N MiB of a known stream (guest page cache), its
# md5, and /proc/meminfo.
TAG = "pyvirtio-balloon"
GUEST_LIB = memory_pattern_shell(TAG) + """\
meminfo() { awk -v k="$1:" '$1 == k {print $2 * 1024}' /proc/meminfo; }
"""


class BalloonRig:
    """One ``pyvirtio serve balloon`` child, its control socket, and one UML guest on it."""

    def __init__(self, tmp: Path, serve_args: list[str]) -> None:
        self.sock, self.control = tmp / "balloon.sock", tmp / "balloon.ctl"
        self.server = ServeProcess("balloon", ["--socket", str(self.sock), "--control",
                                               str(self.control), *serve_args],
                                   log_path=tmp / "serve.log", global_args=["-v"])
        self.guest: UmlGuest | None = None

    def boot(self, script: str) -> UmlGuest:
        self.server.wait_for("Change the target")
        self.guest = UmlGuest(GUEST_LIB + script, mem="256M", timeout=150,
                              devices=[VhostUserDevice(str(self.sock), ids.BALLOON)])
        return self.guest.start()

    def cli(self, *args: str) -> tuple[int, dict[str, Any], str]:
        """``pyvirtio balloon CONTROL ARGS --json``: (exit status, reply, stderr)."""
        proc = subprocess.run(
            [sys.executable, "-m", "pyvirtio", "balloon", str(self.control), *args, "--json"],
            capture_output=True, text=True, timeout=90,
            env={**os.environ, "PYTHONPATH": SRC})
        reply = json.loads(proc.stdout) if proc.stdout.strip() else {}
        return proc.returncode, reply, proc.stderr

    def fresh_stats(self) -> dict[str, Any]:
        """The device's figures after the guest answered a new stats request."""
        asked = time.monotonic()
        request(str(self.control), "stats")  # gives the guest its stats buffer back
        # fresh: the guest's answer is younger than our request (a load-proof test: no
        # fixed age bound, a busy machine may take a while to answer)
        wait_until("fresh guest statistics", lambda: (
            (age := request(str(self.control), "stats")["stats_age"]) is not None
            and age < time.monotonic() - asked), 30)
        return request(str(self.control), "stats")

    def close(self) -> None:
        if self.guest is not None:
            self.guest.kill()
        self.server.close()


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BalloonRig]:
    r = BalloonRig(tmp_path, list(request.param))
    try:
        yield r
    finally:
        r.close()


def wait_until(what: str, cond: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``cond()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - start


def close_to(a: int, b: int, rel: float) -> bool:
    return abs(a - b) <= rel * max(a, b)


@pytest.mark.parametrize("rig", [["--no-reporting", "--stats"]], indirect=True)
def test_a_uml_guest_inflates_to_the_target_and_the_host_gets_the_pages_back(
        rig: BalloonRig) -> None:
    require_guest("uml")
    status, reply, err = rig.cli("--stats")
    assert status == 3 and "no guest is attached" in err and reply["attached"] is False
    guest = rig.boot("""
fill touch 200; rm /dev/shm/touch
echo BALLOON-TOUCHED; read line
echo BALLOON-MEMINFO $(meminfo MemFree) $(meminfo MemAvailable) $(meminfo MemTotal)
read line
fill big 150; echo BALLOON-MD5 $(digest big)
printf X | dd of=/dev/shm/big bs=1 seek=99999999 conv=notrunc 2>/dev/null
echo BALLOON-SPOILED $(digest big)
""")
    guest.wait_for("BALLOON-TOUCHED", 60)
    before = request(str(rig.control), "stats")
    # The guest touched 200 MiB (and freed it: without free page reporting, the host keeps
    # those pages until the balloon takes them).
    assert before["host_allocated"] >= 200 * MIB

    start = time.monotonic()
    status, inflated, err = rig.cli("--target", "192M", "--wait", "60")
    seconds = time.monotonic() - start
    assert status == 0, err
    assert inflated["target"] == inflated["actual"] == 192 * MIB
    reclaimed = before["host_allocated"] - inflated["host_allocated"]
    print(f"inflate to 192 MiB: {seconds:.2f} s (client included); host memory of the guest "
          f"{before['host_allocated'] / MIB:.1f} -> {inflated['host_allocated'] / MIB:.1f} MiB, "
          f"{reclaimed / MIB:.1f} MiB reclaimed")
    assert reclaimed >= 180 * MIB
    assert inflated["discarded"] == 192 * MIB
    # The live view (--stats) printed the same figures.
    rig.server.wait_for(r"^target 192\.0 MiB  actual 192\.0 MiB  reclaimed 192\.0 MiB  host "
                        r"[\d.]+ MiB  guest free [\d.]+ avail [\d.]+ swap in/out \d+/\d+ "
                        r"majflt \d+$", timeout=10)

    # The guest's statistics against its own /proc/meminfo, taken at rest.
    stats = rig.fresh_stats()["stats"]
    guest.write("go\n")
    free, avail, total = map(int, guest.wait_for(r"BALLOON-MEMINFO (\d+) (\d+) (\d+)",
                                                 30).groups())
    assert close_to(stats["free"], free, 0.05), (stats, free)
    assert close_to(stats["available"], avail, 0.05), (stats, avail)
    assert close_to(stats["total"], total, 0.05), (stats, total)

    start = time.monotonic()
    status, deflated, err = rig.cli("--target", "0", "--wait", "60")
    print(f"deflate to 0: {time.monotonic() - start:.2f} s")
    assert status == 0, err
    assert deflated["actual"] == 0 and deflated["balloon_pages"] == 0
    guest.write("go\n")
    expected = memory_pattern_md5(TAG, "big", 150)
    assert guest.wait_for(r"BALLOON-MD5 (\w+)", 90).group(1) == expected
    # and the check is not blind: one byte changed in the middle of the file is seen
    assert guest.wait_for(r"BALLOON-SPOILED (\w+)", 30).group(1) != expected
    result = guest.wait(60)
    assert result.ok, result.describe()
    assert request(str(rig.control), "stats")["problems"] == 0


@pytest.mark.parametrize("rig", [[]], indirect=True)
def test_a_uml_guest_reports_freed_memory_and_the_host_takes_it_without_a_target_change(
        rig: BalloonRig) -> None:
    require_guest("uml")
    guest = rig.boot("""
sleep 3
fill held 100; echo BALLOON-FILLED; read line
rm /dev/shm/held; echo BALLOON-FREED; read line
""")
    guest.wait_for("BALLOON-FILLED", 60)
    before = request(str(rig.control), "stats")
    guest.write("go\n")
    guest.wait_for("BALLOON-FREED", 30)
    seconds = wait_until(
        "host memory dropping by 80 MiB",
        lambda: before["host_allocated"] - request(str(rig.control), "stats")["host_allocated"]
        >= 80 * MIB, 10)
    after = request(str(rig.control), "stats")
    print(f"free page reporting: {(before['host_allocated'] - after['host_allocated']) / MIB:.1f}"
          f" MiB back {seconds:.1f} s after the guest freed 100 MiB")
    assert after["target"] == 0 and after["actual"] == 0
    assert after["reported"] - before["reported"] >= 80 * MIB
    guest.write("go\n")
    result = guest.wait(60)
    assert result.ok, result.describe()
    assert after["problems"] == 0
