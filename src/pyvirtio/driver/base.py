"""The paper's driver API in Python: config ops, virtqueue ops, and probe by device id.

Layering, as in Linux:

* a *transport* implements :class:`ConfigOps` (``virtio_config_ops``): features, status,
  config bytes, queue setup and notification, for one device it has found;
* :class:`Device` (``struct virtio_device``) is the driver's handle on that device and runs
  the initialisation sequence through the shared status rules;
* :class:`Virtqueue` (``virtqueue_ops``): add_buf / kick / get_buf / disable_cb / enable_cb,
  plus the callback the transport calls on an interrupt;
* :class:`Driver` subclasses register for device ids; :func:`probe` picks one and calls its
  :meth:`Driver.probe`.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

from pyvirtio.core import features as core_features
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverRing, driver_ring
from pyvirtio.ring.factory import driver_areas
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S

log = logging.getLogger("pyvirtio.driver")

Callback = Callable[["Virtqueue"], None]

#: transport features a driver uses when the device offers them
DEFAULT_DRIVER_TRANSPORT_FEATURES = (
    F.bit(F.VERSION_1) | F.bit(F.INDIRECT_DESC) | F.bit(F.EVENT_IDX) | F.bit(F.RING_PACKED)
    | F.bit(F.IN_ORDER)
)


class DeviceRefusedFeatures(PeerError):
    """The device did not accept FEATURES_OK for the features we acknowledged."""


class NoDriverError(LocalError):
    """No registered driver matches the device id."""


class NoSuchQueueError(LocalError):
    """The caller asked for a queue index the device does not have."""


class QueueDetachedError(LocalError):
    """The virtqueue was torn down (the device was reset or its pair closed): probe again."""


class DeviceNeedsResetError(PeerError):
    """The device set DEVICE_NEEDS_RESET (§2.1.2): its queues stop until the driver resets
    it and sets it up again (``reset()`` and probe)."""


class ConfigOps(abc.ABC):
    """What a transport provides to drivers (Linux ``virtio_config_ops``).

    ``memory`` is guest memory as the driver sees it and ``allocator`` hands out pieces of it
    for rings and buffers.
    """

    device_id: int
    vendor_id: int = 0x1AF4
    memory: GuestMemory
    allocator: Allocator

    @abc.abstractmethod
    def get_features(self) -> int: ...

    @abc.abstractmethod
    def set_features(self, features: int) -> None: ...

    @abc.abstractmethod
    def get_status(self) -> int: ...

    @abc.abstractmethod
    def set_status(self, status: int) -> None: ...

    def reset(self) -> None:
        self.set_status(0)

    @abc.abstractmethod
    def read_config(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def write_config(self, offset: int, data: bytes) -> None: ...

    @abc.abstractmethod
    def generation(self) -> int:
        """The config generation counter (0 on transports without one)."""

    @abc.abstractmethod
    def queue_max_size(self, index: int) -> int:
        """The device's maximum size for queue ``index``; 0 if the queue does not exist."""

    @abc.abstractmethod
    def setup_queue(self, index: int, ring: DriverRing) -> None:
        """Tell the device where queue ``index``'s ring is and enable it."""

    @abc.abstractmethod
    def notify(self, index: int) -> None:
        """Kick queue ``index``."""

    def bind_queue(self, index: int, vq: Virtqueue) -> None:  # noqa: B027 - optional hook
        """Remember ``vq`` so interrupts for ``index`` reach its callback."""

    def bind_config(self, callback: Callable[[], None] | None) -> None:  # noqa: B027
        """Call ``callback`` on the device's configuration-change interrupt (the paper's
        config-change callback; also how DEVICE_NEEDS_RESET is announced). Transports that
        cannot deliver the interrupt ignore it: drivers also poll the status when waiting."""

    def queue_broken_reason(self, index: int) -> str | None:
        """Why the device gave up on queue ``index``, where the transport can tell (an
        in-process or test device); None otherwise."""
        return None

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for an interrupt and dispatch it to the queue
        callbacks. Returns False on timeout. Synchronous transports return at once."""
        return False

    @property
    def legacy(self) -> bool:
        """Whether this is a legacy (pre-1.0) interface: no FEATURES_OK step."""
        return False

    @property
    def transport_features(self) -> int:
        """Feature bits this transport always acknowledges when offered, whatever a
        driver's wish list says: VERSION_1 on a modern interface, none on a legacy one."""
        return 0 if self.legacy else F.bit(F.VERSION_1)

    def vring_layout_contiguous(self) -> int | None:
        """Legacy transports need the three ring areas contiguous with this alignment."""
        return None


