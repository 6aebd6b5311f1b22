"""``pyvirtio serve DEVICE``: serve a virtio device to real guests over vhost-user.

Each device kind lives in its own module (``serve_rng``, ``serve_console``, ``serve_blk``,
``serve_net``) with a ``register(kinds, common)`` function; this module holds what they
share: the common options, printing how to attach QEMU and UML, and running the event loop
until Ctrl-C / SIGTERM with a clean shutdown (sockets removed, back-ends closed).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pyvirtio.device.base import DEFAULT_QUEUE_SIZE, DEFAULT_TRANSPORT_FEATURES, VirtioDevice
from pyvirtio.device.chaos import DEFAULT_RATE as DEFAULT_CHAOS_RATE
from pyvirtio.device.chaos import FAULTS, Chaos, parse_faults, parse_spec
from pyvirtio.errors import LocalError
from pyvirtio.guest.qemu import qemu_args, qemu_memory_args
from pyvirtio.guest.uml import uml_args
from pyvirtio.io.loop import EventLoop
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import features as F
from pyvirtio.spec import ids

KINDS = ("serve_rng", "serve_console", "serve_blk", "serve_net", "serve_balloon")


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                        help=f"maximum virtqueue size offered (default {DEFAULT_QUEUE_SIZE})")
    common.add_argument("--no-event-idx", action="store_true",
                        help="do not offer VIRTIO_F_EVENT_IDX (notification suppression by index)")
    common.add_argument("--no-indirect", action="store_true",
                        help="do not offer VIRTIO_F_INDIRECT_DESC (indirect descriptor tables)")
    common.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                        help="offer VIRTIO_F_RING_PACKED, the packed virtqueue layout "
                        "(default: offer; QEMU uses it with the device property packed=on)")
    # SUPPRESS: given after the subcommand it counts, absent it leaves `pyvirtio -v serve`
    # alone (a subparser default would overwrite the top-level count).
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-v: connections, negotiated features; "
                        "-vv: every vhost-user message)")
    common.add_argument("--chaos", metavar="SEED[:RATE]", type=_checked(parse_spec),
                        help="hostile-device mode for hardening drivers: inject faults into "
                        "what the driver reads (bad used ids and lengths, double completions, "
                        "used idx jumps, wrong wrap counters, interrupt and event-index games, "
                        "config changes, NEEDS_RESET) into a fraction RATE of the requests "
                        f"(default {DEFAULT_CHAOS_RATE}), chosen by a generator seeded with SEED; "
                        "every fault is logged with the seed and the request number, and the "
                        "same seed and requests replay the same faults")
    common.add_argument("--chaos-faults", metavar="A,B,...", type=_checked(parse_faults),
                        help="the fault classes --chaos may inject (default: all): "
                        + ", ".join(FAULTS))
    common.add_argument("--chaos-after", metavar="N|signal", type=_after, default=0,
                        help="with --chaos: leave the first N requests alone; 'signal': leave "
                        "every request alone until SIGUSR2 (a harness arms the device once "
                        "its guest has booted; the log says N, which replays the run)")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="do not print how to attach QEMU and UML")
    parser = sub.add_parser(
        "serve", help="serve a virtio device to guests over vhost-user",
        description=__doc__.split("\n\n")[0] + " The server outlives its front-ends: when a "
        "guest goes away, the device is reset and the next guest may connect.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="DEVICE", required=True)
    import importlib

    for name in KINDS:
        try:
            module = importlib.import_module(f"pyvirtio.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pyvirtio.cli.{name}":
                raise
            continue
        module.register(kinds, common)


def add_poll_option(p: argparse.ArgumentParser) -> None:
    """``--poll-us``, for the devices whose queues carry requests (blk, net)."""
    p.add_argument("--poll-us", type=float, default=0.0, metavar="US",
                   help="adaptive polling: after a completion, look at the ring for a "
                   "self-tuning window of at most US microseconds before sleeping, so a "
                   "request that follows at once needs no kick or wake-up (costs CPU "
                   "while a guest is busy, none while idle; default 0: off)")


def poll_max(args: argparse.Namespace) -> float:
    """The adaptive polling bound ``--poll-us`` asks for, in seconds (0: no polling)."""
    if args.poll_us < 0:
        raise SystemExit("pyvirtio serve: --poll-us must not be negative")
    return float(args.poll_us) / 1e6


def transport_features(args: argparse.Namespace) -> int:
    """The transport feature offer the common options ask for."""
    features = DEFAULT_TRANSPORT_FEATURES
    if args.no_event_idx:
        features &= ~F.bit(F.EVENT_IDX)
    if args.no_indirect:
        features &= ~F.bit(F.INDIRECT_DESC)
    if not args.packed:
        features &= ~F.bit(F.RING_PACKED)
    return features


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a parser that raises LocalError."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except LocalError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _after(text: str) -> int | None:
    if text == "signal":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a request count or 'signal', not {text!r}")
    return value


def make_hostile(device: VirtioDevice, args: argparse.Namespace) -> None:
    """--chaos: give ``device`` its fault injector (:mod:`pyvirtio.device.chaos`)."""
    spec = getattr(args, "chaos", None)
    faults = getattr(args, "chaos_faults", None)
    if spec is None:
        if faults is not None:
            raise SystemExit("pyvirtio serve: --chaos-faults needs --chaos SEED[:RATE]")
        return
    seed, rate = spec
    after = getattr(args, "chaos_after", 0)
    chaos = device.chaos = Chaos(seed, rate, faults, after=after)
    if after is None:
        previous = signal.getsignal(signal.SIGUSR2)

        def arm(signum: int, frame: Any) -> None:
            chaos.arm()
            if callable(previous):
                previous(signum, frame)  # every device of this server is armed

        signal.signal(signal.SIGUSR2, arm)
    print(f"pyvirtio: hostile-device mode: {device.name}: {chaos!r}", file=sys.stderr,
          flush=True)


def attach_instructions(servers: Sequence[VhostUserServer], device_id: int,
                        qemu_extra: str = "", uml: bool = True, qemu: bool = True,
                        packed: bool = False) -> str:
    """The exact QEMU and UML command-line pieces that attach ``servers``; ``packed`` (the
    packed ring is offered) adds ``packed=on``, without which QEMU runs the split ring."""
    lines = []
    if packed:
        qemu_extra += ",packed=on"
    if qemu:
        qargs = list(qemu_memory_args())
        for i, server in enumerate(servers):
            qargs += qemu_args(server.path, device_id, chardev_id=f"vu{i}", extra=qemu_extra)
        lines.append("QEMU (7.2, shared guest RAM is required):")
        lines.append("  qemu-system-x86_64 ... " + shlex.join(qargs))
    if uml:
        lines.append("User-Mode Linux (one guest per socket):")
        for server in servers:
            lines.append("  linux.uml ... " + shlex.join(uml_args(server.path, device_id)))
    return "\n".join(lines)


def run_servers(servers: Sequence[VhostUserServer], loop: EventLoop, banner: str,
                args: argparse.Namespace, *, on_tick: Callable[[], None] | None = None,
                tick: float = 1.0, cleanup: Callable[[], None] | None = None) -> int:
    """Print ``banner`` (unless --quiet), then serve until SIGINT/SIGTERM; always clean up."""
    try:
        # Handlers first (the commands install them before binding; this is idempotent):
        # whoever reads the banner may signal us at once, and a signal before loop.run()
        # stays pending until run() sees it.
        loop.stop_on_signals()
        if not args.quiet:
            print(banner, flush=True)
        if on_tick is not None:
            def ticker() -> None:
                on_tick()
                loop.call_later(tick, ticker)

            loop.call_later(tick, ticker)
        loop.run()
        if loop.stop_reason and not args.quiet:
            print(f"pyvirtio: {loop.stop_reason}, shutting down", file=sys.stderr)
    finally:
        for server in servers:
            server.close()
        if cleanup is not None:
            cleanup()
        loop.close()
    return 0


def device_label(device_id: int) -> str:
    return f"virtio-{ids.name(device_id)}"
