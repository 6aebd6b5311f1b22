"""``pyvirtio serve console``: the console device (virtio-console) with named ports.

Port 0 is the guest's console, ``/dev/hvc0``; each ``--port NAME=WHERE`` adds a named port
(``/dev/vport<D>p<N>`` in the guest, its name in ``/sys/class/virtio-ports/*/name``, which
is how guest agents find theirs). The host end of each port is this process's stdio, a
pseudo-terminal, or a listening unix socket (one client at a time).

QEMU 7.2 has no vhost-user front-end for console devices (its virtio-serial is emulated
inside QEMU), so the guests that attach this are User-Mode Linux guests
(``virtio_uml.device=SOCKET:3``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pyvirtio.cli.serve import (
    attach_instructions,
    make_hostile,
    run_servers,
    transport_features,
)
from pyvirtio.core.features import describe
from pyvirtio.device.console import ConsoleDevice, Port
from pyvirtio.device.console.ports import PtyPort, StdioPort, UnixSocketPort
from pyvirtio.errors import LocalError
from pyvirtio.io.loop import EventLoop
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids

DEFAULT_COLS, DEFAULT_ROWS = 80, 25

DESCRIPTION = """\
Serve a virtio console device over vhost-user. Port 0 is the guest's console, /dev/hvc0;
each --port NAME=WHERE adds a named port (/dev/vport<D>p<N> in the guest, its name in
/sys/class/virtio-ports/vport<D>p<N>/name, which is how guest agents find theirs). The host
end of a port is this process's stdio, a pseudo-terminal, or a listening unix socket (one
client at a time; guest output is dropped while no client is connected, and the guest sees
the port closed). The server outlives its guests: when one goes away the device is reset and
the next may connect. Stop it with Ctrl-C or SIGTERM; sockets are removed.

QEMU 7.2 has no vhost-user front-end for console devices (its virtio-serial is emulated
inside QEMU), so this attaches to User-Mode Linux guests: virtio_uml.device=SOCKET:3.
"""

EPILOG = """\
examples:
  pyvirtio serve console --socket /tmp/con.sock
      the guest's /dev/hvc0 on this terminal (line-buffered; Ctrl-C stops the server)
  pyvirtio serve console --socket /tmp/con.sock --console pty \\
          --port org.qemu.guest_agent.0=unix:/tmp/qga.sock
      hvc0 on a pseudo-terminal (attach with: screen /dev/pts/N), plus a named port whose
      host end is a unix socket (connect with: socat - UNIX-CONNECT:/tmp/qga.sock)
  linux.uml mem=256M ... virtio_uml.device=/tmp/con.sock:3
      a User-Mode Linux guest using it (its virtio_console module must be loaded)

logging: pyvirtio -v serve console ... (or -v after the subcommand) logs connections,
negotiated features and ports; -vv traces every vhost-user message.
"""


def register(kinds: Any, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser(
        "console", parents=[common], help="console device (virtio-console): hvc0 and named ports",
        description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="unix socket to listen on (the vhost-user front-end connects here)")
    p.add_argument("--console", default="stdio", metavar="WHERE",
                   help="host end of port 0, the guest's /dev/hvc0: stdio (default; this "
                   "process's stdin/stdout), pty (a new pseudo-terminal, its path is printed), "
                   "unix:PATH (a listening socket) or none (no console port)")
    p.add_argument("--port", action="append", default=[], metavar="NAME=WHERE",
                   help="add a named port; WHERE is unix:PATH, pty or stdio (repeatable; "
                   "ports are numbered in order after the console)")
    p.add_argument("--cols", type=int, metavar="N",
                   help="console width (default: the terminal's, when the console is stdio on "
                   f"a terminal, which is then followed as it resizes; else {DEFAULT_COLS})")
    p.add_argument("--rows", type=int, metavar="N",
                   help=f"console height (default: as for --cols; else {DEFAULT_ROWS})")
    p.add_argument("--no-multiport", action="store_true",
                   help="no control queue (VIRTIO_CONSOLE_F_MULTIPORT not offered): a single "
                   "console port, its size in the config space; --port is not allowed")
    p.add_argument("--resize-rows-first", action="store_true",
                   help="send console sizes as rows, cols: what Linux guests older than the "
                   "2025 virtio_console fix expect (the spec says cols, rows)")
    p.set_defaults(func=run)


def build_ports(args: argparse.Namespace) -> tuple[list[Port], int | None]:
    """The ports the options ask for, and the console port's id (None: no console)."""
    console = args.console
    if args.no_multiport:
        if args.port:
            raise LocalError("--port needs MULTIPORT: drop --no-multiport")
        if console == "none":
            raise LocalError("--console none leaves no port: without MULTIPORT the only port "
                             "is the console")
    specs: list[tuple[str, str | None, str]] = []
    if console != "none":
        specs.append((console, None, "--console"))
    seen: set[str] = set()
    for item in args.port:
        name, sep, where = item.partition("=")
        if not sep or not name or not where:
            raise LocalError(f"--port {item!r}: expected NAME=WHERE, e.g. "
                             "org.example.agent=unix:/tmp/agent.sock")
        if name in seen:
            raise LocalError(f"--port {item!r}: the name {name!r} is already used")
        seen.add(name)
        specs.append((where, name, f"--port {item!r}"))
    if not specs:
        raise LocalError("no ports: --console none needs at least one --port")
    if sum(1 for where, _, _ in specs if where == "stdio") > 1:
        raise LocalError("only one port can use stdio")
    ports: list[Port] = []
    try:
        for where, name, what in specs:
            ports.append(Port.parse(where, what=what, announce=False))
            ports[-1].name = name
    except BaseException:
        for port in ports:
            port.backend.close()
        raise
    return ports, (0 if console != "none" else None)


