"""Shared helpers for the virtio-console tests."""

from __future__ import annotations

from pyvirtio.driver.console import ConsoleDriver


class ShyDriver(ConsoleDriver):
    """A guest that posts receive buffers only when told to (fill_receive)."""

    rx_buffers = 0
    refill = False
