#!/usr/bin/env python3
"""virtio-net: two guests joined by ``pyvirtio join net`` against the same two guests on
``pyvirtio serve net`` (``make bench-join``).

Both paths carry TCP between two User-Mode Linux guests, the host's iperf3 in each guest
through hostfs, ``--seconds`` long, one stream and four, both directions (the guests,
scripts, cells and timing are those of ``benchmarks/net_vs_bridge.py``):

* join: ``pyvirtio join net``: each guest's transmit chains copied straight into the other
  guest's receive buffers (point to point, no MAC learning, no queue in between);
* switch: ``pyvirtio serve net`` with two sockets (the learning switch).

Both offer the split ring only (``join`` does not offer the packed ring; the switch runs
with ``--no-packed``), so the ring format is not what is compared. Paths alternate (the
order rotates every round) for ``--rounds`` rounds (default 5); the summary shows min /
median / max throughput of each and the ratio join / switch with the range of its per-round
values (``benchmarks/stats.py``). The CPU time of each server per round is shown too.
Traffic stays on unix sockets and shared memory: no root, no network interface.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from net_vs_bridge import CELLS, PyvirtioPath, Sample, cell_name, load, run_round
from stats import Ratio, Spread

PATHS = {"join": ("join", "net"), "switch": ("serve", "net")}
EXTRA = {"join": (), "switch": ("--no-packed",)}
LABELS = {"join": "pyvirtio join net", "switch": "pyvirtio serve net (switch)"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path (default 5)")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default 5)")
    args = parser.parse_args(argv)
    print(f"load average before: {load()}", flush=True)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-join-") as tmp, \
            contextlib.ExitStack() as stack:
        paths = []
        for name, command in PATHS.items():
            path = PyvirtioPath(Path(tmp), None, name, extra=EXTRA[name], command=command)
            stack.callback(path.close)
            paths.append((name, path))
        for r in range(args.rounds):
            order = paths[r % len(paths):] + paths[:r % len(paths)]
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for name, path in order:
                server, client = path.guests(args.seconds)
                samples += run_round(server, client, name, path.proc.pid, args.seconds, None)
    print(f"load average after: {load()}")
    print(f"\n{args.rounds} rounds, {args.seconds} s iperf3 per cell, UML <-> UML; "
          "Mbit/s min / median / max:")
    for streams, reverse in CELLS:
        mbits = {name: [s.mbits for s in samples
                        if (s.path, s.streams, s.reverse) == (name, streams, reverse)]
                 for name in PATHS}
        for name in PATHS:
            print(f"  {LABELS[name]:30s} {cell_name(streams, reverse):12s} "
                  f"{Spread.of(mbits[name]).show():>24}")
        ratio = Ratio.of(mbits["join"], mbits["switch"])
        print(f"  {'ratio join / switch [rounds]':43s} {ratio.show():>24} {ratio.verdict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
