"""Fixtures and policy shared by the whole suite.

Integration tests need real peers (QEMU, User-Mode Linux, the cloud kernel...). `make test`
installs them; when one is missing locally the test is skipped with the reason, but under
CI (CI=true) a missing peer is a failure: CI must never go green by skipping the real thing.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binaries(*names: str) -> None:
    """Skip (locally) or fail (CI) unless every binary is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        message = f"missing real peers: {', '.join(missing)} (make test installs them)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def require() -> object:
    """``require("qemu-system-x86_64", "linux.uml")`` inside a test."""
    return require_binaries
