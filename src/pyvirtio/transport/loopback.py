"""The loopback transport: a pyvirtio driver and a pyvirtio device in one process.

Both share one :class:`~pyvirtio.memory.GuestMemory`; config ops are method calls on the
device, a kick runs the device's queue handler, and the device's interrupts call the driver's
queue callbacks. Kicks and interrupts go through one FIFO of pending events, so a callback
that kicks again (a receive refill) does not re-enter a device that is still working: the
order of events is exactly what an interrupt-driven machine would see, just serialised.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pyvirtio.device.base import VirtioDevice
from pyvirtio.driver.base import ConfigOps, Virtqueue
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverRing


class LoopbackTransport(ConfigOps):
    """Driver-side config ops implemented by direct calls into ``device``."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, allocator: Allocator,
                 *, legacy: bool = False) -> None:
        self.device = device
        self._legacy = legacy
        self.device_id = device.device_id
        self.vendor_id = device.vendor_id
        self.memory = memory
        self.allocator = allocator
        self.vqs: dict[int, Virtqueue] = {}
        self._config_callback: Callable[[], None] | None = None
        self._events: deque[tuple[str, int]] = deque()
        self._running = False
        self.kicks = 0
        self.interrupts = 0
        self.config_interrupts = 0
        device.memory = memory
        device.notify_queue = self._device_interrupt
        device.notify_config = self._device_config_interrupt

    @property
    def legacy(self) -> bool:
        """Whether to behave as a legacy (pre-1.0) interface: no VERSION_1, no FEATURES_OK."""
        return self._legacy

    # config ops
    def get_features(self) -> int:
        return self.device.get_features()

    def set_features(self, features: int) -> None:
        self.device.set_driver_features(features)

    def get_status(self) -> int:
        return self.device.get_status()

    def set_status(self, status: int) -> None:
        self.device.set_status(status)
        if status == 0:
            self.vqs.clear()

    def read_config(self, offset: int, length: int) -> bytes:
        return self.device.read_config(offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        self.device.write_config(offset, data)

    def generation(self) -> int:
        return self.device.config_generation

    def queue_max_size(self, index: int) -> int:
        if 0 <= index < self.device.num_queues:
            return self.device.queues[index].max_size
        return 0

    def bind_queue(self, index: int, vq: Virtqueue) -> None:
        self.vqs[index] = vq

    def bind_config(self, callback: Callable[[], None] | None) -> None:
        self._config_callback = callback

    def queue_broken_reason(self, index: int) -> str | None:
        if 0 <= index < self.device.num_queues:
            ring = self.device.queues[index].ring
            return None if ring is None else ring.broken
        return None

    def setup_queue(self, index: int, ring: DriverRing) -> None:
        self.device.start_queue(index, ring.size, ring.desc_addr, ring.avail_addr,
                                ring.used_addr)

    def notify(self, index: int) -> None:
        self.kicks += 1
        self._post("kick", index)

    # device -> driver
    def _device_interrupt(self, index: int) -> None:
        self.interrupts += 1
        self._post("irq", index)

    def _device_config_interrupt(self) -> None:
        self.config_interrupts += 1
        self._post("config", -1)

    def _post(self, kind: str, index: int) -> None:
        self._events.append((kind, index))
        if self._running:
            return  # the outer dispatch loop will get to it
        self._running = True
        try:
            while self._events:
                what, idx = self._events.popleft()
                if what == "kick":
                    self.device.kick(idx)
                elif what == "config":
                    if self._config_callback is not None:
                        self._config_callback()
                else:
                    vq = self.vqs.get(idx)
                    if vq is not None:
                        vq.interrupt()
        finally:
            self._running = False
