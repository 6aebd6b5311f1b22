"""DevicePair: a pyvirtio driver and a pyvirtio device joined in memory.

The everyday way to test a device (with our driver) or a driver (with our device) before
meeting a real peer::

    with DevicePair(RngDevice()) as pair:
        rng = pair.probe()          # finds RngDriver by device id
        data = rng.read(64)

``transport`` puts the device behind a register model instead of the direct loopback
calls, the whole stack in one process as under a VMM: ``"pci-legacy"``, ``"pci-modern"``,
``"pci-transitional"`` (our driver then takes the modern interface), ``"mmio"`` (version 2)
or ``"mmio-legacy"`` (version 1). Our driver runs on the matching transport
(:mod:`pyvirtio.transport.virtio_pci`, :mod:`pyvirtio.transport.virtio_mmio`) over a
:class:`~pyvirtio.testing.vmm.VmmBus`; ``trace=True`` records every register access in
:attr:`DevicePair.trace`.
"""

from __future__ import annotations

from pyvirtio.device.base import VirtioDevice
from pyvirtio.driver.base import Driver, probe
from pyvirtio.errors import LocalError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.testing.vmm import VmmBus, plug
from pyvirtio.transport.loopback import LoopbackTransport
from pyvirtio.transport.mmio_device import VirtioMmioDevice
from pyvirtio.transport.pci_device import VirtioPciDevice
from pyvirtio.transport.register_model import RegisterModel, Registers, RegisterTrace
from pyvirtio.transport.virtio_mmio import VirtioMmio
from pyvirtio.transport.virtio_pci import VirtioPciTransport

DEFAULT_MEMORY = 16 << 20

#: every transport a DevicePair can use
TRANSPORTS = ("loopback", "pci-legacy", "pci-modern", "pci-transitional", "mmio",
              "mmio-legacy")
#: the transports that put the device behind a register model
REGISTER_TRANSPORTS = TRANSPORTS[1:]
LOW_RESERVED = 4096


class DevicePair:
    """``device`` plus a transport over fresh memfd-backed guest memory (``legacy``: the
    loopback transport is a legacy, pre-1.0 interface; ``transport``: see the module)."""

    transport: LoopbackTransport | VirtioPciTransport | VirtioMmio

    def __init__(self, device: VirtioDevice, memory_size: int = DEFAULT_MEMORY, *,
                 legacy: bool = False, transport: str = "loopback",
                 trace: bool = False) -> None:
        if transport not in TRANSPORTS:
            raise LocalError(f"unknown transport {transport!r}; one of {', '.join(TRANSPORTS)}")
        if legacy and transport != "loopback":
            raise LocalError("legacy= is for the loopback transport; the register transports "
                             "say it in their name (pci-legacy, mmio-legacy)")
        self.device = device
        self.kind = transport
        self.memory = GuestMemory.anonymous(memory_size)
        # Under a register model page 0 stays unused, as on a PC: a legacy queue PFN of 0
        # means "no ring", so no ring may start there.
        low = 0 if transport == "loopback" else LOW_RESERVED
        self.allocator = Allocator(low, memory_size - low)
        self.driver: Driver | None = None
        #: the register model the device sits behind (None on loopback)
        self.model: RegisterModel | None = None
        self.bus: VmmBus | None = None
        #: every register access, when ``trace`` is set
        self.trace: RegisterTrace | None = None
        if transport == "loopback":
            self.transport = LoopbackTransport(device, self.memory, self.allocator,
                                               legacy=legacy)
        else:
            self.transport = self._machine(transport, trace)

    def _machine(self, kind: str, trace: bool) -> VirtioPciTransport | VirtioMmio:
        model: VirtioPciDevice | VirtioMmioDevice
        if kind.startswith("pci"):
            model = VirtioPciDevice(self.device, self.memory, legacy=kind != "pci-modern",
                                    modern=kind != "pci-legacy")
        else:
            model = VirtioMmioDevice(self.device, self.memory,
                                     version=1 if kind == "mmio-legacy" else 2)
        self.model = model
        regs: Registers = model
        if trace:
            regs = self.trace = RegisterTrace(model)
        self.bus, transport = plug(model, self.memory, self.allocator, regs)
        return transport

    def probe(self, driver: type[Driver] | None = None, features: int | None = None) -> Driver:
        """Initialise the device with its registered driver (or ``driver``)."""
        import pyvirtio.driver.all  # noqa: F401 - registers every built-in driver

        self.driver = probe(self.transport, driver, features)
        return self.driver

    def remove(self, why: str = "the driver was removed") -> None:
        """Remove the driver and reset the device (it may be probed again)."""
        if self.driver is not None:
            self.driver.remove()
            self.driver.device.detach_queues(why)
            self.driver = None
        self.transport.reset()

    def close(self) -> None:
        self.remove("its DevicePair is closed")
        self.memory.close()

    def __enter__(self) -> DevicePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
