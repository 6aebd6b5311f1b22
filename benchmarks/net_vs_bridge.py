#!/usr/bin/env python3
"""virtio-net: pyvirtio's switch against the Linux bridge (User-Mode Linux guests) and
against DPDK's vhost-user PMD in testpmd (QEMU guests) (``make bench-net``).

Every path carries TCP between two guests; the host's iperf3 runs in each guest (UML:
through hostfs, ``host_run``; QEMU: copied into its initramfs), ``--seconds`` long, in four
cells: one stream and ``-P 4``, each from the client guest to the server guest and back
(``-R``). A path's two guests stay booted for all four cells of a round.

* pyvirtio: ``pyvirtio serve net`` with two sockets (one switch, one event loop, one
  Python process); each UML guest's ``virtio_net`` driver attaches over vhost-user. Frames
  go from one guest's transmit buffers to the other's receive buffers with one copy in
  Python; TSO frames (up to 64 KiB) pass whole. ``pyvirtio-split``: the same with
  ``--no-packed``.
* bridge: UML's own network transport on a tap (``--transport vector``:
  ``vec0:transport=tap,ifname=T,gro=1``, the multi-packet transport with offloads;
  ``tuntap``: ``eth0=tuntap,T``, the classic one), both taps on a Linux bridge. Everything
  lives in a network namespace the benchmark creates (taps, bridge) and deletes; the guests
  run inside it (``ip netns exec``) so they open their taps there.
* testpmd: ``dpdk-testpmd`` (C; ``--no-huge``, ``--forward-mode=io`` between its two
  ``net_vhost`` ports, one polling forwarding core) with two QEMU guests. QEMU guests,
  because testpmd offers CTRL_VQ and never serves the control queue: a UML guest hands its
  control queue to the back-end and hangs in its first control command, while QEMU keeps
  the control queue to itself (docs/peers.md). testpmd polls a whole core even when idle,
  so it is stopped (SIGSTOP) outside its own turns and continued (SIGCONT) for them.
* pyvirtio-qemu: pyvirtio's switch with the same QEMU guests, in the same rounds: the
  comparison with testpmd.

Paths alternate (the order rotates every round) for ``--rounds`` rounds (default 5); the
summary shows min / median / max throughput per cell and path, the back-end's CPU seconds
per Gbit carried (the pyvirtio server, or testpmd; the bridge's work is the kernel's and is
not attributed), and the ratio pyvirtio / X with the range of its per-round values
(``benchmarks/stats.py``: a range that straddles 1.0 is "undecided"). ``--src LABEL=DIR``
adds the switch of another pyvirtio checkout (UML guests) as one more path. Resident
memory of the pyvirtio server and testpmd (started, two guests attached, under load) is
printed too. The load average is printed before and after: run it on an idle machine. No
traffic leaves the unix sockets and the benchmark's own namespace.

``--profile FILE`` runs the pyvirtio server (UML path) under cProfile (slower: for
finding hot spots, not for the table), writes the stats to FILE and prints the top
functions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from paths import ROOT  # before pyvirtio: puts the checkout's src/ on sys.path
from procstat import cpu_seconds, load, rss_kib
from pyvirtio.guest import Guest, QemuGuest, UmlGuest, VhostUserDevice, VhostUserNet
from pyvirtio.guest.image import Initramfs, host_program
from pyvirtio.spec import ids
from stats import Ratio, Spread

SERVER_IP, CLIENT_IP = "10.0.9.2", "10.0.9.1"
IPERF = "/usr/bin/iperf3"
#: the cells of a round: (parallel streams, reverse direction)
CELLS = [(1, False), (4, False), (1, True), (4, True)]
MACS = ["02:70:79:76:00:01", "02:70:79:76:00:02"]
TESTPMD = "dpdk-testpmd"


def guest_scripts(ifname: str, seconds: int, uml: bool) -> tuple[str, str]:
    """(iperf3 server script, iperf3 client script) for guests whose NIC is ``ifname``;
    ``uml``: iperf3 runs from the host through hostfs, else from the initramfs. The client
    runs one iperf3 per console line ``STREAMS [-R]`` until ``quit``; the server serves
    until ``quit``."""
    run = f"host_run {IPERF}" if uml else IPERF
    mount = "host_mount\n" if uml else ""
    setup = f"ip link set lo up\nip link set {ifname} up\nip addr add {{ip}}/24 dev {ifname}\n"
    server = setup.format(ip=SERVER_IP) + mount + f"""
{run} -s -B {SERVER_IP} > /tmp/iperf.log 2>&1 &
iperf=$!
until netstat -ltn 2>/dev/null | grep -q ':5201 '; do usleep 50000; done
echo BENCH-SERVER-READY
read quit
kill $iperf 2>/dev/null
"""
    client = setup.format(ip=CLIENT_IP) + mount + f"""
