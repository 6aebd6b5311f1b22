"""``pyvirtio balloon SOCKET``: change a served balloon's target or read its statistics.

The client of ``pyvirtio serve balloon --control SOCKET``. Exit status, for scripts: 0 done;
1 the request failed (bad socket, bad reply); 3 no guest is attached (a new target is kept
and applies when a guest attaches); 4 ``--wait`` ran out before the guest reached the target.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from pyvirtio.errors import VirtioError
from pyvirtio.io.balloon_control import request

EXIT_FAILED, EXIT_NOT_ATTACHED, EXIT_WAIT_TIMEOUT = 1, 3, 4
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIB = 1 << 20


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096``, ``1.5G`` (binary units, an optional ``iB``/``B``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G, 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def register(sub: Any) -> None:
    p = sub.add_parser("balloon", help="set a served balloon's target, read its statistics",
                       description=__doc__)
    p.add_argument("socket", metavar="SOCKET", help="the control socket of pyvirtio serve "
                   "balloon (--control)")
    p.add_argument("--target", type=parse_size, metavar="SIZE",
                   help="balloon size to ask the guest for (e.g. 64M; 0 gives it all back)")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="with --target: wait until the guest's balloon reaches it")
    p.add_argument("--stats", action="store_true", help="print the balloon's figures "
                   "(the default without --target)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.set_defaults(func=run)


def describe(reply: dict[str, Any]) -> str:
    """The human-readable figures of one reply."""
    lines = [
        f"guest attached: {'yes' if reply.get('attached') else 'no'}",
        f"target: {reply.get('target', 0) / MIB:.1f} MiB  actual: "
        f"{reply.get('actual', 0) / MIB:.1f} MiB",
        f"host memory reclaimed: {reply.get('discarded', 0) / MIB:.1f} MiB discarded "
        f"(free page reports: {reply.get('reported', 0) / MIB:.1f} MiB); guest RAM occupies "
        f"{reply.get('host_allocated', 0) / MIB:.1f} MiB of host memory",
    ]
    stats = reply.get("stats") or {}
    if stats:
        lines.append("guest: " + "  ".join(
            f"{k} {v / MIB:.1f} MiB" if k in ("free", "total", "available", "caches",
                                              "swap_in", "swap_out") else f"{k} {v}"
            for k, v in stats.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if args.target is not None:
            reply = request(args.socket, "target", timeout=2.0, bytes=args.target)
        else:
            reply = request(args.socket, "stats", timeout=2.0)
        if not reply.get("ok"):
            print(f"pyvirtio balloon: {reply.get('error')}", file=sys.stderr)
            return EXIT_FAILED
        status = 0
        if not reply.get("attached"):
            print("pyvirtio balloon: no guest is attached"
                  + ("; the target is kept for the next guest" if args.target is not None
                     else ""), file=sys.stderr)
            status = EXIT_NOT_ATTACHED
        elif args.target is not None and args.wait:
            deadline = time.monotonic() + args.wait
            want = reply["target"]
            while reply.get("actual") != want:
                if time.monotonic() >= deadline:
                    print(f"pyvirtio balloon: the guest's balloon is at "
                          f"{reply.get('actual', 0) / MIB:.1f} MiB, not the "
                          f"{want / MIB:.1f} MiB target, after {args.wait} s", file=sys.stderr)
                    status = EXIT_WAIT_TIMEOUT
                    break
                time.sleep(0.1)
                reply = request(args.socket, "stats", timeout=2.0)
        print(json.dumps(reply) if args.json else describe(reply))
        return status
    except (VirtioError, OSError) as exc:
        print(f"pyvirtio balloon: {exc}", file=sys.stderr)
        return EXIT_FAILED
