"""``pyvirtio join KIND``: join two guests' virtqueues (§9.2 of the virtio paper).

Each ``--socket`` is one side: a guest's front-end (UML ``virtio_uml``, QEMU vhost-user)
attaches there, sees a device of KIND, and what its driver makes available on a queue is
copied into the buffers the other guest's driver posted on the joined queue. No switch and no
device model in between (see :mod:`pyvirtio.device.join`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pyvirtio.cli.serve import attach_instructions, run_servers, transport_features
from pyvirtio.device.base import DEFAULT_QUEUE_SIZE, VirtioDevice
from pyvirtio.device.join import Join, Mapping, parse_features
from pyvirtio.device.net.endpoint import format_mac, parse_mac
from pyvirtio.errors import LocalError
from pyvirtio.io.loop import EventLoop
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids

DESCRIPTION = (
    "Join the virtqueues of two guests: each --socket is one side, served over vhost-user; "
    "what one guest's driver makes available on a queue is copied into the buffers the other "
    "guest's driver posted on the joined queue, and each used length the guest reads is "
    "exactly the bytes copied (a short or hostile sender never makes the other guest see "
    "stale bytes). No switch, no device model.")

EPILOG = """\
kinds:
  net      two sides; side 0's transmitq into side 1's receiveq and back. Both sides are
           offered the same features (MAC, STATUS, MRG_RXBUF, checksum and TSO offloads; no
           control queue). Where the two drivers took different features the virtio-net
           header is translated: header size and num_buffers (MRG_RXBUF), a partial
           checksum completed, a TSO frame segmented for a receiver without GUEST_CSUM or
           GUEST_TSO4/6; frame bytes are never parsed otherwise. A receiver that is up but
           out of buffers makes the sender wait (nothing lost); frames for a side with no
           driver up are dropped and counted.
  console  side i's port 0 transmitq (queue 1) into side j's port 0 receiveq (queue 0), both
           ways (hvc0 in a Linux guest); --map names other queue pairs. Bytes are copied as
           they are; a sender waits for the receiver's buffers, nothing is dropped.

feature negotiation:
  Every side is offered the same features; --withhold SIDE:FEATURES takes some away from one
  side (e.g. --withhold 1:guest_csum,guest_tso4,guest_tso6 stands for a guest that refuses
  received offloads). --multi-round also offers the experimental multi-round bit (49,
  docs/multi-round.md) so that drivers which follow it converge to the features both sides
  can use; Linux guests do not know it (they answer once) and the vhost-user server does not
  carry rounds yet, so over sockets it changes nothing.

hostile guests:
  A guest that posts malformed chains (out of its memory, looping, shorter than its header)
  breaks only its own queue (it needs a reset); one that disconnects leaves the other side
  waiting (console) or dropping (net) until a new guest attaches to that socket.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("join", help="join two guests' virtqueues (no switch, no device)",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("net", "console"), help="the device type both guests see")
    p.add_argument("--socket", action="append", required=True, metavar="PATH",
                   help="unix socket of one side (give it once per side, 2 for net)")
    p.add_argument("--map", action="append", metavar="S:Q>S:Q", default=None,
                   help="console: copy side S queue Q into side S queue Q (repeat; replaces "
                   "the default crosswise mapping)")
    p.add_argument("--mac", action="append", metavar="MAC",
                   help="net: the MAC address of each side (give it once per side)")
    p.add_argument("--withhold", action="append", metavar="SIDE:FEATURES", default=[],
                   help="do not offer FEATURES (names or bit numbers, comma separated) to "
                   "side SIDE")
    p.add_argument("--multi-round", action="store_true",
                   help="offer the experimental multi-round negotiation bit")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                   help=f"maximum virtqueue size offered (default {DEFAULT_QUEUE_SIZE})")
    p.add_argument("--no-event-idx", action="store_true", help="do not offer EVENT_IDX")
    p.add_argument("--no-indirect", action="store_true", help="do not offer INDIRECT_DESC")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=False,
                   help="offer the packed ring (default: not offered)")
    p.add_argument("--stats", action="store_true", help="print counters every second")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="do not print how to attach QEMU and UML")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (LocalError, OSError) as exc:
        print(f"pyvirtio join: {exc}", file=sys.stderr)
        return 2


def _withheld(items: list[str], names: dict[int, str]) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in items:
        side, sep, feats = item.partition(":")
        if not sep or not side.isdigit():
            raise LocalError(f"--withhold {item!r} is not SIDE:FEATURES")
        out[int(side)] = out.get(int(side), 0) | parse_features(feats, names)
    return out


def _always(device: VirtioDevice) -> Callable[[], VirtioDevice]:
    def factory() -> VirtioDevice:
        return device

    return factory


def _run(args: argparse.Namespace) -> int:
    sockets: list[str] = args.socket
    if len(set(sockets)) != len(sockets):
        raise LocalError("the same --socket was given twice")
    names = Join.feature_names_of(args.kind)
    macs = None
    if args.mac:
        if len(args.mac) != len(sockets):
            raise LocalError("give --mac once per --socket")
        macs = [parse_mac(m) for m in args.mac]
    join = Join(args.kind, len(sockets),
                mappings=[Mapping.parse(m) for m in args.map] if args.map else None,
                withhold=_withheld(args.withhold, names), macs=macs,
                multi_round=args.multi_round, queue_size=args.queue_size,
                transport_features=transport_features(args))
    loop = EventLoop()
    loop.stop_on_signals()
    servers: list[VhostUserServer] = []
    try:
        for side, path in zip(join.sides, sockets, strict=True):
            side.reactor = loop
            servers.append(VhostUserServer(path, _always(side), loop))
    except BaseException:
        for server in servers:
            server.close()
        loop.close()
        raise
    device_id = ids.NET if args.kind == "net" else ids.CONSOLE
    extra = ""
    if args.kind == "net":
        extra = ",vectors=0"
    banner = [f"pyvirtio: joining {len(sockets)} guests' virtio-{args.kind} queues",
              join.describe(),
              attach_instructions(servers, device_id, qemu_extra=extra, packed=args.packed,
                                  qemu=args.kind == "net")]
    if args.kind == "net":
        banner.append("(QEMU keeps its own copy of the MAC: add ,mac= "
                      + " / ".join(format_mac(s.mac) for s in join.sides  # type: ignore[union-attr]
                                   ) + " to each -device)")

    def tick() -> None:
        if args.stats:
            print(join.stats_table() + "\n", flush=True)

    return run_servers(servers, loop, "\n".join(banner), args, on_tick=tick)