class Virtqueue:
    """A driver's virtqueue: the paper's five operations plus the callback."""

    def __init__(self, device: Device, index: int, ring: DriverRing,
                 callback: Callback | None) -> None:
        self.device = device
        self.index = index
        self.ring = ring
        self.callback = callback
        #: why this queue may no longer be used (set when the device is reset)
        self.detached: str | None = None
        self.kick_held = False  # kicked before DRIVER_OK: sent when DRIVER_OK is set

    def _gone(self) -> QueueDetachedError:
        return QueueDetachedError(f"{self.ring.name}: {self.detached}; probe the device "
                                  "again for a new queue")

    def add_buf(self, out_sgs: Sequence[tuple[int, int]], in_sgs: Sequence[tuple[int, int]],
                token: object) -> int:
        if self.detached is not None:
            raise self._gone()
        return self.ring.add_buf(out_sgs, in_sgs, token)

    def kick(self) -> bool:
        """Notify the device if it wants to be; returns whether it was notified.

        Before DRIVER_OK a driver must not notify (VIRTIO 1.2 §3.1.1): the kick is held and
        sent when the driver sets DRIVER_OK (not every device looks at its rings then: QEMU's
        balloon waits for a stats kick)."""
        if self.detached is not None:
            raise self._gone()
        if not self.device.driver_ok:
            self.kick_held = True
            return False
        if self.ring.kick_prepare():
            self.device.transport.notify(self.index)
            return True
        return False

    def get_buf(self) -> tuple[object, int] | None:
        if self.detached is not None:
            raise self._gone()
        return self.ring.get_buf()

    def disable_cb(self) -> None:
        self.ring.disable_cb()

    def enable_cb(self) -> bool:
        return self.ring.enable_cb()

    def enable_cb_delayed(self) -> bool:
        return self.ring.enable_cb_delayed()

    @property
    def num_free(self) -> int:
        return self.ring.num_free

    def interrupt(self) -> None:
        """Called by the transport when the device signals this queue."""
        if self.callback is not None:
            self.callback(self)

    def wait_buf(self, timeout: float = 5.0) -> tuple[object, int]:
        """Poll get_buf, waiting for interrupts in between, until a buffer is used.

        Fails at once with :class:`DeviceNeedsResetError` when the device has given up
        (DEVICE_NEEDS_RESET), rather than waiting out ``timeout`` for a buffer that will
        never come."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.get_buf()
            if got is not None:
                return got
            self.device.check_needs_reset(self.index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"queue {self.index}: no used buffer within {timeout} s")
            self.device.transport.wait(min(remaining, 0.5))


class Device:
    """The driver's view of one device (Linux ``struct virtio_device``)."""

    def __init__(self, transport: ConfigOps) -> None:
        self.transport = transport
        self.features = 0
        self.vqs: list[Virtqueue] = []
        self.driver_ok = False  # DRIVER_OK set by us since the last reset
        #: the driver's config-change callback (Linux ``virtio_driver.config_changed``)
        self.config_changed_callback: Callable[[], None] | None = None
        #: set when the device announced DEVICE_NEEDS_RESET, until :meth:`reset`
        self.needs_reset = False
        #: the rounds of the last feature negotiation (one unless both sides used
        #: multi-round negotiation)
        self.rounds = core_features.Rounds()
        transport.bind_config(self.config_changed)

    def config_changed(self) -> None:
        """The transport's config-change interrupt: note DEVICE_NEEDS_RESET, then run the
        driver's callback."""
        if self.transport.get_status() & S.DEVICE_NEEDS_RESET and not self.needs_reset:
            self.needs_reset = True
            log.warning("%s: the device needs a reset (DEVICE_NEEDS_RESET)",
                        ids.name(self.device_id))
        if self.config_changed_callback is not None:
            self.config_changed_callback()

    def check_needs_reset(self, index: int | None = None) -> None:
        """Raise :class:`DeviceNeedsResetError` if the device set DEVICE_NEEDS_RESET (asks
        the device, so it works on transports that do not deliver config interrupts)."""
        if not self.needs_reset and not self.transport.get_status() & S.DEVICE_NEEDS_RESET:
            return
        self.needs_reset = True
        what = ids.name(self.device_id)
        if index is not None:
            what += f" queue {index}"
        reason = None if index is None else self.transport.queue_broken_reason(index)
        raise DeviceNeedsResetError(
            f"{what}: the device set DEVICE_NEEDS_RESET"
            + (f" ({reason})" if reason else "")
            + "; reset() and probe again to use it"
        )

    def detach_queues(self, why: str) -> None:
        """Make every queue of this device refuse further use with ``why``."""
        for vq in self.vqs:
            vq.detached = why
        self.vqs = []

    @property
    def device_id(self) -> int:
        return self.transport.device_id

    @property
    def memory(self) -> GuestMemory:
        return self.transport.memory

    @property
    def allocator(self) -> Allocator:
        return self.transport.allocator

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def add_status(self, bit: int) -> None:
        self.transport.set_status(self.transport.get_status() | bit)
        if bit & S.DRIVER_OK and not self.driver_ok:
            self.driver_ok = True
            for vq in self.vqs:
                if vq.kick_held:
                    vq.kick_held = False
                    vq.kick()

    def reset(self) -> None:
        self.detach_queues("the device was reset")
        self.driver_ok = False
        self.transport.reset()
        self.features = 0
        self.needs_reset = False

    def finalize_features(self, driver_supported: int) -> int:
        """Acknowledge the common subset; on a modern device set FEATURES_OK and check the
        device kept it (§3.1.1 step 5-6).

        A driver whose wish list holds MULTI_ROUND (experimental, docs/multi-round.md)
        follows the device's rounds: each round it answers the offer with the common subset,
        sets FEATURES_OK, and while its answer acked MULTI_ROUND clears FEATURES_OK again to
        read the next offer, until an offer without the bit; a device still offering it in
        round :data:`~pyvirtio.core.features.MAX_ROUNDS` is refused
        (:class:`~pyvirtio.core.features.RoundsExceeded`)."""
        wanted = driver_supported | self.transport.transport_features
        if self.transport.legacy:
            wanted &= 0xFFFFFFFF & ~F.bit(F.VERSION_1)
        unimplemented = core_features.unimplemented(wanted)
        self.rounds = core_features.Rounds()
        name = ids.name(self.device_id)
        while True:
            offer = self.transport.get_features()
            try:
                self.rounds.check_offer(offer, f"{name} device")
            except core_features.RoundsExceeded:
                self.add_status(S.FAILED)
                raise
            acked = core_features.negotiate(offer, wanted & ~unimplemented)
            if self.rounds.current == 1:
                self._log_dropped(wanted, acked, unimplemented)
            self.transport.set_features(acked)
            self.features = acked
            if not core_features.is_modern(acked):
                return acked
            self.add_status(S.FEATURES_OK)
            status = self.transport.get_status()
            if not status & S.FEATURES_OK:
                self.add_status(S.FAILED)
                where = (f" in round {self.rounds.current} of multi-round negotiation"
                         if self.rounds.current > 1 or not core_features.is_final(acked)
                         else "")
                raise DeviceRefusedFeatures(
                    f"device refused FEATURES_OK for {core_features.describe(acked)}{where}"
                )
            if self.rounds.accepted(offer, acked):
                return acked
            # Not final: clear FEATURES_OK to open the next round.
            self.transport.set_status(status & ~S.FEATURES_OK)
            if self.transport.get_status() & S.FEATURES_OK:
                self.add_status(S.FAILED)
                raise PeerError(f"{name} device: kept FEATURES_OK set when the driver opened "
                                f"round {self.rounds.current} of multi-round negotiation")

    def _log_dropped(self, wanted: int, acked: int, unimplemented: int) -> None:
        dropped = wanted & ~acked & ~F.bit(F.VHOST_USER_PROTOCOL_FEATURES)
        if dropped:
            reasons = []
            if unimplemented:
                reasons.append(f"{core_features.describe(unimplemented)}: not implemented")
            if dropped & ~unimplemented:
                reasons.append(f"{core_features.describe(dropped & ~unimplemented)}: "
                               "not offered by the device")
            log.info("%s: not acknowledging %s", ids.name(self.device_id), "; ".join(reasons))

    def read_config(self, offset: int, length: int) -> bytes:
        """Read config bytes consistently: retry while the generation changes (§2.5.1)."""
        for _ in range(100):
            before = self.transport.generation()
            data = self.transport.read_config(offset, length)
            if self.transport.generation() == before:
                return data
        raise PeerError("config generation kept changing while reading config space")

    def write_config(self, offset: int, data: bytes) -> None:
        self.transport.write_config(offset, data)

    def find_vqs(self, count: int, callbacks: Sequence[Callback | None] | None = None,
                 size: int | None = None) -> list[Virtqueue]:
        """Set up queues ``0..count-1`` (Linux ``find_vqs``)."""
        cbs = list(callbacks) if callbacks is not None else [None] * count
        return [self.setup_vq(i, cbs[i], size) for i in range(count)]

    def setup_vq(self, index: int, callback: Callback | None = None,
                 size: int | None = None) -> Virtqueue:
        """Allocate and register queue ``index`` (sized ``size`` or the device maximum)."""
        t = self.transport
        max_size = t.queue_max_size(index)
        if max_size == 0:
            raise NoSuchQueueError(f"{ids.name(self.device_id)} has no queue {index}")
        num = min(size or max_size, max_size)
        align = t.vring_layout_contiguous()
        if align is not None:
            base = t.allocator.alloc(SP.vring_size(num, align), align)
            layout = SP.LegacyLayout(num, align)
            desc, avail, used = base + layout.desc, base + layout.avail, base + layout.used
        else:
            desc, avail, used = (t.allocator.alloc(n, a)
                                 for n, a in driver_areas(self.features, num))
        # The ring format (split or packed) follows the negotiated features.
        ring = driver_ring(
            self.features, t.memory, num, desc, avail, used,
            allocator=t.allocator,
            name=f"{ids.name(self.device_id)} queue {index}",
        )
        vq = Virtqueue(self, index, ring, callback)
        t.bind_queue(index, vq)
        t.setup_queue(index, ring)
        self.vqs.append(vq)
        return vq

    def ready(self) -> None:
        """Set DRIVER_OK (Linux ``virtio_device_ready``)."""
        self.add_status(S.DRIVER_OK)


