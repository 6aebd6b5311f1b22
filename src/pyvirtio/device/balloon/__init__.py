"""virtio-balloon, host side: :class:`BalloonDevice` and its discard back-end."""

from pyvirtio.device.balloon.device import DEFAULT_FEATURES, STAT_NAMES, BalloonDevice
from pyvirtio.device.balloon.discard import PageDiscarder, allocated_bytes

__all__ = ["DEFAULT_FEATURES", "STAT_NAMES", "BalloonDevice", "PageDiscarder",
           "allocated_bytes"]
