"""Fixtures and policy shared by the whole suite (see tests/peers.py for the policy on
missing real peers: skip locally, fail under CI)."""

from __future__ import annotations

import compileall
import sys
from pathlib import Path

import pytest

from helpers.ceph import ceph_cluster  # noqa: F401 - the session's Ceph cluster fixture
from peers import require_binaries

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile pyvirtio and the helpers child processes import, once per run.

    Integration tests start a few hundred Python children (``pyvirtio serve``, device
    factories, process pairs). Under PYTHONDONTWRITEBYTECODE (set in some CI images) each of
    them would compile every module from source, which costs more CPU than the child's real
    work; Python still *reads* up-to-date ``__pycache__`` files under that setting, and
    ignores stale ones (they are checked against the source's mtime)."""
    if sys.flags.dont_write_bytecode:
        for folder in (ROOT / "src", ROOT / "tests" / "integration"):
            compileall.compile_dir(folder, quiet=2)


@pytest.fixture
def require() -> object:
    """``require("qemu-system-x86_64", "linux.uml")`` inside a test."""
    return require_binaries
