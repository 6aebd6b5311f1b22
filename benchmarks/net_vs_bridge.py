#!/usr/bin/env python3
"""virtio-net: two guests through pyvirtio's switch against two guests on a Linux bridge
(``make bench-net``).

Both paths carry TCP between two User-Mode Linux guests; the host's iperf3 runs in each
guest through hostfs (``host_run /usr/bin/iperf3``), ``--seconds`` long, one stream:

* pyvirtio: ``pyvirtio serve net`` with two sockets (one switch, one event loop, one
  Python process); each guest's ``virtio_net`` driver attaches over vhost-user. Frames go
  from one guest's transmit buffers to the other's receive buffers with one copy in Python;
  TSO frames (up to 64 KiB) pass whole.
* bridge: UML's own network transport on a tap (``--transport vector``:
  ``vec0:transport=tap,ifname=T,gro=1``, the multi-packet transport with offloads;
  ``tuntap``: ``eth0=tuntap,T``, the classic one), both taps on a Linux bridge. Everything
  lives in a network namespace the benchmark creates (taps, bridge) and deletes; the guests
  run inside it (``ip netns exec``) so they open their taps there.

Paths alternate (the order rotates every round) for ``--rounds`` rounds (default 5); the
summary shows min / median / max throughput of each and the ratio pyvirtio / X with the
range of its per-round values (``benchmarks/stats.py``: a range that straddles 1.0 is
"undecided"). ``--src LABEL=DIR`` adds the switch of another pyvirtio checkout as one more
path, to compare two versions of pyvirtio in the same rounds. The CPU time of the
pyvirtio server per round is shown too. The machine's load is printed before and after:
other work on the machine distorts every figure, so run it idle. No traffic leaves the
unix sockets and the benchmark's own namespace.

``--profile FILE`` runs the pyvirtio server under cProfile (slower: for finding hot spots,
not for the table), writes the stats to FILE and prints the top functions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from paths import ROOT  # before pyvirtio: puts the checkout's src/ on sys.path
from pyvirtio.guest import GuestResult, UmlGuest, VhostUserDevice
from pyvirtio.guest.image import Initramfs
from pyvirtio.spec import ids
from stats import Ratio, Spread

CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_IP, CLIENT_IP = "10.0.9.2", "10.0.9.1"


def guest_scripts(ifname: str, seconds: int) -> tuple[str, str]:
    """(iperf3 server script, iperf3 client script) for guests whose NIC is ``ifname``."""
    setup = f"ip link set lo up\nip link set {ifname} up\nip addr add {{ip}}/24 dev {ifname}\n"
    server = setup.format(ip=SERVER_IP) + f"""
host_mount
host_run /usr/bin/iperf3 -s -1 -B {SERVER_IP} > /tmp/iperf.log 2>&1 &
until netstat -ltn 2>/dev/null | grep -q ':5201 '; do usleep 50000; done
echo BENCH-SERVER-READY
wait
"""
    client = setup.format(ip=CLIENT_IP) + f"""
host_mount
i=0
until ping -c 1 -W 1 {SERVER_IP} >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -ge 60 ] && break
done
echo BENCH-CLIENT-READY
read go
host_run /usr/bin/iperf3 -c {SERVER_IP} -t {seconds} -f m > /tmp/out 2>&1
result iperf_status $?
result mbits $(awk '/receiver/ {{for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") \
    print $(i-1)}}' /tmp/out)
