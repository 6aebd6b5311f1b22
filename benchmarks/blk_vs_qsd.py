#!/usr/bin/env python3
"""virtio-blk: pyvirtio's vhost-user back-end against qemu-storage-daemon (``make bench-blk``).

Every back-end serves the same raw image with the same cache mode (host page cache,
flushes honoured; ``--direct``: O_DIRECT for all, QSD's ``cache.direct=on``) to a User-Mode
Linux guest, which runs the host's fio through hostfs against its own ``/dev/vda``: 4 KiB random
reads and writes at queue depth 1 and 32, ``--runtime`` seconds each, libaio with O_DIRECT in
the guest. Back-ends alternate (the order rotates every round) for ``--rounds`` rounds
(default 5); the table shows min / median / max per cell, and the ratios with the range of
their per-round values (``benchmarks/stats.py``: a ratio whose range straddles 1.0 is
"undecided"). ``--src LABEL=DIR`` adds another pyvirtio checkout as one more back-end, to
compare two versions of pyvirtio in the same rounds.

QSD runs in each of its file configurations, each one a back-end of its own: ``qsd``
(``driver=file``, its default, ``aio=threads``), ``qsd-io_uring`` (``aio=io_uring``) and,
with ``--direct`` only, ``qsd-native`` (``cache.direct=on,aio=native``: Linux AIO needs
O_DIRECT). pyvirtio is judged against the *best* QSD configuration of each cell: IOPS
against the QSD configuration with the highest median IOPS, CPU per request against the one
with the lowest median CPU per request, and QD1 p99 latency against the lowest median p99.

Ring formats: ``pyvirtio`` offers the packed ring (its default), and the UML guest's
virtio_blk takes it (virtio_uml acks RING_PACKED; docs/peers.md); ``pyvirtio-split`` is the
same server with ``--no-packed``, so the pair of rows is packed against split on the same
back-end; QSD (libvhost-user) offers only the split ring. The ring each row really ran is
read from the server's stats (the negotiated features) and printed with the table.
``pyvirtio-poll`` is pyvirtio with adaptive polling (``serve blk --poll-us``
``--poll-us``, default 50 here): after a completion it polls the ring for a self-tuning
window before sleeping; the row tells what polling buys at QD1 and what it costs.

Columns, per back-end and workload:

* IOPS: fio's own figure (requests completed per second).
* CPU us/req: the back-end process's CPU time (utime + stime of every thread, from
  ``/proc/PID/stat``) over the run, divided by the requests fio completed. CPU is sampled
  when the guest is about to start fio and right after it ends (a console handshake holds
  the guest meanwhile), so boot and fio's start-up are not counted.
* notif/req: kicks + calls per request, counted on the guest's side, so the same measure
  for both back-ends. Calls are the vring interrupts the guest took (``/proc/interrupts``,
  virtio-uml lines); kicks are the UML kernel's host ``write()`` calls over the run
  (``syscw`` in ``/proc/PID/io`` of the guest's processes): a virtio-uml kick is one eventfd
  write, and nothing else writes while fio runs (against pyvirtio's own counters of kicks
  received, which are printed per run as a check, they agree to within 0.2%).
* irq/req: the calls alone (interrupts the guest took per request).
* clat p50 / p99 (us): fio's completion-latency percentiles as the guest saw them (the
  median over the rounds of each round's percentile).

Resident memory (``VmRSS``) of every back-end is printed per round: when it has started
(no guest), once its guest has booted (idle, attached) and the highest figure sampled right
after each fio run (under load); "per guest" is attached minus started. So is each
back-end's CPU share over 3 s with its guest booted and idle ("idle CPU").

Ratios are pyvirtio / X: IOPS ratio >= 1 and CPU ratio <= 1 in every round mean pyvirtio
is at least as fast and at most as expensive. The machine's load is printed first; other
work on the machine distorts every figure, so run it idle.

``--cpus LIST`` pins every back-end thread and every guest process to those CPUs (e.g.
``1``: guest and back-end share one CPU). On a virtual machine, how often a wake-up has to
bring an idle CPU back (expensive) depends on where the scheduler put the guest and the
back-end, which makes unpinned figures swing; pinned ones are steadier. The default is
unpinned, as a user would run it.

``--syscalls`` attaches ``strace -c -f`` to each back-end for every fio run and prints the
back-end's system calls per request, in total and by call (strace slows every back-end
down a great deal: the IOPS and CPU figures of such a run mean nothing, the counts per
request do, whatever the machine's load).

``--profile FILE`` runs the pyvirtio server under cProfile (slower: for finding hot spots,
not for the table) and writes the stats to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from paths import ROOT  # before pyvirtio: puts the checkout's src/ on sys.path
from procstat import cpu_seconds, load, rss_kib
from pyvirtio.guest import UmlGuest, VhostUserDevice
from pyvirtio.spec import ids
from stats import Ratio, Spread, best

RING_PACKED = 34
#: per pyvirtio back-end: the ring formats its guests negotiated (from its stats)
RINGS: dict[str, set[str]] = {}
#: QSD's file configurations: back-end name -> the options added to its --blockdev
QSD_AIO = {"qsd": "", "qsd-io_uring": ",aio=io_uring", "qsd-native": ",aio=native"}
WORKLOADS = [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]
IMAGE_SIZE = 256 << 20
WORKING_SET = "128M"


@dataclass
class Sample:
    """One fio run against one back-end."""

    backend: str
    rw: str
    qd: int
    iops: float
    requests: int
    cpu_s: float
    irqs: int  # vring interrupts the guest took (calls)
    kicks: int  # host write()s of the guest's kernel (kicks)
    own_kicks: int | None  # kicks the back-end counted (pyvirtio only: a check)
    served: int | None  # requests the back-end counted (pyvirtio only)
    clat_p50_us: float = float("nan")  # fio's completion latency percentiles
    clat_p99_us: float = float("nan")
    syscalls: dict[str, int] | None = None  # --syscalls: the back-end's, by name

    def syscalls_per_req(self, name: str = "total") -> float:
        if not self.syscalls or not self.requests:
            return float("nan")
        return self.syscalls.get(name, 0) / self.requests

    @property
    def cpu_us_per_req(self) -> float:
        return self.cpu_s * 1e6 / self.requests if self.requests else float("nan")

    @property
    def irq_per_req(self) -> float:
        return self.irqs / self.requests if self.requests else float("nan")

    @property
    def notif_per_req(self) -> float:
        return (self.kicks + self.irqs) / self.requests if self.requests else float("nan")


@dataclass
class Memory:
    """Resident memory of one back-end in one round, KiB."""

    backend: str
    started: int  # listening, no guest
    attached: int = 0  # its guest booted, idle
    loaded: int = 0  # the highest figure right after a fio run
    idle_cpu: float = float("nan")  # CPU share (1.0: a whole CPU) with its guest idle

    @property
    def per_guest(self) -> int:
        return self.attached - self.started


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)

    def of(self, backend: str, rw: str, qd: int) -> list[Sample]:
        return [s for s in self.samples if (s.backend, s.rw, s.qd) == (backend, rw, qd)]


def write_calls(pids: list[int]) -> int:
    """write()-like system calls made so far by the processes ``pids`` (``syscw``)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("syscw:"):
                    total += int(line.split()[1])
    return total


