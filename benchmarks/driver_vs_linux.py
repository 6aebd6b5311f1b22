#!/usr/bin/env python3
"""Our virtio-blk driver against Linux's, on the same qemu-storage-daemon export
(``make bench-driver``).

One qemu-storage-daemon (QSD) serves a raw image over vhost-user (``--qsd-aio``, default
``io_uring``, host page cache). Two front-ends take turns on that export, each running 4 KiB
random reads and writes at queue depth 1 and 32 for ``--runtime`` seconds:

* pyvirtio: our :class:`~pyvirtio.driver.blk.BlkDriver` through our vhost-user front-end
  (:class:`~pyvirtio.io.vhost_user_client.VhostUserClient`), in one process that is also the
  request loop (this script with ``--worker``): it keeps QD requests in flight, each on a
  4 KiB buffer of its own (no copies), over a 128 MiB working set.
* linux: a User-Mode Linux guest's ``virtio_blk`` driver, with the host's fio running in the
  guest (libaio, O_DIRECT on ``/dev/vda``; the same guest and fio job as ``make bench-blk``).

The order alternates every round (``--rounds``, default 5). Per cell: IOPS, the front-end's
CPU time per request (our worker process; the guest's processes, including what the UML
kernel reaped, so fio's own CPU is in it as the request loop's is in ours) and QSD's CPU per
request, min / median / max over the rounds; then pyvirtio / linux: the ratio of medians and
the range of per-round ratios (``benchmarks/stats.py``; "undecided" when it straddles 1.0).
The load average is printed before and after; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from blk_vs_qsd import QSD_AIO, BenchGuest, QsdBackend, make_image, pin
from paths import ROOT
from procstat import cpu_seconds, cpu_seconds_reaped, load
from stats import Ratio, Spread

WORKLOADS = [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]
WORKING_SET = 128 << 20
BLOCK = 4096


@dataclass
class Sample:
    frontend: str
    rw: str
    qd: int
    iops: float
    requests: int
    frontend_cpu_s: float
    qsd_cpu_s: float

    def per_req(self, cpu_s: float) -> float:
        return cpu_s * 1e6 / self.requests if self.requests else float("nan")


# ---- our driver: the worker --------------------------------------------------------------------


def worker(sock: str, rw: str, qd: int, runtime: float) -> dict[str, float]:
    """Run the request loop against the vhost-user socket; return what it did."""
    from pyvirtio.driver.base import probe
    from pyvirtio.driver.blk import BlkDriver
    from pyvirtio.io.vhost_user_client import VhostUserClient
    from pyvirtio.spec import blk as B
    from pyvirtio.spec import ids

    rtype = B.VIRTIO_BLK_T_IN if rw == "randread" else B.VIRTIO_BLK_T_OUT
    blocks = WORKING_SET // BLOCK
    rand = random.Random(os.getpid())
    with VhostUserClient(sock, ids.BLOCK, memory_size=16 << 20, timeout=10) as client:
        driver = probe(client, BlkDriver)
        assert isinstance(driver, BlkDriver)
        buffers = [client.allocator.alloc(BLOCK, BLOCK) for _ in range(qd)]
        if rtype == B.VIRTIO_BLK_T_OUT:
            for addr in buffers:
                client.memory.write(addr, os.urandom(BLOCK))

        def submit(slot: int) -> object:
            sector = rand.randrange(blocks) * (BLOCK // 512)
            sgs = [(buffers[slot], BLOCK)]
            if rtype == B.VIRTIO_BLK_T_IN:
                return driver.submit(rtype, sector, in_sgs=sgs, queue=0)
            return driver.submit(rtype, sector, out_sgs=sgs, queue=0)

        inflight = {slot: submit(slot) for slot in range(qd)}
        driver.kick()
        done = failed = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        end = t0 + runtime
        while True:
            if not driver.poll():
                client.wait(1.0)
                continue
            now = time.monotonic()
            for slot, io in list(inflight.items()):
                if io.status is None:  # type: ignore[attr-defined]
                    continue
                done += 1
                failed += io.status != B.VIRTIO_BLK_S_OK  # type: ignore[attr-defined]
                if now < end:
                    inflight[slot] = submit(slot)
                else:
                    del inflight[slot]
            if not inflight:
                break
            driver.kick()
        seconds = time.monotonic() - t0
        cpu = time.process_time() - cpu0
    if failed:
        raise SystemExit(f"{failed} of {done} requests failed")
    return {"requests": done, "seconds": seconds, "cpu_s": cpu}


def run_ours(sock: Path, rw: str, qd: int, runtime: float, qsd_pid: int,
             cpus: set[int] | None) -> Sample:
    qsd0 = cpu_seconds(qsd_pid)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(sock), rw, str(qd),
                             str(runtime)], stdout=subprocess.PIPE, env=env,
                            stdin=subprocess.DEVNULL)
    pin([proc.pid], cpus)
    out, _ = proc.communicate(timeout=runtime + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"the driver worker failed ({proc.returncode})")
    got = json.loads(out)
    s = Sample("pyvirtio", rw, qd, got["requests"] / got["seconds"], int(got["requests"]),
               got["cpu_s"], cpu_seconds(qsd_pid) - qsd0)
    show(s)
    return s


def run_linux(guest: BenchGuest, rw: str, qd: int, qsd_pid: int) -> Sample:
    pids = guest.guest.processes()
    front0 = sum(cpu_seconds_reaped(p) for p in pids)
    got = guest.run(rw, qd)  # prints its own line (as in bench-blk)
    front = sum(cpu_seconds_reaped(p) for p in guest.guest.processes()) - front0
    s = Sample("linux", rw, qd, got.iops, got.requests, front, got.cpu_s)
    show(s)
    return s


def show(s: Sample) -> None:
    print(f"  {s.frontend:9} {s.rw:9} QD{s.qd:<3} {s.iops:9.0f} IOPS  front-end "
          f"{s.per_req(s.frontend_cpu_s):6.1f} us/req  QSD {s.per_req(s.qsd_cpu_s):6.1f} "
          "us/req", flush=True)


def report(samples: list[Sample], workloads: list[tuple[str, int]]) -> str:
    head = (f"{'workload':15} {'front-end':10} {'IOPS min / med / max':>24} "
            f"{'front-end CPU us/req':>24} {'QSD CPU us/req':>22}")
    lines = [head, "-" * len(head)]
    for rw, qd in workloads:
        for name in ("pyvirtio", "linux"):
            ss = [s for s in samples if (s.frontend, s.rw, s.qd) == (name, rw, qd)]
            if not ss:
                continue
            lines.append(
                f"{rw + ' QD' + str(qd):15} {name:10} "
                f"{Spread.of([s.iops for s in ss]).show():>24} "
                f"{Spread.of([s.per_req(s.frontend_cpu_s) for s in ss]).show('.1f'):>24} "
                f"{Spread.of([s.per_req(s.qsd_cpu_s) for s in ss]).show('.1f'):>22}")
    lines += ["", f"{'pyvirtio / linux':18} {'IOPS ratio [rounds]':>22} {'':10} "
              f"{'front-end CPU/req ratio':>24}  target (IOPS)"]
    for rw, qd in workloads:
        ours = [s for s in samples if (s.frontend, s.rw, s.qd) == ("pyvirtio", rw, qd)]
        theirs = [s for s in samples if (s.frontend, s.rw, s.qd) == ("linux", rw, qd)]
        if not ours or not theirs:
            continue
        r_iops = Ratio.of([s.iops for s in ours], [s.iops for s in theirs])
        r_cpu = Ratio.of([s.per_req(s.frontend_cpu_s) for s in ours],
                         [s.per_req(s.frontend_cpu_s) for s in theirs])
        target = 1.0 if qd > 1 else 0.8
        verdict = ("met" if r_iops.low >= target else "missed" if r_iops.high < target
                   else "undecided")
        lines.append(f"{rw + ' QD' + str(qd):18} {r_iops.show():>22} {r_iops.verdict():10} "
                     f"{r_cpu.show():>24}  >= {target:.1f}: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, sock, rw, qd, runtime = sys.argv
        print(json.dumps(worker(sock, rw, int(qd), float(runtime))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per run")
    parser.add_argument("--qsd-aio", choices=("threads", "io_uring"), default="io_uring",
                        help="QSD's file configuration (default %(default)s)")
    parser.add_argument("--workloads", default=",".join(f"{rw}:{qd}" for rw, qd in WORKLOADS),
                        help="comma-separated rw:qd (default: %(default)s)")
    parser.add_argument("--cpus", metavar="LIST", help="pin QSD and both front-ends")
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    args = parser.parse_args(argv)
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is missing (Debian package qemu-system-x86)",
              file=sys.stderr)
        return 2
    workloads = [(w.split(":")[0], int(w.split(":")[1])) for w in args.workloads.split(",")]
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    qsd_name = "qsd" if args.qsd_aio == "threads" else "qsd-io_uring"
    assert qsd_name in QSD_AIO
    print(f"load average before: {load()}; {args.rounds} rounds, {args.runtime} s per run, "
          f"QSD {qsd_name}, host page cache"
          + (f", pinned to CPU(s) {args.cpus}" if cpus else ", unpinned"), flush=True)
    samples: list[Sample] = []
    workdir = Path(tempfile.mkdtemp(prefix="pyvirtio-bench-driver-", dir="/var/tmp"))
    try:
        image = workdir / "disk.img"
        make_image(image)
        sock = workdir / "qsd.sock"
        qsd = QsdBackend(image, sock, workdir, direct=False, name=qsd_name)
        try:
            pin([qsd.pid], cpus)
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
                order = ["pyvirtio", "linux"] if rnd % 2 == 0 else ["linux", "pyvirtio"]
                for front in order:
                    if front == "pyvirtio":
                        for rw, qd in workloads:
                            samples.append(run_ours(sock, rw, qd, args.runtime, qsd.pid,
                                                    cpus))
                        continue
                    guest = BenchGuest(qsd, sock, args.runtime, cpus)
                    try:
                        for rw, qd in workloads:
                            samples.append(run_linux(guest, rw, qd, qsd.pid))
                    finally:
                        guest.close()
        finally:
            qsd.stop()
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nload average after: {load()}\n")
    print(report(samples, workloads))
    if args.json:
        Path(args.json).write_text(json.dumps([s.__dict__ for s in samples], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
