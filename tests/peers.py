"""Whether the real peers a test needs are here: skip locally, fail under CI.

`make test` installs every peer. When one is missing on a developer's machine the test is
skipped with the reason (naming the Debian package); under CI (CI=true) the same is a
failure, so CI can never go green by skipping the real thing.
"""

from __future__ import annotations

import os
import shutil

import pytest

from pyvirtio.guest import MissingDependencyError, check_can_boot

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_binaries(*names: str) -> None:
    """Every binary is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        skip_or_fail(f"missing real peers: {', '.join(missing)} (make test installs them)")


def require_guest(*kinds: str) -> None:
    """Guests of each kind ("uml", "qemu") can boot here."""
    try:
        for kind in kinds:
            check_can_boot("uml" if kind == "uml" else "qemu")
    except MissingDependencyError as exc:
        skip_or_fail(str(exc))


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        skip_or_fail(f"{what} needs root")
