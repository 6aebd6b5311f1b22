"""``pyvirtio serve rng``: the entropy device (QEMU: vhost-user-rng-pci)."""

from __future__ import annotations

import argparse
from typing import Any

from pyvirtio.cli.serve import (
    attach_instructions,
    make_hostile,
    run_servers,
    transport_features,
)
from pyvirtio.device.rng import RngDevice
from pyvirtio.io.loop import EventLoop
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids


def register(kinds: Any, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser(
        "rng", parents=[common], help="entropy device (virtio-rng)",
        description="Serve a virtio entropy device: every buffer the guest posts is filled "
        "from the host's os.urandom (or a file), optionally no faster than a byte rate. "
        "Attach it to QEMU with vhost-user-rng-pci (UML has no virtio-rng driver).",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    p.add_argument("--rate-limit", type=float, metavar="BYTES_PER_S",
                   help="serve at most this many bytes per second")
    p.add_argument("--source", metavar="FILE",
                   help="read entropy from FILE instead of os.urandom (rewinds at the end)")
    p.set_defaults(func=run)


def file_source(path: str) -> Any:
    f = open(path, "rb")  # lives as long as the server

    def read(n: int) -> bytes:
        data = f.read(n)
        if len(data) < n:
            f.seek(0)
            data += f.read(n - len(data))
        return data

    return read


def run(args: argparse.Namespace) -> int:
    loop = EventLoop()
    # Before any socket is bound: a signal from then on shuts down cleanly.
    loop.stop_on_signals()
    kwargs: dict[str, Any] = {"rate_limit": args.rate_limit, "queue_size": args.queue_size,
                              "transport_features": transport_features(args)}
    if args.source:
        kwargs["source"] = file_source(args.source)

    def factory() -> RngDevice:
        device = RngDevice(**kwargs)
        device.reactor = loop
        make_hostile(device, args)
        return device

    server = VhostUserServer(args.socket, factory, loop)
    banner = (f"pyvirtio: virtio-rng on {args.socket}\n"
              + attach_instructions([server], ids.RNG, uml=False, packed=args.packed))
    return run_servers([server], loop, banner, args)