def terminal_size(ports: list[Port], console_port: int | None) -> tuple[int, int] | None:
    """The size of the terminal the console port is on, if it is on one."""
    if console_port is None:
        return None
    backend = ports[console_port].backend
    if not isinstance(backend, StdioPort):
        return None
    try:
        size = os.get_terminal_size(backend.out_fd)
    except OSError:
        return None
    return size.columns, size.lines


def describe_port(port: Port, multiport: bool) -> str:
    backend = port.backend
    if isinstance(backend, UnixSocketPort):
        host = f"unix socket {backend.path}"
    elif isinstance(backend, PtyPort):
        host = f"pseudo-terminal {backend.path}"
    elif isinstance(backend, StdioPort):
        host = "this process's stdin/stdout"
    else:
        host = backend.label
    if port.console:
        guest = "console, the guest's /dev/hvc0"
    elif port.name is not None:
        guest = (f"{port.name!r}, the guest's /dev/vport0p{port.id} (if this is its first "
                 "console device)")
    else:
        guest = f"unnamed, the guest's /dev/vport0p{port.id}"
    if not multiport:
        guest = "console, the guest's /dev/hvc0"
    return f"  port {port.id}: {guest} <-> {host}"


def run(args: argparse.Namespace) -> int:
    try:
        ports, console_port = build_ports(args)
    except (LocalError, OSError) as exc:
        print(f"pyvirtio serve console: {exc}", file=sys.stderr)
        return 2
    follow = args.cols is None and args.rows is None
    size = terminal_size(ports, console_port) if follow else None
    follow = follow and size is not None
    cols, rows = size if size is not None else (args.cols or DEFAULT_COLS,
                                                args.rows or DEFAULT_ROWS)
    multiport = not args.no_multiport
    loop = EventLoop()
    # Before any socket is bound: a signal from then on shuts down cleanly.
    loop.stop_on_signals()
    try:
        device = ConsoleDevice(
            ports, cols=cols, rows=rows, multiport=multiport, console_port=console_port,
            resize_rows_first=args.resize_rows_first, queue_size=args.queue_size,
            transport_features=transport_features(args),
        )
        # The back-ends run from now on, so host peers (socket clients, pty readers) may
        # attach before any guest does; one device serves every front-end in turn (it is
        # reset between them) so the ports and their host peers outlive a guest.
        device.reactor = loop
        make_hostile(device, args)
        server = VhostUserServer(args.socket, lambda: device, loop)
    except (LocalError, OSError) as exc:
        for port in ports:
            port.backend.close()
        loop.close()
        print(f"pyvirtio serve console: {exc}", file=sys.stderr)
        return 2

    features = describe(device.offered_features, ConsoleDevice.feature_names)
    lines = [f"pyvirtio: virtio-console on {args.socket}: {len(ports)} port"
             f"{'s' if len(ports) != 1 else ''}, {cols}x{rows}"
             f"{' (following the terminal)' if follow else ''}; offers {features}"]
    lines += [describe_port(port, multiport) for port in device.ports]
    lines.append(attach_instructions([server], ids.CONSOLE, qemu=False))
    lines.append("QEMU: 7.2 has no vhost-user front-end for console devices (its "
                 "virtio-serial is emulated inside QEMU); attach User-Mode Linux as above.")

    def on_tick() -> None:
        now = terminal_size(device.ports, console_port)
        if now is not None and now != (device.cols, device.rows):
            device.resize(*now)

    return run_servers([server], loop, "\n".join(lines), args,
                       on_tick=on_tick if follow else None, cleanup=device.close)
