"""``pyvirtio serve net``: a virtual Ethernet switch whose ports are virtio-net devices.

Every ``--socket`` is one port: a :class:`~pyvirtio.device.net.NetDevice` served over
vhost-user to one guest at a time (QEMU ``-netdev vhost-user`` or UML ``virtio_uml``). All
ports, and an optional ``--tap`` into the host kernel, hang off one learning
:class:`~pyvirtio.device.net.switch.Switch` and share one event loop, so a frame goes from one
guest's transmit buffers to the other guest's receive buffers with a single copy.

MAC addresses: ``--mac`` given once is a base, incremented by one per socket (the first
socket gets the base itself); given once per socket, each socket gets its own. The default
base is ``02:70:79:76:00:01`` (locally administered; ``70:79:76`` is "pyv"). QEMU keeps its
own copy of the NIC's config space, so the printed ``-device virtio-net-pci,...,mac=``
carries the same address; UML reads it from our device. It also carries ``vectors=0``:
QEMU 7.2 under TCG crashes when a vhost-user virtio-net-pci uses MSI-X (docs/peers.md).

Capture: ``--pcap FILE`` writes every frame that enters the switch once (whichever port it
came from) to FILE; if FILE contains ``{port}``, one file per port instead (``vm0``,
``vm1``... and the tap's name), each holding that port's frames in both directions, as
``tcpdump -i`` on a bridge port would. Frames are written without the virtio-net header;
TSO frames appear whole (up to 64 KiB), as on a host interface.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.cli.serve import (
    add_poll_option,
    make_hostile,
    poll_max,
    run_servers,
    transport_features,
)
from pyvirtio.core.features import describe
from pyvirtio.device.net import NetDevice
from pyvirtio.device.net.endpoint import format_mac, parse_mac
from pyvirtio.device.net.pcap import PcapWriter
from pyvirtio.device.net.switch import Switch, SwitchPort
from pyvirtio.device.net.tap import Tap, TapBackend
from pyvirtio.errors import LocalError
from pyvirtio.guest.qemu import qemu_args, qemu_memory_args
from pyvirtio.guest.uml import uml_args
from pyvirtio.io.loop import EventLoop
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids
from pyvirtio.spec import status as S

DEFAULT_MAC_BASE = "02:70:79:76:00:01"
STATS_COLUMNS = ("port", "state", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "drops",
                 "errors", "filtered", "queued")


def register(kinds: Any, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser(
        "net", parents=[common], help="virtual Ethernet switch of virtio-net ports",
        description="A virtual Ethernet switch whose ports are virtio-net devices served over "
        "vhost-user, one guest per --socket, all on one event loop; --tap adds the host "
        "kernel as another port. Prints how to attach each port to QEMU and UML.",
        epilog="MAC addresses: --mac once is a base incremented per socket (default "
        f"{DEFAULT_MAC_BASE}, {DEFAULT_MAC_BASE[:-2]}02, ...); --mac once per socket sets "
        "each. Capture: --pcap FILE records every frame entering the switch once; a FILE "
        "containing {port} gives one file per port (vm0, vm1, ... and the tap's name) with "
        "both directions. --stats columns are from each guest's point of view: rx "
        "delivered to it, tx sent by it, drops lost on the way to it (queue full, too big "
        "for its buffers), errors malformed frames it sent and receive buffers too small "
        "for a header, filtered refused by its receive filter, queued waiting for its "
        "receive buffers. Ctrl-C or SIGTERM closes the captures and the tap and removes "
        "the sockets.",
    )
    p.add_argument("--socket", action="append", required=True, metavar="PATH",
                   help="unix socket of one switch port (repeat for more ports)")
    p.add_argument("--tap", metavar="IFNAME",
                   help="add a port to the host kernel through tap IFNAME (created in this "
                   "network namespace if it does not exist; configure it with ip)")
    p.add_argument("--mac", action="append", metavar="MAC",
                   help="MAC base (once) or one MAC per socket (repeated)")
    p.add_argument("--pcap", metavar="FILE",
                   help="capture frames in pcap format (FILE may contain {port})")
    add_poll_option(p)
    p.add_argument("--stats", action="store_true",
                   help="print a per-port table (frames, bytes, drops) every second")
    p.add_argument("--mtu", type=int, metavar="BYTES",
                   help="offer VIRTIO_NET_F_MTU with this MTU to the guests")
    p.add_argument("--no-offloads", action="store_true",
                   help="offer no checksum or segmentation offloads (every frame is a "
                   "complete, MTU-sized frame)")
    p.add_argument("--queue-frames", type=int, metavar="N",
                   help="frames queued per port while its guest has no receive buffers "
                   "(default 256; beyond that they are dropped)")
    p.set_defaults(func=run)


def port_macs(given: list[str] | None, count: int) -> list[bytes]:
    """The MAC of each of ``count`` sockets from the ``--mac`` options (see --help)."""
    values = given or [DEFAULT_MAC_BASE]
    if len(values) == 1:
        base = int.from_bytes(parse_mac(values[0]), "big")
        macs = [((base + i) & (1 << 48) - 1).to_bytes(6, "big") for i in range(count)]
    elif len(values) == count:
        macs = [parse_mac(v) for v in values]
    else:
        raise LocalError(f"--mac was given {len(values)} times for {count} sockets: give it "
                         "once (a base) or once per socket")
    for mac in macs:
        if mac[0] & 1:
            raise LocalError(f"{format_mac(mac)} is a multicast address, not a NIC's")
    if len(set(macs)) != len(macs):
        raise LocalError("two sockets would get the same MAC address")
    return macs


@dataclass
class Port:
    """One switch port as the CLI shows it."""

    name: str
    port: SwitchPort
    device: NetDevice | None = None
    server: VhostUserServer | None = None
    tap: TapBackend | None = None
    shown: dict[str, object] = field(default_factory=dict)  # what was last printed

    def state(self) -> str:
        if self.tap is not None:
            return "tap"
        assert self.device is not None
        status = self.device.status
        if status & S.DEVICE_NEEDS_RESET:
            return "needs-reset"
        if status & S.DRIVER_OK:
            return "up"
        return "waiting"

    def row(self) -> tuple[str, ...]:
        s = self.port.stats
        drops = s.drops
        errors = filtered = 0
        if self.device is not None:
            d = self.device.stats
            drops += d.rx_dropped + d.tx_dropped
            errors = d.tx_errors + d.rx_bad_buffers
            filtered = d.rx_filtered
        elif self.tap is not None:
            drops += self.tap.rx_dropped
            errors = self.tap.tx_errors
        return (self.name, self.state(), str(s.rx_frames), str(s.rx_bytes),
                str(s.tx_frames), str(s.tx_bytes), str(drops), str(errors), str(filtered),
                str(len(self.port.queue)))

    def events(self) -> list[str]:
        """Lines for what changed since the last call: a guest came up or went away, a
        device needs a reset, a new reason for a dropped frame."""
        out = []
        state = self.state()
        previous = self.shown.get("state")
        if state != previous:
            self.shown["state"] = state
            if state == "up" and self.device is not None:
                names = describe(self.device.driver_features, NetDevice.feature_names)
                out.append(f"port {self.name}: guest driver ready, features {names}")
            elif state == "needs-reset" and self.device is not None:
                problem = self.device.problems[-1] if self.device.problems else "?"
                out.append(f"port {self.name}: device needs reset: {problem}")
            elif state == "waiting" and previous is not None:
                out.append(f"port {self.name}: waiting for a guest")
        source: Any = self.device if self.device is not None else self.tap
        error = getattr(source, "last_error", None)
        if error is not None and error != self.shown.get("error"):
            self.shown["error"] = error
            out.append(f"port {self.name}: dropped a frame: {error}")
        return out


def stats_table(ports: list[Port], switch: Switch) -> str:
    """The ``--stats`` table: one row per port, counters from the guest's point of view
    (rx: delivered to it, tx: sent by it); drops: frames lost on the way to it (queue full,
    too big for its buffers...); errors: malformed frames it sent and receive buffers too
    small for a header; filtered: frames its receive filter refused."""
    rows = [STATS_COLUMNS, *(p.row() for p in ports)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(STATS_COLUMNS))]
    lines = ["  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                       for i, c in enumerate(r)) for r in rows]
    lines.append(f"learned {sum(1 for _ in switch.fdb())} addresses, flooded "
                 f"{switch.flooded} frames")
    return "\n".join(lines)


def attach_lines(ports: list[Port], macs: list[bytes], packed: bool = False) -> str:
    lines = ["QEMU (7.2; guest RAM must be shared, add once): "
             + shlex.join(qemu_memory_args())]
    packed_on = ",packed=on" if packed else ""
    for i, (p, mac) in enumerate(zip((p for p in ports if p.server), macs, strict=True)):
        assert p.server is not None
        qargs = qemu_args(p.server.path, ids.NET, chardev_id=f"vu{i}",
                                   extra=f",mac={format_mac(mac)},vectors=0{packed_on}")
        lines.append(f"port {p.name} ({format_mac(mac)}, {p.server.path}):")
        lines.append("  QEMU: " + shlex.join(qargs))
        lines.append("  UML:  " + shlex.join(uml_args(p.server.path, ids.NET)))
    return "\n".join(lines)


def _always(device: NetDevice) -> Callable[[], NetDevice]:
    def factory() -> NetDevice:
        return device

    return factory


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (LocalError, OSError) as exc:
        print(f"pyvirtio serve net: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    sockets: list[str] = args.socket
    if len(set(sockets)) != len(sockets):
        raise LocalError("the same --socket was given twice")
    macs = port_macs(args.mac, len(sockets))
    per_port_pcap = bool(args.pcap) and "{port}" in args.pcap
    captures: list[PcapWriter] = []
    servers: list[VhostUserServer] = []
    ports: list[Port] = []
    tap: TapBackend | None = None
    loop = EventLoop()
    # Before any socket is bound: a signal from then on shuts down cleanly.
    loop.stop_on_signals()

    def capture_for(name: str) -> PcapWriter | None:
        if not per_port_pcap:
            return None
        writer = PcapWriter(args.pcap.replace("{port}", name))
        captures.append(writer)
        return writer

    def cleanup() -> None:
        if tap is not None:
            tap.close()
        for writer in captures:
            writer.close()

    try:
        switch_kwargs: dict[str, Any] = {}
        if args.queue_frames is not None:
            switch_kwargs["queue_frames"] = args.queue_frames
        if args.pcap and not per_port_pcap:
            writer = PcapWriter(args.pcap)
            captures.append(writer)
            switch_kwargs["capture"] = writer
        switch = Switch(**switch_kwargs)
        for i, (path, mac) in enumerate(zip(sockets, macs, strict=True)):
            name = f"vm{i}"
            device = NetDevice(mac, name=name, mtu=args.mtu, offloads=not args.no_offloads,
                               queue_size=args.queue_size,
                               transport_features=transport_features(args))
            device.reactor = loop
            make_hostile(device, args)
            device.poll_max = poll_max(args)
            port = switch.add_port(device, name, capture=capture_for(name))
            # One device per port for the server's lifetime: reset between front-ends, so
            # the switch port (and what it learned) outlives a guest's reboot.
            server = VhostUserServer(path, _always(device), loop)
            servers.append(server)
            ports.append(Port(name, port, device=device, server=server))
        if args.tap:
            tap = TapBackend(Tap.open(args.tap), loop)
            port = switch.add_port(tap, tap.name, capture=capture_for(tap.name))
            ports.append(Port(tap.name, port, tap=tap))
    except BaseException:
        for server in servers:
            server.close()
        cleanup()
        loop.close()
        raise

    banner = [f"pyvirtio: virtio-net switch with {len(ports)} port(s)"
              + (f", tap {tap.name}" if tap is not None else "")
              + (f", capturing to {args.pcap}" if args.pcap else "")]
    banner.append(attach_lines(ports, macs, packed=args.packed))

    def tick() -> None:
        for writer in captures:
            writer.flush()  # a reader of a live capture sees frames within a second
        for p in ports:
            for line in p.events():
                print(f"pyvirtio: {line}", flush=True)
        if args.stats:
            print(stats_table(ports, switch) + "\n", flush=True)

    on_tick: Callable[[], None] = tick
    return run_servers(servers, loop, "\n".join(banner), args, on_tick=on_tick,
                       cleanup=cleanup)