i=0
until ping -c 1 -W 1 {SERVER_IP} >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -ge 60 ] && break
done
echo BENCH-CLIENT-READY
while read streams reverse; do
    [ "$streams" = quit ] && break
    {run} -c {SERVER_IP} -t {seconds} -P $streams $reverse -f m > /tmp/out 2>&1
    status=$?
    mbits=$(awk '/receiver/ {{for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") v = $(i-1)}}
                END {{print v + 0}}' /tmp/out)
    retr=$(awk '/sender/ {{v = $(NF-1)}} END {{print v + 0}}' /tmp/out)
    echo "BENCH-RESULT $streams $status $mbits $retr"
done
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
    streams: int
    reverse: bool
    mbits: float
    retransmits: str
    backend_cpu_s: float | None  # the back-end process's CPU time during the transfer
    seconds: int

    @property
    def cpu_per_gbit(self) -> float:
        """Back-end CPU seconds per Gbit carried."""
        if self.backend_cpu_s is None or not self.mbits:
            return float("nan")
        return self.backend_cpu_s / (self.mbits * self.seconds / 1000)


def cell_name(streams: int, reverse: bool) -> str:
    return f"{streams} stream{'s' if streams > 1 else ''} {'<-' if reverse else '->'}"


@dataclass
class Memory:
    """Resident memory of a back-end process in one round, KiB."""

    path: str
    started: int
    attached: int = 0
    loaded: int = 0


def run_round(server_guest: Guest, client_guest: Guest, path: str, cpu_pid: int | None,
              seconds: int, memory: Memory | None) -> list[Sample]:
    """Boot both guests; run every cell once both are up."""
    samples = []
    with server_guest, client_guest:
        server_guest.wait_for("BENCH-SERVER-READY", timeout=300)
        client_guest.wait_for("BENCH-CLIENT-READY", timeout=300)
        if memory is not None and cpu_pid:
            memory.attached = rss_kib(cpu_pid)
        for streams, reverse in CELLS:
            before = cpu_seconds(cpu_pid) if cpu_pid else None
            client_guest.write(f"{streams} {'-R' if reverse else ''}\n")
            m = client_guest.wait_for(rf"BENCH-RESULT {streams} (\d+) (\S+) (\S+)",
                                      timeout=seconds + 120)
            after = cpu_seconds(cpu_pid) if cpu_pid else None
            if memory is not None and cpu_pid:
                memory.loaded = max(memory.loaded, rss_kib(cpu_pid))
            if m.group(1) != "0":
                raise RuntimeError(f"{path}: iperf3 -P {streams} failed (status {m.group(1)})")
            cpu = after - before if before is not None and after is not None else None
            sample = Sample(path, streams, reverse, float(m.group(2)), m.group(3), cpu,
                            seconds)
            samples.append(sample)
            show = f", back-end CPU {cpu:.1f} s" if cpu is not None else ""
            print(f"  {path:14s} {cell_name(streams, reverse):12s} {sample.mbits:8.0f} "
                  f"Mbit/s (retransmits {sample.retransmits}{show})", flush=True)
        client_guest.write("quit\n")
        server_guest.write("quit\n")
        client_guest.wait(timeout=60)
        server_guest.wait(timeout=60)
    return samples


def qemu_guests(socks: Sequence[str], seconds: int) -> tuple[Guest, Guest]:
    """(server, client) QEMU guests on the vhost-user sockets ``socks[1]``, ``socks[0]``
    (with the MACs pyvirtio's switch gives those ports), iperf3 in their initramfs."""
    server, client = guest_scripts("eth0", seconds, uml=False)
    files = host_program(IPERF)
    return (QemuGuest(server, timeout=900, extra_files=files,
                      devices=[VhostUserNet(socks[1], mac=MACS[1])]),
            QemuGuest(client, timeout=900, extra_files=files,
                      devices=[VhostUserNet(socks[0], mac=MACS[0])]))


class PyvirtioPath:
    """``pyvirtio serve net`` (or another ``command``: ``("join", "net")``) with two sockets,
    kept for every round (guests reconnect); from this checkout, or from the checkout
    ``src``; UML guests, or QEMU ones (``qemu``)."""

    def __init__(self, workdir: Path, profile: str | None, name: str = "pyvirtio",
                 src: Path = ROOT, extra: Sequence[str] = (), qemu: bool = False,
                 command: Sequence[str] = ("serve", "net")) -> None:
        self.name = name
        self.qemu = qemu
        self.socks = [str(workdir / f"{name}-vm{i}.sock") for i in range(2)]
        args = [*command, "-q", *(a for s in self.socks for a in ("--socket", s)),
                *(a for m in MACS for a in ("--mac", m)), *extra]
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
        self.pid = self.proc.pid

    def guests(self, seconds: int) -> tuple[Guest, Guest]:
        if self.qemu:
            return qemu_guests(self.socks, seconds)
        server, client = guest_scripts("eth0", seconds, uml=True)
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

    pid = None

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
        server, client = guest_scripts(ifname, seconds, uml=True)
        return (NetnsUmlGuest(server, netns=self.ns, timeout=600, kernel_args=[args[1]]),
                NetnsUmlGuest(client, netns=self.ns, timeout=600, kernel_args=[args[0]]))

    def close(self) -> None:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True,
                             check=False).stdout
        for pid in out.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