class Driver:
    """Base class of drivers. Subclasses list ``device_ids`` they handle, the device
    ``features`` they support, and implement :meth:`probe` (set up queues, read config)."""

    device_ids: ClassVar[tuple[int, ...]] = ()
    vendor_id: ClassVar[int | None] = None
    features: ClassVar[int] = 0
    transport_features: ClassVar[int] = DEFAULT_DRIVER_TRANSPORT_FEATURES

    def __init__(self, device: Device) -> None:
        self.device = device

    def probe(self) -> None:
        """Bring the device up; the device is set DRIVER_OK after this returns."""

    def config_changed(self) -> None:
        """The device changed its configuration (or set DEVICE_NEEDS_RESET, which
        :attr:`Device.needs_reset` then says): the paper's config-change callback."""

    def remove(self) -> None:
        """Detach: the device is reset after this returns."""


_registry: list[type[Driver]] = []


def register_driver(cls: type[Driver]) -> type[Driver]:
    """Class decorator: make ``cls`` eligible for :func:`probe`."""
    if cls not in _registry:
        _registry.append(cls)
    return cls


def find_driver(device_id: int, vendor_id: int) -> type[Driver]:
    for cls in reversed(_registry):  # later registrations override earlier ones
        if device_id in cls.device_ids and cls.vendor_id in (None, vendor_id):
            return cls
    raise NoDriverError(f"no driver registered for device {ids.name(device_id)}")


def probe(transport: ConfigOps, driver: type[Driver] | None = None,
          features: int | None = None) -> Driver:
    """Initialise the device behind ``transport`` with a matching (or the given) driver,
    following §3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, probe, DRIVER_OK.

    ``features`` is a wish list that replaces the driver's own (tests use it to turn
    EVENT_IDX or INDIRECT off); the transport's own bits (VERSION_1 on a modern interface)
    are added to it, ring features pyvirtio does not implement (RING_PACKED, IN_ORDER...)
    are never acknowledged, and whatever is dropped is logged.
    """
    device = Device(transport)
    device.reset()
    device.add_status(S.ACKNOWLEDGE)
    cls = driver or find_driver(transport.device_id, transport.vendor_id)
    device.add_status(S.DRIVER)
    wanted = features if features is not None else cls.features | cls.transport_features
    device.finalize_features(wanted)
    instance = cls(device)
    device.config_changed_callback = instance.config_changed
    try:
        instance.probe()
    except BaseException:
        device.add_status(S.FAILED)
        raise
    device.ready()
    log.info("probed %s with %s: features %s", ids.name(transport.device_id), cls.__name__,
             core_features.describe(device.features))
    return instance