result retransmits $(awk '/sender/ {{print $(NF-1)}}' /tmp/out)
echo BENCH-DONE
read done
"""
    return server, client


class NetnsUmlGuest(UmlGuest):
    """A UML guest started inside network namespace ``netns`` (``ip netns exec`` execs the
    kernel, so the pid, session and cleanup are the guest's own)."""

    def __init__(self, script: str, *, netns: str, **kwargs: object) -> None:
        super().__init__(script, **kwargs)  # type: ignore[arg-type]
        self.netns = netns

    def _command(self, image: Initramfs, workdir: Path) -> tuple[list[str], dict[str, str]]:
        argv, env = super()._command(image, workdir)
        return ["ip", "netns", "exec", self.netns, *argv], env


@dataclass
class Sample:
    path: str
    mbits: float
    retransmits: str
    server_cpu_s: float | None  # the pyvirtio server's CPU time during the transfer


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_pair(server_guest: UmlGuest, client_guest: UmlGuest, path: str,
             cpu_pid: int | None) -> Sample:
    """Boot both guests; time one iperf3 run once both are up."""
    with server_guest, client_guest:
        server_guest.wait_for("BENCH-SERVER-READY", timeout=120)
        client_guest.wait_for("BENCH-CLIENT-READY", timeout=120)
        before = cpu_seconds(cpu_pid) if cpu_pid else None
        client_guest.write("go\n")
        client_guest.wait_for("BENCH-DONE", timeout=300)
        after = cpu_seconds(cpu_pid) if cpu_pid else None
        client_guest.write("done\n")
        result: GuestResult = client_guest.wait(timeout=60)
        server_guest.wait(timeout=30)
    if not result.ok or result.results.get("iperf_status") != "0":
        raise RuntimeError(f"{path}: iperf3 failed\n{result.describe()}")
    cpu = after - before if before is not None and after is not None else None
    return Sample(path, float(result.results["mbits"]), result.results.get("retransmits", "?"),
                  cpu)


class PyvirtioPath:
    """``pyvirtio serve net`` (or another ``command``: ``("join", "net")``) with two sockets,
    kept for every round (guests reconnect); from this checkout, or from the checkout
    ``src``."""

    def __init__(self, workdir: Path, profile: str | None, name: str = "pyvirtio",
                 src: Path = ROOT, extra: Sequence[str] = (),
                 command: Sequence[str] = ("serve", "net")) -> None:
        self.name = name
        self.socks = [str(workdir / f"{name}-vm{i}.sock") for i in range(2)]
        args = [*command, "-q", *(a for s in self.socks for a in ("--socket", s)), *extra]
        if profile:
            cmd = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "pyvirtio", *args]
        else:
            cmd = [sys.executable, "-m", "pyvirtio", *args]
        env = {**os.environ, "PYTHONPATH": str(src / "src")}
        self.log = open(workdir / f"serve-net-{name}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while not all(os.path.exists(s) for s in self.socks):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pyvirtio {' '.join(command)} did not start: "
                                   f"{self.log.name}")
            time.sleep(0.05)

    def guests(self, seconds: int) -> tuple[UmlGuest, UmlGuest]:
        server, client = guest_scripts("eth0", seconds)
        return (UmlGuest(server, timeout=600, devices=[VhostUserDevice(self.socks[1], ids.NET)]),
                UmlGuest(client, timeout=600, devices=[VhostUserDevice(self.socks[0], ids.NET)]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # cProfile writes its file on a clean exit
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class BridgePath:
    """Two persistent taps on a Linux bridge, in a namespace of our own."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.ns = f"pyvirtio-bench-{os.getpid()}-{secrets.token_hex(2)}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        try:
            self.taps = ["pvbtap0", "pvbtap1"]
            self._ns("ip", "link", "set", "lo", "up")
            self._ns("ip", "link", "add", "pvbr0", "type", "bridge")
            for tap in self.taps:
                self._ns("ip", "tuntap", "add", "dev", tap, "mode", "tap")
                self._ns("ip", "link", "set", tap, "master", "pvbr0")
                self._ns("ip", "link", "set", tap, "up")
            self._ns("ip", "link", "set", "pvbr0", "up")
        except BaseException:
            self.close()
            raise

    def _ns(self, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, *cmd], check=True)

    def guests(self, seconds: int) -> tuple[UmlGuest, UmlGuest]:
        if self.transport == "vector":
            ifname = "vec0"
            args = [f"vec0:transport=tap,ifname={tap},depth=128,gro=1" for tap in self.taps]
        else:
            ifname = "eth0"
            args = [f"eth0=tuntap,{tap}" for tap in self.taps]
        server, client = guest_scripts(ifname, seconds)
        return (NetnsUmlGuest(server, netns=self.ns, timeout=600, kernel_args=[args[1]]),
                NetnsUmlGuest(client, netns=self.ns, timeout=600, kernel_args=[args[0]]))

    def close(self) -> None:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True,
                             check=False).stdout
        for pid in out.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


@contextlib.contextmanager
def paths(workdir: Path, transport: str, profile: str | None, sources: dict[str, Path]
          ) -> Iterator[list[tuple[str, PyvirtioPath | BridgePath]]]:
    with contextlib.ExitStack() as stack:
        found: list[tuple[str, PyvirtioPath | BridgePath]] = []
        # pyvirtio offers the packed ring, which the UML guests take; pyvirtio-split is the
        # same switch with --no-packed (the ring format a --src checkout from before the
        # packed ring runs)
        ours: list[tuple[str, Path, tuple[str, ...]]] = [
            ("pyvirtio", ROOT, ()), ("pyvirtio-split", ROOT, ("--no-packed",))]
        for name, src, extra in [*ours, *((n, d, ()) for n, d in sources.items())]:
            path = PyvirtioPath(workdir, profile if name == "pyvirtio" else None, name, src,
                                extra)
            stack.callback(path.close)
            found.append((name, path))
        bridge = BridgePath(transport)
        stack.callback(bridge.close)
        found.insert(1, ("bridge", bridge))
        yield found


def print_profile(path: str, top: int = 25) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path (default 5)")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default 5)")
    parser.add_argument("--transport", choices=("vector", "tuntap"), default="vector",
                        help="UML's transport on the bridge's taps (default vector)")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the pyvirtio server under cProfile, stats to FILE")
    parser.add_argument("--src", action="append", default=[], metavar="LABEL=DIR",
                        help="one more path: the switch of the pyvirtio checkout DIR, named "
                        "LABEL (compare two versions in the same rounds; repeatable)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("net_vs_bridge: needs root (network namespace, taps, bridge)", file=sys.stderr)
        return 1
    sources = {label: Path(d).resolve() for label, d in
               (item.split("=", 1) for item in args.src)}
    print(f"load average before: {load()} ({os.cpu_count()} CPUs)", flush=True)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-net-") as tmp, \
            paths(Path(tmp), args.transport, args.profile, sources) as all_paths:
        for r in range(args.rounds):
            order = all_paths[r % len(all_paths):] + all_paths[:r % len(all_paths)]
            for name, path in order:
                server, client = path.guests(args.seconds)
                pid = path.proc.pid if isinstance(path, PyvirtioPath) else None
                s = run_pair(server, client, name, pid)
                samples.append(s)
                cpu = f", server CPU {s.server_cpu_s:.1f} s" if s.server_cpu_s is not None else ""
                print(f"round {r + 1} {name:8s} {s.mbits:8.0f} Mbit/s "
                      f"(retransmits {s.retransmits}{cpu})", flush=True)
        names = [name for name, _ in all_paths]
    print(f"load average after: {load()}")
    mbits = {name: [s.mbits for s in samples if s.path == name] for name in names}
    print(f"\n{args.rounds} rounds, {args.seconds} s iperf3, one TCP stream, UML <-> UML; "
          f"Mbit/s min / median / max:")
    labels = {"pyvirtio": "pyvirtio switch (vhost-user)",
              "pyvirtio-split": "pyvirtio switch, --no-packed",
              "bridge": f"Linux bridge ({args.transport} taps)"}
    for name in names:
        label = labels.get(name, f"pyvirtio switch from {name}")
        print(f"  {label:36s} {Spread.of(mbits[name]).show():>24}")
    for ours in ("pyvirtio", "pyvirtio-split"):
        for name in names:
            if name in ("pyvirtio", ours):
                continue
            ratio = Ratio.of(mbits[ours], mbits[name])
            print(f"  {'ratio ' + ours + ' / ' + name + ' [rounds]':36s} {ratio.show():>24} "
                  f"{ratio.verdict()}")
    if args.profile:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
