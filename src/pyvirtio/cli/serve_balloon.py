"""``pyvirtio serve balloon``: the memory balloon (User-Mode Linux: virtio_uml device id 5;
QEMU 7.2 has no vhost-user balloon front-end)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyvirtio.cli.balloon import MIB, parse_size
from pyvirtio.cli.serve import (
    attach_instructions,
    make_hostile,
    run_servers,
    transport_features,
)
from pyvirtio.device.balloon import DEFAULT_FEATURES, BalloonDevice
from pyvirtio.io.balloon_control import ControlServer
from pyvirtio.io.loop import EventLoop
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import balloon as B
from pyvirtio.spec import ids


def register(kinds: Any, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser(
        "balloon", parents=[common], help="memory balloon (virtio-balloon)",
        description="Serve a virtio memory balloon: pages the guest inflates or reports free "
        "are punched out of its shared memory, so the host gets them back. Change the "
        "target at run time with `pyvirtio balloon CONTROL --target SIZE`.",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="vhost-user socket")
    p.add_argument("--control", metavar="PATH",
                   help="control socket for `pyvirtio balloon` (default: SOCKET.ctl)")
    p.add_argument("--target", type=parse_size, default=0, metavar="SIZE",
                   help="initial balloon size (default 0)")
    p.add_argument("--stats", action="store_true",
                   help="print target, actual, host memory reclaimed and the guest's "
                   "statistics once a second")
    p.add_argument("--no-reporting", action="store_true",
                   help="do not offer free page reporting")
    p.set_defaults(func=run)


def stats_line(snap: dict[str, Any]) -> str:
    s = snap.get("stats") or {}

    def mib(v: object) -> str:
        return f"{v / MIB:.1f}" if isinstance(v, int) else "-"

    return (f"target {mib(snap['target'])} MiB  actual {mib(snap['actual'])} MiB  "
            f"reclaimed {mib(snap['discarded'])} MiB  host {mib(snap['host_allocated'])} MiB  "
            f"guest free {mib(s.get('free'))} avail {mib(s.get('available'))} "
            f"swap in/out {s.get('swap_in', '-')}/{s.get('swap_out', '-')} "
            f"majflt {s.get('major_faults', '-')}")


def run(args: argparse.Namespace) -> int:
    loop = EventLoop()
    features = DEFAULT_FEATURES
    if args.no_reporting:
        features &= ~(1 << B.VIRTIO_BALLOON_F_REPORTING)
    device = BalloonDevice(args.target, features=features, queue_size=args.queue_size,
                           transport_features=transport_features(args))
    device.reactor = loop
    make_hostile(device, args)

    def factory() -> BalloonDevice:
        return device  # one device: the target survives guests coming and going

    server = VhostUserServer(args.socket, factory, loop)
    control_path = args.control or f"{args.socket}.ctl"
    control = ControlServer(control_path, device, loop)
    banner = (f"pyvirtio: virtio-balloon on {args.socket}, control socket {control_path}\n"
              + attach_instructions([server], ids.BALLOON, qemu=False)
              + f"\nChange the target: pyvirtio balloon {control_path} --target 64M")

    def tick() -> None:
        device.request_stats()
        if args.stats:
            print(stats_line(device.snapshot()), flush=True)

    def cleanup() -> None:
        control.close()

    try:
        return run_servers([server], loop, banner, args, on_tick=tick, tick=1.0,
                           cleanup=cleanup)
    finally:
        sys.stdout.flush()
