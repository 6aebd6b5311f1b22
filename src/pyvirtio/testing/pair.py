"""DevicePair: a pyvirtio driver and a pyvirtio device joined in memory.

The everyday way to test a device (with our driver) or a driver (with our device) before
meeting a real peer::

    with DevicePair(RngDevice()) as pair:
        rng = pair.probe()          # finds RngDriver by device id
        data = rng.read(64)
"""

from __future__ import annotations

from pyvirtio.device.base import VirtioDevice
from pyvirtio.driver.base import Driver, probe
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.transport.loopback import LoopbackTransport

DEFAULT_MEMORY = 16 << 20


class DevicePair:
    """``device`` plus a loopback transport over fresh memfd-backed guest memory
    (``legacy``: the transport is a legacy, pre-1.0 interface)."""

    def __init__(self, device: VirtioDevice, memory_size: int = DEFAULT_MEMORY, *,
                 legacy: bool = False) -> None:
        self.device = device
        self.memory = GuestMemory.anonymous(memory_size)
        self.allocator = Allocator(0, memory_size)
        self.transport = LoopbackTransport(device, self.memory, self.allocator, legacy=legacy)
        self.driver: Driver | None = None

    def probe(self, driver: type[Driver] | None = None, features: int | None = None) -> Driver:
        """Initialise the device with its registered driver (or ``driver``)."""
        import pyvirtio.driver.all  # noqa: F401 - registers every built-in driver

        self.driver = probe(self.transport, driver, features)
        return self.driver

    def close(self) -> None:
        if self.driver is not None:
            self.driver.remove()
            self.driver.device.detach_queues("its DevicePair is closed")
            self.driver = None
        self.transport.reset()
        self.memory.close()

    def __enter__(self) -> DevicePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
