#!/usr/bin/env python3
"""Split vs packed virtqueues, in-process (``make bench-ring``): ns per request.

One process runs our driver and our device on one ring of 256 entries in anonymous guest
memory. A request is one 64-byte device-readable and one 64-byte device-writable buffer
(two descriptors, or one indirect with ``+indirect``). Per batch of B requests: the driver
adds B buffers and calls kick_prepare; the device pops them all, writes 64 bytes into each,
returns them with one push_many and asks needs_notification; the driver collects all B with
get_buf. The figure is wall time per request over ``--requests`` requests.

Configurations: without notification features, with EVENT_IDX, with IN_ORDER (where a
device's push_many of completely filled buffers becomes one used entry), at batch sizes 1,
8 and 64. Split and packed alternate for ``--rounds`` rounds (default 5); each cell shows
min / median / max, and the ratio packed / split with the range of its per-round ratios
(``benchmarks/stats.py``: "undecided" when that range straddles 1.0; lower is better).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import paths  # noqa: F401  (before pyvirtio: puts the checkout's src/ on sys.path)
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DeviceQueue, DriverQueue
from pyvirtio.ring.packed import PackedDeviceQueue, PackedDriverQueue
from pyvirtio.spec import packed as P
from pyvirtio.spec import split as S
from stats import Ratio, Spread

SIZE = 256
CONFIGS = {"plain": {}, "event_idx": {"event_idx": True}, "in_order": {"in_order": True},
           "event_idx+in_order": {"event_idx": True, "in_order": True}}
BATCHES = (1, 8, 64)


def make(fmt: str, flags: dict[str, bool]):  # type: ignore[no-untyped-def]
    memory = GuestMemory.anonymous(4 << 20)
    alloc = Allocator(0, 4 << 20)
    if fmt == "split":
        desc = alloc.alloc(S.desc_table_size(SIZE), 16)
        avail = alloc.alloc(S.avail_size(SIZE), 2)
        used = alloc.alloc(S.used_size(SIZE), 4096)
        drv = DriverQueue(memory, SIZE, desc, avail, used, allocator=alloc, **flags)
        dev = DeviceQueue(memory, SIZE, desc, avail, used, **flags)
    else:
        desc = alloc.alloc(P.ring_size(SIZE), 16)
        avail = alloc.alloc(4, 4)
        used = alloc.alloc(4, 4)
        drv = PackedDriverQueue(memory, SIZE, desc, avail, used, allocator=alloc, **flags)
        dev = PackedDeviceQueue(memory, SIZE, desc, avail, used, **flags)
    bufs = [((alloc.alloc(64, 64), 64), (alloc.alloc(64, 64), 64)) for _ in range(64)]
    return memory, drv, dev, bufs


def run(fmt: str, flags: dict[str, bool], batch: int, requests: int) -> float:
    memory, drv, dev, bufs = make(fmt, flags)
    reply = b"r" * 64
    rounds = max(1, requests // batch)
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for _ in range(rounds):
            for i in range(batch):
                out, inb = bufs[i]
                drv.add_buf((out,), (inb,), i + 1)
            drv.kick_prepare()
            done = []
            while (chain := dev.pop()) is not None:
                chain.write(reply)
                done.append((chain, 64))
            dev.push_many(done)
            dev.needs_notification()
            n = 0
            while drv.get_buf() is not None:
                n += 1
            assert n == batch, (fmt, flags, batch, n)
        elapsed = time.perf_counter_ns() - t0
    finally:
        gc.enable()
    memory.close()
    return elapsed / (rounds * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20000)
    args = ap.parse_args()
    results: dict[tuple[str, str, int], list[float]] = {}
    for rnd in range(args.rounds):
        order = ("split", "packed") if rnd % 2 == 0 else ("packed", "split")
        for name, flags in CONFIGS.items():
            for batch in BATCHES:
                for fmt in order:
                    results.setdefault((fmt, name, batch), []).append(
                        run(fmt, flags, batch, args.requests))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    print(f"ns per request (min / median / max over {args.rounds} alternating rounds, "
          f"{args.requests} requests each; ring of {SIZE})")
    print(f"{'config':<20} {'batch':>5}  {'split':>20}  {'packed':>20}  "
          f"{'packed/split [range]':>22}  verdict")
    for name in CONFIGS:
        for batch in BATCHES:
            split = results[("split", name, batch)]
            packed = results[("packed", name, batch)]
            ratio = Ratio.of(packed, split)
            verdict = {"ok": "packed faster", "worse": "packed slower"}.get(
                ratio.verdict(higher_is_better=False), ratio.verdict(higher_is_better=False))
            print(f"{name:<20} {batch:>5}  {Spread.of(split).show():>20}  "
                  f"{Spread.of(packed).show():>20}  {ratio.show():>22}  {verdict}")


if __name__ == "__main__":
    main()