class TestpmdPath:
    """dpdk-testpmd forwarding between two vhost-user server sockets (QEMU guests); stopped
    (SIGSTOP) outside its turns, as its forwarding core polls without end."""

    STARTUP = 300.0  # seconds: it maps 1 GiB without hugepages

    def __init__(self, workdir: Path) -> None:
        self.socks = [str(workdir / f"testpmd{i}.sock") for i in range(2)]
        self.prefix = f"pyvirtio-bench-{os.getpid()}-{secrets.token_hex(2)}"
        self.log_path = workdir / "testpmd.log"
        args = [TESTPMD, "-l", "0,1", "--no-huge", "-m", "1024", "--no-pci",
                "--iova-mode=va", f"--file-prefix={self.prefix}",
                *(a for i, sock in enumerate(self.socks)
                  for a in ("--vdev", f"net_vhost{i},iface={sock},queues=1")),
                "--", "--forward-mode=io", "--nb-cores=1", "--no-numa",
                "--total-num-mbufs=16384"]
        with open(self.log_path, "wb") as log:
            # Non-interactive testpmd forwards at once and exits on a newline on stdin.
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + self.STARTUP
        while not all(os.path.exists(sock) for sock in self.socks):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("testpmd did not start:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        self.pause()

    def pause(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)

    def guests(self, seconds: int) -> tuple[Guest, Guest]:
        return qemu_guests(self.socks, seconds)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"\n")
                self.proc.stdin.close()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)


AnyPath = PyvirtioPath | BridgePath | TestpmdPath


@contextlib.contextmanager
def paths(workdir: Path, transport: str, profile: str | None, sources: dict[str, Path],
          wanted: Sequence[str], serve_args: Sequence[str] = ()
          ) -> Iterator[list[tuple[str, AnyPath]]]:
    with contextlib.ExitStack() as stack:
        found: list[tuple[str, AnyPath]] = []
        # pyvirtio offers the packed ring, which the UML guests take; pyvirtio-split is the
        # same switch with --no-packed (the ring format a --src checkout from before the
        # packed ring runs); pyvirtio-qemu is the switch with QEMU guests (vs testpmd)
        ours: list[tuple[str, Path, tuple[str, ...], bool]] = [
            ("pyvirtio", ROOT, (), False), ("pyvirtio-split", ROOT, ("--no-packed",), False),
            ("pyvirtio-qemu", ROOT, (), True)]
        ours += [(n, d, (), False) for n, d in sources.items()]
        for name in wanted:
            path: AnyPath
            mine = next((o for o in ours if o[0] == name), None)
            if mine is not None:
                _, src, extra, qemu = mine
                path = PyvirtioPath(workdir, profile if name == "pyvirtio" else None, name,
                                    src, (*extra, *serve_args), qemu)
            elif name == "bridge":
                path = BridgePath(transport)
            elif name == "testpmd":
                path = TestpmdPath(workdir)
            else:
                raise SystemExit(f"net_vs_bridge: unknown path {name}")
            stack.callback(path.close)
            found.append((name, path))
        yield found


