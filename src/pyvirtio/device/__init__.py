"""The host side: the device framework and one module per device type."""

from pyvirtio.device.base import ConfigAccessError, QueueState, VirtioDevice

__all__ = ["ConfigAccessError", "QueueState", "VirtioDevice"]
