"""The ``pyvirtio`` command line: thin argument parsing that builds objects and runs them.

Subcommands register themselves through :func:`add_subcommands`; each lives in its own module
under :mod:`pyvirtio.cli` so the parser stays small and protocol logic stays out of here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pyvirtio import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvirtio",
        description=(
            "virtio in Python, both ends of the ring: serve virtio devices to real Linux "
            "guests over vhost-user, or drive virtio devices yourself."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pyvirtio {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more logging (-v: info, -vv: per-message traces)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import pyvirtio.cli.balloon
    import pyvirtio.cli.demo
    import pyvirtio.cli.join
    import pyvirtio.cli.serve

    pyvirtio.cli.demo.register(sub)
    pyvirtio.cli.balloon.register(sub)
    pyvirtio.cli.serve.register(sub)
    pyvirtio.cli.join.register(sub)
    return parser


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    result: int = args.func(args)
    return result
