"""Fixtures and policy shared by the whole suite (see tests/peers.py for the policy on
missing real peers: skip locally, fail under CI)."""

from __future__ import annotations

import pytest

from peers import require_binaries


@pytest.fixture
def require() -> object:
    """``require("qemu-system-x86_64", "linux.uml")`` inside a test."""
    return require_binaries