# ---- back-ends ------------------------------------------------------------------------------

#: runs ``pyvirtio ARGS`` under cProfile with a CPU-time clock (the server mostly sleeps in
#: epoll: wall-clock profiles would be all waiting), then writes the stats to argv[1]
PROFILED_MAIN = """
import cProfile, sys, time
from pyvirtio.cli.main import main
out = sys.argv[1]
profile = cProfile.Profile(time.thread_time)
try:
    profile.runcall(main, sys.argv[2:])
finally:
    profile.dump_stats(out)
"""


class Backend:
    name = ""
    pid = 0

    def counters(self) -> dict[str, int] | None:
        return None

    def stop(self) -> None:
        raise NotImplementedError


class PyvirtioBackend(Backend):
    """``pyvirtio serve blk`` from this checkout, or (``src``) from another one: ``--src
    base=/path/to/old/checkout`` runs an older pyvirtio beside this one in the same rounds."""

    def __init__(self, image: Path, sock: Path, workdir: Path, direct: bool,
                 profile: str | None, extra: list[str], name: str = "pyvirtio",
                 src: Path = ROOT) -> None:
        self.name = name
        self.stats_path = workdir / f"{name}-stats.json"
        self.stats_path.unlink(missing_ok=True)
        cmd = [sys.executable]
        cmd += ["-c", PROFILED_MAIN, profile] if profile else ["-m", "pyvirtio"]
        cmd += ["serve", "blk", str(image), "--socket", str(sock),
                "--stats-file", str(self.stats_path)]
        if direct:
            cmd.append("--direct")
        cmd += extra
        env = {**os.environ, "PYTHONPATH": str(src / "src")}
        out = workdir / f"{name}.out"
        with open(out, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while "pyvirtio: virtio-blk" not in out.read_text():  # printed once it listens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pyvirtio serve blk did not start: {out.read_text()}")
            time.sleep(0.02)

    def _read_stats(self) -> dict[str, int] | None:
        try:
            data: dict[str, int] = json.loads(self.stats_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data

    def counters(self) -> dict[str, int]:
        # The server rewrites the file (atomically) on SIGUSR1; its "seq" tells a fresh copy.
        old = self._read_stats()
        seq = old["seq"] if old is not None else -1
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            data = self._read_stats()
            if data is not None and data["seq"] != seq:
                return data
            time.sleep(0.002)
        raise RuntimeError(f"pyvirtio did not write its stats file (alive: "
                           f"{self.proc.poll() is None}, last: {self._read_stats()})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class QsdBackend(Backend):
    """qemu-storage-daemon in the file configuration ``name`` (a key of QSD_AIO)."""

    def __init__(self, image: Path, sock: Path, workdir: Path, direct: bool,
                 name: str = "qsd") -> None:
        self.name = name
        pidfile = workdir / f"{name}.pid"
        pidfile.unlink(missing_ok=True)
        blockdev = f"driver=file,node-name=f0,filename={image}"
        if direct:
            blockdev += ",cache.direct=on"
        blockdev += QSD_AIO[name]
        # --daemonize: the parent exits once the export listens, a clean readiness signal.
        subprocess.run(
            ["qemu-storage-daemon", "--daemonize", "--pidfile", str(pidfile),
             "--blockdev", blockdev, "--export",
             f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
             "writable=on"],
            check=True, timeout=30, stdin=subprocess.DEVNULL)
        self.pid = int(pidfile.read_text().strip())

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(self.pid, 0)
                time.sleep(0.02)
            os.kill(self.pid, signal.SIGKILL)


@contextlib.contextmanager
def backend(kind: str, image: Path, sock: Path, workdir: Path, direct: bool,
            profile: str | None, extra: list[str], sources: dict[str, Path],
            poll_us: float = 50.0) -> Iterator[Backend]:
    be: Backend
    if kind in QSD_AIO:
        be = QsdBackend(image, sock, workdir, direct, kind)
    else:
        more = {"pyvirtio-split": ["--no-packed"],
                "pyvirtio-poll": [f"--poll-us={poll_us}"]}.get(kind, [])
        be = PyvirtioBackend(image, sock, workdir, direct, profile if kind == "pyvirtio"
                             else None, extra + more, kind, sources.get(kind, ROOT))
    try:
        yield be
    finally:
        be.stop()
        sock.unlink(missing_ok=True)


# ---- the guest ------------------------------------------------------------------------------

GUEST_SCRIPT = """
irqs() {{ grep virtio-uml /proc/interrupts | awk '{{s += $2}} END {{print s + 0}}'; }}
echo BENCH-READY
while read rw qd; do
    [ "$rw" = quit ] && break
    echo "BENCH-BEGIN $rw $qd $(irqs)"
    out=$(host_run /usr/bin/fio --name=bench --filename=/dev/vda --rw=$rw --bs=4k \\
        --iodepth=$qd --ioengine=libaio --direct=1 --runtime={runtime} --time_based \\
        --size={working_set} --randrepeat=0 --norandommap --output-format=terse \\
        --terse-version=3 2>&1 | tail -1)
    echo "BENCH-END $rw $qd $(irqs) $out"
done
"""


def pin(pids: list[int], cpus: set[int] | None) -> None:
    """Pin every thread of these processes to ``cpus`` (children inherit it)."""
    if not cpus:
        return
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)


class BenchGuest:
    """A UML guest attached to one back-end that runs one fio job per request from the
    console. Two of them (one per back-end) stay booted for a round, so the two back-ends
    run each workload back to back, under the same machine conditions."""

    def __init__(self, be: Backend, sock: Path, runtime: int,
                 cpus: set[int] | None = None, syscalls: bool = False) -> None:
        self.be = be
        self.runtime = runtime
        self.syscalls = syscalls
        script = GUEST_SCRIPT.format(runtime=runtime, working_set=WORKING_SET)
        self.guest = UmlGuest(script, devices=[VhostUserDevice(sock, ids.BLOCK)],
                              timeout=3600)
        self.guest.start()
        try:
            self.guest.wait_for("^BENCH-READY", timeout=60)
            pin(self.guest.processes(), cpus)
        except BaseException:
            self.guest.stop()
            raise

    def run(self, rw: str, qd: int) -> Sample:
        g, be = self.guest, self.be
        stats0 = be.counters()
        pids = self.guest.processes()
        writes0 = write_calls(pids)
        tracer = Strace(be.pid) if self.syscalls else None
        cpu0 = cpu_seconds(be.pid)
        g.write(f"{rw} {qd}\n")
        begin = g.wait_for(rf"^BENCH-BEGIN {rw} {qd} (\d+)", timeout=60)
        end = g.wait_for(rf"^BENCH-END {rw} {qd} (\d+) (.*)$", timeout=self.runtime + 60)
        cpu1 = cpu_seconds(be.pid)
        counts = tracer.stop() if tracer is not None else None
        stats1 = be.counters()
        kicks = write_calls(pids) - writes0
        terse = end.group(2).split(";")
        if len(terse) < 50 or terse[0] != "3":
            raise RuntimeError(f"fio failed: {end.group(2)}")
        # terse v3: read KiB / IOPS in fields 6 and 8, write in 47 and 49 (1-based)
        kib = int(terse[5]) + int(terse[46])
        iops = float(terse[7]) + float(terse[48])
        own_kicks = served = None
        own = ""
        if stats0 is not None and stats1 is not None:
            own_kicks = stats1["kicks"] - stats0["kicks"]
            served = stats1["requests"] - stats0["requests"]
            if "loop_waits" in stats1 and served:  # older checkouts (--src) do not count
                d = {k: stats1[k] - stats0[k] for k in ("loop_waits", "calls", "poll_hits",
                                                        "poll_misses")}
                own = (f"  per request: {d['loop_waits'] / served:.2f} epoll waits, "
                       f"{d['calls'] / served:.2f} calls"
                       + (f", polling found {d['poll_hits'] / served:.0%} (missed "
                          f"{d['poll_misses']})" if d["poll_hits"] or d["poll_misses"]
                          else ""))
            if "features" in stats1:  # older checkouts (--src) do not say
                RINGS.setdefault(be.name, set()).add(
                    "packed" if stats1["features"] >> RING_PACKED & 1 else "split")
        p50, p99 = clat_percentiles(terse, "read" if "read" in rw else "write")
        s = Sample(be.name, rw, qd, iops, kib // 4, cpu1 - cpu0,
                   int(end.group(1)) - int(begin.group(1)), kicks, own_kicks, served, p50, p99,
                   counts)
        print(f"  {be.name:14} {rw:9} QD{qd:<3} {iops:9.0f} IOPS  "
              f"{s.cpu_us_per_req:6.1f} us/req  clat p50/p99 {p50:.0f}/{p99:.0f} us  "
              f"notif/req {s.notif_per_req:.2f}  irq/req {s.irq_per_req:.2f}"
              + (f"  (kicks: guest {kicks}, pyvirtio {own_kicks})" if own_kicks is not None
                 else "") + own, flush=True)
        if counts:
            top = sorted(((n, c) for n, c in counts.items() if n != "total"),
                         key=lambda item: -item[1])[:6]
            print(f"    system calls per request: {s.syscalls_per_req():.2f} ("
                  + ", ".join(f"{n} {c / s.requests:.2f}" for n, c in top) + ")", flush=True)
        return s

    def close(self) -> None:
        try:
            if self.guest.running:
                self.guest.write("quit 0\n")
                self.guest.wait(timeout=30)
        finally:
            self.guest.stop()


class Strace:
    """``strace -c -f`` attached to a running process (every thread) until :meth:`stop`."""

    def __init__(self, pid: int) -> None:
        self.out = Path(tempfile.mkstemp(prefix="pyvirtio-bench-strace-")[1])
        self.proc = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(self.out),
                                      "-p", str(pid)], stdin=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach to every thread before the run starts

    def stop(self) -> dict[str, int]:
        """Detach; the calls made meanwhile, by name, and their ``total``."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        counts: dict[str, int] = {}
        try:
            for line in self.out.read_text().splitlines():
                fields = line.split()
                # % time, seconds, usecs/call, calls, [errors,] name
                if len(fields) >= 5 and fields[0][0].isdigit() and fields[3].isdigit():
                    counts[fields[-1]] = int(fields[3])
        finally:
            self.out.unlink(missing_ok=True)
        return counts


def clat_percentiles(terse: list[str], direction: str) -> tuple[float, float]:
    """fio's completion-latency p50 and p99 (us) from a terse v3 line: the read block's 20
    percentile fields are fields 18-37 (1-based), the write block's 59-78, each
    ``P%=usec``."""
    first = 17 if direction == "read" else 58
    found: dict[str, float] = {}
    for item in terse[first : first + 20]:
        key, _, value = item.partition("=")
        with contextlib.suppress(ValueError):
            found[key.rstrip("%")] = float(value)
    nan = float("nan")
    return (next((v for k, v in found.items() if float(k) == 50.0), nan),
            next((v for k, v in found.items() if float(k) == 99.0), nan))


# ---- report ---------------------------------------------------------------------------------


def report(results: Results, workloads: list[tuple[str, int]], backends: list[str]) -> str:
    """Per cell and back-end: min / median / max over the rounds; then pyvirtio against the
    best QSD configuration of each cell and against every other back-end: ratio of medians
    [range of per-round ratios] and a verdict that is only "ok" or "worse" when every round
    agrees; then resident memory."""
    head = (f"{'workload':15} {'back-end':14} {'IOPS min / med / max':>24} "
            f"{'CPU us/req min / med / max':>28} {'clat p50':>8} {'p99 us':>7} "
            f"{'notif/req':>10} {'irq/req':>8}")
    lines = [head, "-" * len(head)]
    for rw, qd in workloads:
        for name in backends:
            ss = results.of(name, rw, qd)
            if not ss:
                continue
            iops = Spread.of([s.iops for s in ss])
            cpu = Spread.of([s.cpu_us_per_req for s in ss])
            notif = Spread.of([s.notif_per_req for s in ss])
            irq = Spread.of([s.irq_per_req for s in ss])
            p50 = Spread.of([s.clat_p50_us for s in ss])
            p99 = Spread.of([s.clat_p99_us for s in ss])
            lines.append(f"{rw + ' QD' + str(qd):15} {name:14} {iops.show():>24} "
                         f"{cpu.show('.1f'):>28} {p50.median:8.0f} {p99.median:7.0f} "
                         f"{notif.median:10.2f} {irq.median:8.2f}")
    if any(s.syscalls for s in results.samples):
        lines += ["", f"{'system calls per request (strace -c -f, median)':48} "
                  f"{'total':>7}  by call"]
        for rw, qd in workloads:
            for name in backends:
                ss = [s for s in results.of(name, rw, qd) if s.syscalls]
                if not ss:
                    continue
                calls = sorted({n for s in ss for n in s.syscalls if n != "total"},
                               key=lambda n: -Spread.of([s.syscalls_per_req(n)
                                                         for s in ss]).median)[:6]
                by = ", ".join(f"{n} {Spread.of([s.syscalls_per_req(n) for s in ss]).median:.2f}"
                               for n in calls)
                total = Spread.of([s.syscalls_per_req() for s in ss]).median
                lines.append(f"{rw + ' QD' + str(qd):15} {name:32} {total:7.2f}  {by}")
    rings = [f"{name}: {'/'.join(sorted(RINGS[name]))} ring" for name in backends
             if name in RINGS]
    rings += [f"{name}: split ring" for name in backends if name in QSD_AIO]
    if rings:
        lines += ["", "ring format negotiated: " + ", ".join(rings)]
    qsds = [b for b in backends if b in QSD_AIO]
    mine = [b for b in backends if b not in QSD_AIO]
    if qsds and mine:
        lines += ["", "pyvirtio / best QSD configuration of the cell (IOPS: highest median; "
                  "CPU/req and p99: lowest median)",
                  f"{'cell':30} {'IOPS ratio [rounds]':>22} {'':10} "
                  f"{'CPU/req ratio [rounds]':>24} {'':10} {'QD1 p99 ratio [rounds]':>24}"]
    for name, (rw, qd) in ((n, w) for n in (mine if qsds else []) for w in workloads):
        ours = results.of(name, rw, qd)
        if ours:

            def against(key: str, higher: bool, ours: list[Sample] = ours, rw: str = rw,
                        qd: int = qd) -> str:
                values = {q: [getattr(s, key) for s in results.of(q, rw, qd)] for q in qsds}
                pick = best(values, higher)
                if pick is None:
                    return f"{'n/a':>36}"
                r = Ratio.of([getattr(s, key) for s in ours], values[pick])
                return f"{r.show():>22} {r.verdict(higher):10} {'(' + pick + ')':15}"

            cell = f"{name} {rw} QD{qd}"
            p99 = against("clat_p99_us", False) if qd == 1 else ""
            lines.append(f"{cell:30} {against('iops', True)}  "
                         f"{against('cpu_us_per_req', False)}  {p99}")
    if "pyvirtio" not in backends:
        return "\n".join(lines + memory_report(results, backends))
    others = [b for b in backends if b != "pyvirtio"]
    if others:
        lines += ["", f"{'pyvirtio / X':32} {'IOPS ratio [rounds]':>22} {'':10} "
                  f"{'CPU/req ratio [rounds]':>24}"]
        for other in others:
            for rw, qd in workloads:
                ours, theirs = results.of("pyvirtio", rw, qd), results.of(other, rw, qd)
                if not ours or not theirs:
                    continue
                r_iops = Ratio.of([s.iops for s in ours], [s.iops for s in theirs])
                r_cpu = Ratio.of([s.cpu_us_per_req for s in ours],
                                 [s.cpu_us_per_req for s in theirs])
                label = f"vs {other} {rw} QD{qd}"
                lines.append(f"{label:32} {r_iops.show():>22} {r_iops.verdict():10} "
                             f"{r_cpu.show():>24} {r_cpu.verdict(higher_is_better=False)}")
    return "\n".join(lines + memory_report(results, backends))


def memory_report(results: Results, backends: list[str]) -> list[str]:
    """Resident memory per back-end, MiB min / median / max over the rounds."""
    lines = ["", f"{'resident memory, MiB':22} {'started (idle)':>20} {'guest attached':>20} "
             f"{'under load':>20} {'per guest':>20} {'idle CPU %':>20}"]
    for name in backends:
        ms = [m for m in results.memory if m.backend == name]
        if not ms:
            continue
        cols = [Spread.of([getattr(m, k) / 1024 for m in ms]).show(".1f")
                for k in ("started", "attached", "loaded")]
        cols.append(Spread.of([m.per_guest / 1024 for m in ms]).show(".1f"))
        cols.append(Spread.of([100 * m.idle_cpu for m in ms]).show(".2f"))
        lines.append(f"{name:22} " + " ".join(f"{c:>20}" for c in cols))
    return lines


def idle_cpu(guests: dict[str, BenchGuest], memory: list[Memory],
             seconds: float = 3.0) -> None:
    """Each back-end's CPU share while its guest is booted and idle (what polling, if it
    ever ran without requests, would show)."""
    before = {kind: cpu_seconds(g.be.pid) for kind, g in guests.items()}
    time.sleep(seconds)
    for m in memory:
        m.idle_cpu = (cpu_seconds(guests[m.backend].be.pid) - before[m.backend]) / seconds


def make_image(path: Path) -> None:
    """A fully written image (random bytes): reads hit real data in the page cache.

    Written 4 KiB at a time: large sequential writes make the kernel cache the file in
    large folios (ext4 on recent kernels), and every later 4 KiB overwrite of such a folio
    then walks all its block buffers (``ext4_block_write_begin``, ~25 us per write with
    1 MiB folios here), for both back-ends alike; a guest-written image is in 4 KiB pages.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        block = 4096
        for off in range(0, IMAGE_SIZE, 1 << 20):
            chunk = os.urandom(1 << 20)
            for pos in range(0, 1 << 20, block):
                os.pwrite(fd, chunk[pos : pos + block], off + pos)
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    parser.add_argument("--direct", action="store_true",
                        help="O_DIRECT on the host for both back-ends")
    parser.add_argument("--backends",
                        help="pyvirtio (packed ring offered), pyvirtio-split (--no-packed), "
                        "pyvirtio-poll (--poll-us), qsd (aio=threads), qsd-io_uring, "
                        "qsd-native (--direct only) (default: all of them)")
    parser.add_argument("--poll-us", type=float, default=50.0,
                        help="pyvirtio-poll's --poll-us (default %(default)s)")
    parser.add_argument("--workloads", default=",".join(f"{rw}:{qd}" for rw, qd in WORKLOADS),
                        help="comma-separated rw:qd (default: %(default)s)")
    parser.add_argument("--profile", metavar="FILE",
                        help="run pyvirtio under cProfile, write the stats to FILE")
    parser.add_argument("--syscalls", action="store_true",
                        help="count each back-end's system calls per request with strace "
                        "(slows every back-end: for the counts, not the timings)")
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    parser.add_argument("--mmap-reads", action="store_true",
                        help="pyvirtio serves reads from the mapped image (serve blk "
                        "--mmap-reads; see its caveat)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for pyvirtio serve blk (repeatable; e.g. "
                        "--serve-arg=--batch-interval=2)")
    parser.add_argument("--cpus", metavar="LIST",
                        help="pin back-ends and guests to these CPUs (e.g. 1 or 0,1)")
    parser.add_argument("--src", action="append", default=[], metavar="LABEL=DIR",
                        help="one more pyvirtio back-end, named LABEL, run from the checkout "
                        "DIR (e.g. base=/tmp/old: compare two versions in the same rounds; "
                        "repeatable)")
    parser.add_argument("--workdir", help="where the image and sockets go (default: a "
                        "temporary directory under /var/tmp, on disk like real images)")
    args = parser.parse_args(argv)
    sources = {label: Path(d).resolve() for label, d in
               (item.split("=", 1) for item in args.src)}
    default = "pyvirtio,pyvirtio-split,pyvirtio-poll,qsd,qsd-io_uring"
    if args.direct:
        default += ",qsd-native"
    backends = (args.backends or default).split(",") + list(sources)
    if "qsd-native" in backends and not args.direct:
        parser.error("qsd-native (aio=native) needs --direct: Linux AIO wants O_DIRECT")
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    extra = (["--mmap-reads"] if args.mmap_reads else []) + args.serve_arg
    workloads = [(w.split(":")[0], int(w.split(":")[1])) for w in args.workloads.split(",")]
    if any(b in QSD_AIO for b in backends) and shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is missing (Debian package qemu-system-x86)",
              file=sys.stderr)
        return 2
    print(f"load average before: {load()}; {args.rounds} rounds, {args.runtime} s per run, "
          f"cache: {'O_DIRECT' if args.direct else 'host page cache'}"
          + (f", pinned to CPU(s) {args.cpus}" if cpus else ", unpinned")
          + (f", pyvirtio serve blk {' '.join(extra)}" if extra else ""), flush=True)
    results = Results()
    workdir = Path(tempfile.mkdtemp(prefix="pyvirtio-bench-blk-", dir=args.workdir or
                                    "/var/tmp"))
    try:
        image = workdir / "disk.img"
        make_image(image)
        for rnd in range(args.rounds):
            order = backends[rnd % len(backends):] + backends[:rnd % len(backends)]
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
            with contextlib.ExitStack() as stack:
                guests = {}
                for kind in backends:
                    sock = workdir / f"{kind}.sock"
                    be = stack.enter_context(backend(kind, image, sock, workdir,
                                                     args.direct, args.profile, extra,
                                                     sources, args.poll_us))
                    pin([be.pid], cpus)
                    mem = Memory(kind, rss_kib(be.pid))
                    results.memory.append(mem)
                    guests[kind] = BenchGuest(be, sock, args.runtime, cpus, args.syscalls)
                    stack.callback(guests[kind].close)
                    mem.attached = rss_kib(be.pid)
                idle_cpu(guests, results.memory[-len(backends):])
                for rw, qd in workloads:
                    for kind in order:
                        results.samples.append(guests[kind].run(rw, qd))
                        mem = next(m for m in reversed(results.memory) if m.backend == kind)
                        mem.loaded = max(mem.loaded, rss_kib(guests[kind].be.pid))
                for m in results.memory[-len(backends):]:
                    print(f"  {m.backend:14} resident memory: {m.started / 1024:.1f} MiB "
                          f"started, {m.attached / 1024:.1f} MiB with its guest, "
                          f"{m.loaded / 1024:.1f} MiB under load; idle CPU "
                          f"{m.idle_cpu:.1%}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nload average after: {load()}\n")
    print(report(results, workloads, backends))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"samples": [s.__dict__ for s in results.samples],
             "memory_kib": [m.__dict__ for m in results.memory]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