def print_profile(path: str, top: int = 25) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def report(samples: list[Sample], names: list[str], rounds: int, seconds: int,
           transport: str, memory: list[Memory]) -> str:
    labels = {"pyvirtio": "pyvirtio switch, UML", "pyvirtio-split": "pyvirtio --no-packed, UML",
              "bridge": f"Linux bridge ({transport} taps), UML",
              "pyvirtio-qemu": "pyvirtio switch, QEMU", "testpmd": "DPDK testpmd, QEMU"}
    lines = [f"{rounds} rounds, {seconds} s iperf3 per cell (-> client to server, <- -R); "
             "Mbit/s and back-end CPU s per Gbit, min / median / max:",
             f"  {'path':32s} {'cell':12s} {'Mbit/s':>24} {'CPU s/Gbit':>24}"]
    for name in names:
        label = labels.get(name, f"pyvirtio switch from {name}, UML")
        for streams, reverse in CELLS:
            ss = [x for x in samples if (x.path, x.streams, x.reverse) == (name, streams,
                                                                              reverse)]
            if ss:
                lines.append(f"  {label:32s} {cell_name(streams, reverse):12s} "
                             f"{Spread.of([x.mbits for x in ss]).show():>24} "
                             f"{Spread.of([x.cpu_per_gbit for x in ss]).show('.2f'):>24}")
    pairs = [(ours, other) for ours in ("pyvirtio", "pyvirtio-split") for other in names
             if other not in ("pyvirtio", "pyvirtio-qemu", "testpmd", ours)]
    pairs.append(("pyvirtio-qemu", "testpmd"))
    lines += ["", f"  {'ratio [rounds]':44s} {'throughput':>22} {'':10} {'CPU per Gbit':>22}"]
    for ours, other in pairs:
        if ours not in names or other not in names:
            continue
        for streams, reverse in CELLS:
            def of(name: str, streams: int = streams, reverse: bool = reverse) -> list[Sample]:
                return [x for x in samples if (x.path, x.streams, x.reverse) == (name, streams,
                                                                                    reverse)]
            r = Ratio.of([x.mbits for x in of(ours)], [x.mbits for x in of(other)])
            c = Ratio.of([x.cpu_per_gbit for x in of(ours)], [x.cpu_per_gbit for x in of(other)])
            label = f"{ours} / {other} {cell_name(streams, reverse)}"
            lines.append(f"  {label:44s} {r.show():>22} {r.verdict():10} {c.show():>22} "
                         f"{c.verdict(higher_is_better=False)}")
    if memory:
        lines += ["", f"  {'resident memory, MiB':22} {'started':>20} {'2 guests attached':>20} "
                  f"{'under load':>20} {'per guest':>20}"]
        for name in names:
            ms = [m for m in memory if m.path == name]
            if not ms:
                continue
            cols = [Spread.of([getattr(m, k) / 1024 for m in ms]).show(".1f")
                    for k in ("started", "attached", "loaded")]
            cols.append(Spread.of([(m.attached - m.started) / 2048 for m in ms]).show(".1f"))
            lines.append(f"  {name:22} " + " ".join(f"{c:>20}" for c in cols))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path (default 5)")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default 5)")
    parser.add_argument("--transport", choices=("vector", "tuntap"), default="vector",
                        help="UML's transport on the bridge's taps (default vector)")
    parser.add_argument("--paths", default="pyvirtio,bridge,pyvirtio-split,pyvirtio-qemu,testpmd",
                        help="comma-separated paths (default: %(default)s)")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the pyvirtio server under cProfile, stats to FILE")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for pyvirtio serve net (repeatable; e.g. "
                        "--serve-arg=--poll-us=50)")
    parser.add_argument("--src", action="append", default=[], metavar="LABEL=DIR",
                        help="one more path: the switch of the pyvirtio checkout DIR, named "
                        "LABEL (compare two versions in the same rounds; repeatable)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("net_vs_bridge: needs root (network namespace, taps, bridge)", file=sys.stderr)
        return 1
    sources = {label: Path(d).resolve() for label, d in
               (item.split("=", 1) for item in args.src)}
    wanted = args.paths.split(",") + list(sources)
    if "testpmd" in wanted and shutil.which(TESTPMD) is None:
        print(f"{TESTPMD} is missing (Debian package dpdk-dev): the testpmd path is left out",
              file=sys.stderr)
        wanted.remove("testpmd")
    print(f"load average before: {load()}", flush=True)
    samples: list[Sample] = []
    memory: list[Memory] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-net-") as tmp, \
            paths(Path(tmp), args.transport, args.profile, sources, wanted,
                  args.serve_arg) as all_paths:
        started = {name: rss_kib(path.pid) for name, path in all_paths if path.pid}
        for r in range(args.rounds):
            order = all_paths[r % len(all_paths):] + all_paths[:r % len(all_paths)]
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for name, path in order:
                server, client = path.guests(args.seconds)
                mem = Memory(name, started[name]) if path.pid else None
                if isinstance(path, TestpmdPath):
                    path.resume()
                try:
                    samples += run_round(server, client, name, path.pid, args.seconds, mem)
                finally:
                    if isinstance(path, TestpmdPath):
                        path.pause()
                if mem is not None:
                    memory.append(mem)
        names = [name for name, _ in all_paths]
    print(f"load average after: {load()}\n")
    print(report(samples, names, args.rounds, args.seconds, args.transport, memory))
    if args.profile:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
