"""What the device-side register models share (virtio-pci legacy and modern, virtio-mmio).

A register model puts any :class:`~pyvirtio.device.base.VirtioDevice` behind the register
interface a VMM exposes. It is sans-I/O: a register access comes in as
``read(space, offset, size)`` or ``write(space, offset, size, value)``; its effects go out as
calls on the device (features, status, config, ``start_queue`` with the guest memory passed
in, ``kick``) and as interrupts: the INTx/interrupt line level through :attr:`on_irq` and
MSI-X messages through :attr:`on_msi`. No fds, no threads, no sleeping.

The driver side is untrusted. An access the spec forbids (a read-only register written, a
wrong width, a misaligned offset, an out-of-range queue selector, a ring outside guest
memory, a queue size of 0 or not a power of two, features written after FEATURES_OK...) is
ignored or refused as the spec says, and recorded in :attr:`RegisterModel.problems` with the
culprit; it never raises out of ``read``/``write``.

Spaces are named strings, so that a register-level trace of one side can be compared with
another's: ``"config"`` and ``"bar0"``..``"bar5"`` on PCI, ``"mmio"`` on virtio-mmio.
:class:`RegisterTrace` records every access as an :class:`Access`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvirtio.device.base import VirtioDevice
from pyvirtio.errors import PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec import features as F
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S

log = logging.getLogger("pyvirtio.transport.registers")

#: MSI-X "no vector" (both PCI layouts)
NO_VECTOR = 0xFFFF

#: how many problems a model keeps (a hostile driver must not grow memory without bound)
MAX_PROBLEMS = 1000


@dataclass(frozen=True, slots=True)
class Access:
    """One register access: ``value`` is what was written, or what the read returned."""

    space: str
    offset: int
    size: int
    value: int
    write: bool

    def __str__(self) -> str:
        op = "w" if self.write else "r"
        return f"{op} {self.space}+0x{self.offset:x}/{self.size} = 0x{self.value:x}"


class Registers(Protocol):
    """Anything that answers register accesses: a model or a wrapper around one."""

    def read(self, space: str, offset: int, size: int) -> int: ...

    def write(self, space: str, offset: int, size: int, value: int) -> None: ...


class RegisterTrace:
    """Forwards accesses to ``inner`` and records each one in :attr:`accesses`."""

    def __init__(self, inner: Registers) -> None:
        self.inner = inner
        self.accesses: list[Access] = []

    def read(self, space: str, offset: int, size: int) -> int:
        value = self.inner.read(space, offset, size)
        self.accesses.append(Access(space, offset, size, value, False))
        return value

    def write(self, space: str, offset: int, size: int, value: int) -> None:
        self.accesses.append(Access(space, offset, size, value, True))
        self.inner.write(space, offset, size, value)


@dataclass
class PendingQueue:
    """A queue's registers as the driver programs them, before (and while) it runs."""

    size: int
    desc: int = 0
    avail: int = 0
    used: int = 0
    vector: int = NO_VECTOR


def _ignore_level(level: bool) -> None:
    pass


def _ignore_vector(vector: int) -> None:
    pass


