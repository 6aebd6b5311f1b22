"""The guest side: the paper's driver API and one driver per device type."""

from pyvirtio.driver.base import (
    ConfigOps,
    Device,
    Driver,
    NoDriverError,
    Virtqueue,
    find_driver,
    probe,
    register_driver,
)

__all__ = [
    "ConfigOps",
    "Device",
    "Driver",
    "NoDriverError",
    "Virtqueue",
    "find_driver",
    "probe",
    "register_driver",
]