def all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class RegisterModel:
    """The state and rules every register layout shares. Subclasses decode offsets."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, name: str) -> None:
        self.device = device
        self.memory = memory
        self.name = name
        #: forbidden accesses seen, oldest first: the first :data:`MAX_PROBLEMS` of them
        self.problems: list[str] = []
        #: how many forbidden accesses were seen in all
        self.problem_count = 0
        #: the interrupt line's level changed (INTx on PCI without MSI-X; virtio-mmio's line)
        self.on_irq: Callable[[bool], None] = _ignore_level
        #: an MSI-X message for ``vector`` (PCI with MSI-X enabled)
        self.on_msi: Callable[[int], None] = _ignore_vector
        self.isr = 0
        self.irq_level = False
        self.queue_sel = 0
        self.queues = [PendingQueue(q.max_size) for q in device.queues]
        self.config_vector = NO_VECTOR
        device.memory = memory
        device.notify_queue = self._queue_interrupt
        device.notify_config = self._config_interrupt

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.device!r})"

    # ---- recording ----------------------------------------------------------------------

    def problem(self, message: str) -> None:
        """Record a forbidden access by the driver (the culprit) and carry on."""
        text = f"{self.name}: {message}"
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        log.debug("%s", text)

    # ---- interrupts ---------------------------------------------------------------------

    def msix_enabled(self) -> bool:
        """Whether interrupts go out as MSI-X messages instead of the line (PCI only)."""
        return False

    def line_enabled(self) -> bool:
        """Whether a pending ISR bit drives the interrupt line (not with MSI-X on, nor on
        PCI with INTx disabled in the command register)."""
        return not self.msix_enabled()

    def _queue_interrupt(self, index: int) -> None:
        self._interrupt(1, self.queues[index].vector if 0 <= index < len(self.queues)
                        else NO_VECTOR)

    def _config_interrupt(self) -> None:
        self._interrupt(2, self.config_vector)

    def _interrupt(self, isr_bit: int, vector: int) -> None:
        self.isr |= isr_bit
        if self.msix_enabled():
            if vector != NO_VECTOR:
                self.on_msi(vector)
            return
        self._update_line()

    def _update_line(self) -> None:
        level = bool(self.isr) and self.line_enabled()
        if level != self.irq_level:
            self.irq_level = level
            self.on_irq(level)

    def take_isr(self) -> int:
        """Read-to-clear ISR: the bits, now cleared, and the line lowered."""
        isr, self.isr = self.isr, 0
        self._update_line()
        return isr

    # ---- shared register semantics ------------------------------------------------------

    def queue(self) -> PendingQueue | None:
        """The selected queue's registers, or None when the selector is out of range."""
        if 0 <= self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    def queue_running(self, index: int) -> bool:
        return self.device.queues[index].ring is not None

    def write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        self.device.set_status(value)

    def reset(self) -> None:
        """Device reset (status 0 written): the device and every register go back to their
        initial values, the line is lowered."""
        self.device.reset()
        self.isr = 0
        self.queue_sel = 0
        self.queues = [PendingQueue(q.max_size) for q in self.device.queues]
        self.config_vector = NO_VECTOR
        self._update_line()

    def features_final(self) -> bool:
        """Features may no longer change: FEATURES_OK (or, legacy, DRIVER_OK) is set."""
        return bool(self.device.status & (S.FEATURES_OK | S.DRIVER_OK))

    def write_driver_features(self, features: int) -> None:
        if self.features_final():
            self.problem(f"driver features 0x{features:x} written at status "
                         f"{S.describe(self.device.status)}, after the features were final; "
                         "ignored")
            return
        self.device.set_driver_features(features)

    def write_feature_word(self, select: int, value: int) -> None:
        """The driver wrote 32 feature bits through the select window (modern PCI, MMIO)."""
        if select >= 2:
            if value:
                self.problem(f"driver features 0x{value:x} written to word {select}: only 64 "
                             "feature bits exist; ignored")
            return
        shift = 32 * select
        features = (self.device.driver_features & ~(0xFFFF_FFFF << shift)) | value << shift
        self.write_driver_features(features)

    def valid_queue_size(self, index: int, size: int) -> str | None:
        """Why ``size`` cannot run queue ``index``, or None."""
        limit = self.device.queues[index].max_size
        if size == 0:
            return "size 0"
        if size > limit:
            return f"size {size} exceeds the maximum {limit}"
        # Only a packed ring the device offered may have any size (§2.8): bits the driver
        # wrote without an offer do not count.
        packed = (self.device.driver_features & self.device.offered_features) >> F.RING_PACKED & 1
        if not packed and not SP.is_valid_queue_size(size):
            return f"size {size} is not a power of two"
        return None

    def start_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> bool:
        """Start queue ``index`` on the driver's ring addresses; a refused queue stays
        stopped and the reason is recorded. Returns whether it runs."""
        why = self.valid_queue_size(index, size)
        if why is None:
            try:
                self.device.start_queue(index, size, desc, avail, used)
                return True
            except PeerError as exc:
                why = str(exc)
        self.problem(f"queue {index} not enabled: {why}")
        return False

    def stop_queue(self, index: int) -> None:
        self.device.stop_queue(index)

    def kick(self, index: int) -> None:
        if not 0 <= index < len(self.queues):
            self.problem(f"notification for queue {index}, which does not exist "
                         f"(the device has {len(self.queues)})")
            return
        self.device.kick(index)

    def config_read(self, offset: int, size: int) -> int:
        """Device configuration bytes as a little-endian number; all ones outside it."""
        config = self.device.config
        if offset < 0 or offset + size > len(config):
            self.problem(f"{size}-byte config read at {offset} is outside the "
                         f"{len(config)}-byte device configuration")
            return all_ones(size)
        return int.from_bytes(self.device.read_config(offset, size), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        try:
            self.device.write_config(offset, value.to_bytes(size, "little"))
        except PeerError as exc:
            self.problem(f"config write refused: {exc}")
