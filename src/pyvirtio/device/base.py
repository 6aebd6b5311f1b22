"""The device framework: what every pyvirtio device has in common.

A device type subclasses :class:`VirtioDevice`, sets ``device_id`` and its queues, offers its
feature bits, lays out its config bytes, and implements :meth:`VirtioDevice.handle` for
descriptor chains. The framework owns the rest: the status state machine, feature
negotiation, config generation, queue setup from the transport, kick processing with
notification suppression, and containment of misbehaving drivers (a broken queue puts the
device into DEVICE_NEEDS_RESET instead of crashing anything).

Transports (loopback, vhost-user, PCI...) drive a device only through the methods in the
"transport interface" section and receive interrupts through :attr:`VirtioDevice.notify_queue`
and :attr:`VirtioDevice.notify_config`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pyvirtio.core import features as core_features
from pyvirtio.core import status as core_status
from pyvirtio.core.reactor import Reactor
from pyvirtio.device.chaos import Chaos
from pyvirtio.device.engine import FastLane, QueueEngine, RequestTracker
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.ring import DescriptorChain, DeviceRing, RingError, device_ring
from pyvirtio.spec import LE, Endian, ids
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S

log = logging.getLogger("pyvirtio.device")

DEFAULT_QUEUE_SIZE = 256
DEFAULT_TRANSPORT_FEATURES = F.mask(F.VERSION_1, F.INDIRECT_DESC, F.EVENT_IDX, F.RING_PACKED)


class ConfigAccessError(PeerError):
    """The driver accessed config space out of range or wrote a read-only field."""


@dataclass
class QueueState:
    """Per-queue transport state before and while a ring runs."""

    max_size: int
    size: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    enabled: bool = False
    ring: DeviceRing | None = None
    #: serves the running ring (:mod:`pyvirtio.device.engine`)
    engine: QueueEngine | None = None
    #: who records popped/completed heads (vhost-user inflight tracking), and heads a
    #: previous back-end left in flight, to run again before anything new
    tracker: RequestTracker | None = None
    resubmit: list[int] = field(default_factory=list)

    def stopped(self) -> None:
        self.ring = self.engine = self.tracker = None
        self.resubmit = []
        self.enabled = False


class VirtioDevice:
    """Base class of every device implementation (the host side of virtio).

    Subclasses set ``device_id``, pass ``num_queues`` and ``device_features`` to
    ``__init__``, fill ``self.config`` and implement :meth:`handle`.
    """

    device_id: int = 0
    vendor_id: int = 0x1AF4
    #: names of device-specific feature bits, for logs
    feature_names: dict[int, str] = {}
    #: ``(feature, the feature it needs)`` rules a driver's features must keep
    feature_depends: tuple[tuple[int, int], ...] = ()
    #: completions returned together by a drain (one used-index store)
    push_batch: int = 1
    #: chains handled per drain before yielding to the reactor (-1: no limit)
    drain_budget: int = -1
    #: seconds between looks at a busy ring in batch mode (None: always kick-driven)
    batch_interval: float | None = None
    #: adaptive polling: the longest window (seconds) the reactor polls a ring after a
    #: completion before sleeping (0: never poll; see :mod:`pyvirtio.device.engine`)
    poll_max: float = 0.0
    #: multi-round negotiation: the round from which offers never carry MULTI_ROUND
    max_rounds: int = core_features.MAX_ROUNDS

    def __init__(
        self,
        num_queues: int,
        device_features: int = 0,
        *,
        config_size: int = 0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        transport_features: int = DEFAULT_TRANSPORT_FEATURES,
        name: str | None = None,
        multi_round: bool = False,
    ) -> None:
        self.name = name or ids.name(self.device_id)
        self.log = logging.getLogger(f"pyvirtio.device.{self.name}")
        offered = device_features | transport_features
        missing = core_features.unimplemented(offered)
        if missing:
            # Offering a ring layout the rings do not implement would let a driver ack it
            # and then both sides would disagree about the ring: never offer it.
            self.log.warning("%s: not offering %s: not implemented", self.name,
                             core_features.describe(missing))
        self.offered_features = offered & ~missing
        if multi_round and F.has(self.offered_features, F.VERSION_1):
            # Experimental and opt-in (docs/multi-round.md); it needs FEATURES_OK, so VERSION_1.
            self.offered_features |= F.bit(F.MULTI_ROUND)
        #: the multi-round negotiation since the last reset (one round without MULTI_ROUND)
        self.rounds = core_features.Rounds(self.max_rounds)
        self._next_offer: int | None = None
        self.driver_features = 0
        self.status = 0
        self.config = bytearray(config_size)
        self.config_generation = 0
        self.queues = [QueueState(max_size=queue_size) for _ in range(num_queues)]
        self.memory: GuestMemory | None = None
        self.reactor: Reactor | None = None
        #: set by the transport: raise the queue's interrupt / the config interrupt
        self.notify_queue: Callable[[int], None] = _ignore_queue
        self.notify_config: Callable[[], None] = _ignore
        #: how the device's own timers look at queue i again (batching devices poll their
        #: rings): like a kick; a transport that gates kicks (vhost-user: disabled vrings
        #: are not processed) replaces it with its gated kick entry
        self.poll_queue: Callable[[int], None] = self.kick
        self.problems: list[str] = []  # every peer misbehaviour seen, newest last
        self.batch_ticks = 0  # looks at a ring in batch mode
        #: lost notifications the engine's watch made up for (see QueueEngine.watch)
        self.lost_kicks = 0
        self.renotified = 0
        #: adaptive polling: requests found by polling; windows that passed without one
        self.poll_hits = 0
        self.poll_misses = 0
        self._idle_kick_reported = False  # a kick before DRIVER_OK was recorded (once)
        #: hostile-device mode (:mod:`pyvirtio.device.chaos`): faults injected on purpose
        self.chaos: Chaos | None = None

    # ---- what subclasses implement ------------------------------------------------------

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        """Process one chain from ``queue``. Return the bytes written into it to complete it
        now, or None to complete it later with :meth:`complete` (asynchronous back-ends)."""
        raise NotImplementedError

    def validate_features(self, features: int) -> str | None:
        """Return why ``features`` (a subset of the offer) is unacceptable, or None.
        Default: the :attr:`feature_depends` rules."""
        return core_features.unmet_dependency(features, self.feature_depends,
                                              self.feature_names)

    def next_offer(self, rounds: core_features.Rounds) -> int:
        """Multi-round negotiation (opt-in with ``multi_round=True``): the offer of the next
        round, given every offer and accepted answer so far (``rounds.answers``; the last
        answer acked MULTI_ROUND). Keep MULTI_ROUND in it to ask for yet another round; the
        framework drops it from round ``rounds.limit`` on, so negotiation always ends.
        Default: the first offer without MULTI_ROUND, a final plain round."""
        return rounds.answers[0][0] & ~F.bit(F.MULTI_ROUND)

    def on_features_ok(self) -> None:
        """Features are final (:attr:`driver_features`)."""

    def on_driver_ok(self) -> None:
        """The driver is ready: the device may now use its queues."""

    def on_reset(self) -> None:
        """The device was reset: drop per-driver state."""

    def on_config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote config bytes. Default: config space is read-only."""
        raise ConfigAccessError(
            f"{self.name}: config offset {offset} (+{len(data)}) is read-only"
        )

    # ---- helpers for subclasses ---------------------------------------------------------

    def has_feature(self, bit: int) -> bool:
        """Whether ``bit`` was negotiated."""
        return bool(self.driver_features >> bit & 1)

    @property
    def endian(self) -> Endian:
        """Byte order of rings and config: LE for VERSION_1; legacy is guest-native (we only
        host little-endian guests, x86 and UML)."""
        return LE

    def ring(self, queue: int) -> DeviceRing | None:
        return self.queues[queue].ring if 0 <= queue < len(self.queues) else None

    def engine(self, queue: int) -> QueueEngine | None:
        """The engine serving ``queue``, or None if it does not run."""
        return self.queues[queue].engine if 0 <= queue < len(self.queues) else None

    def complete(self, queue: int, chain: DescriptorChain | int, written: int,
                 notify: bool = True) -> None:
        """Push a chain handled asynchronously; interrupt the driver if it wants one."""
        self.complete_many(queue, ((chain, written),), notify)

    def complete_many(self, queue: int, completions: Iterable[tuple[DescriptorChain | int, int]],
                      notify: bool = True) -> None:
        """Push chains handled outside a drain (one used-index store); interrupt the
        driver if it wants one. Chains of a queue that was reset meanwhile are dropped."""
        engine = self.engine(queue)
        if engine is not None:
            engine.complete(completions, notify)

    def track_requests(self, index: int, tracker: RequestTracker | None,
                       resubmit: Sequence[int] = ()) -> None:
        """Report every head popped from / returned to queue ``index`` to ``tracker``
        (None: stop), and run the chains ``resubmit`` (heads popped by a previous back-end
        that never completed them) again before anything new, at the next kick."""
        q = self._queue(index)
        q.tracker = tracker
        q.resubmit = list(resubmit)

    def fast_lane(self, index: int, ring: DeviceRing) -> FastLane | None:
        """A fast path for the common chains of queue ``index`` (hook; see
        :data:`pyvirtio.device.engine.FastLane`), or None: every chain goes to
        :meth:`handle`."""
        return None

    def update_config(self, offset: int, data: bytes, notify: bool = True) -> None:
        """Change config bytes from the device side and raise the config interrupt."""
        self.config[offset : offset + len(data)] = data
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if notify and self.status & S.DRIVER_OK:
            self.notify_config()

    def problem(self, message: str) -> None:
        """Record a peer misbehaviour that does not need a reset."""
        self._peer_problem(message)

    def set_needs_reset(self, reason: str) -> None:
        """Give up on the driver: set DEVICE_NEEDS_RESET (and raise the config interrupt)
        for ``reason``, which is recorded with the problems."""
        self._peer_problem(reason, needs_reset=True)

    def _peer_problem(self, message: str, *, needs_reset: bool = False) -> None:
        self.problems.append(message)
        self.log.warning("%s", message)
        if needs_reset and not self.status & S.DEVICE_NEEDS_RESET:
            self.status |= S.DEVICE_NEEDS_RESET
            if self.status & S.DRIVER_OK:
                self.notify_config()

    # ---- transport interface: features and status ---------------------------------------

    def get_features(self) -> int:
        return self.offered_features

    def set_driver_features(self, features: int) -> None:
        """The driver writes its acknowledged features (before FEATURES_OK)."""
        if self.status & S.FEATURES_OK:
            self._peer_problem(
                f"{self.name}: driver wrote features {core_features.describe(features)} after "
                "FEATURES_OK; ignored"
            )
            return
        self.driver_features = features

    def _features_problem(self) -> str | None:
        try:
            core_features.check_acked(self.offered_features, self.driver_features)
        except core_features.FeatureError as exc:
            return str(exc)
        return self.validate_features(self.driver_features)

    def set_status(self, value: int) -> None:
        """The driver writes the status register."""
        modern = core_features.is_modern(self.driver_features)
        problem = None
        if value & ~self.status & (S.FEATURES_OK | S.DRIVER_OK):
            problem = self._features_problem()
        t = core_status.judge(self.status, value, modern=modern, features_acceptable=problem,
                              round_open=self.negotiating)
        if t.reset:
            self.reset()
            return
        for p in t.problems:
            self._peer_problem(f"{self.name}: {p}")
        self.status = t.accepted
        if t.reopened:
            self._open_round()
            return
        if t.features_ok and self.negotiating:
            self._round_answered()
            return
        if t.features_ok:
            self.rounds.accepted(self.offered_features, self.driver_features)
        if t.features_ok or (t.driver_ok and not modern):
            self.log.info("%s: features %s", self.name,
                          core_features.describe(self.driver_features, self.feature_names))
            self.on_features_ok()
        if t.driver_ok:
            self.on_driver_ok()
            self._look_at_rings()
        if t.failed:
            self.log.warning("%s: driver set FAILED", self.name)

    def get_status(self) -> int:
        return self.status

    @property
    def negotiating(self) -> bool:
        """Whether a multi-round negotiation is under way: the device offered MULTI_ROUND in
        its first round and the driver's answer holds it, so the features are not final yet
        (never for a device that did not opt in, whatever bits a driver writes)."""
        return (F.has(self.first_offer, F.MULTI_ROUND)
                and not core_features.is_final(self.driver_features))

    def _round_answered(self) -> None:
        """FEATURES_OK was accepted for an answer that acks MULTI_ROUND: record the round and
        prepare the offer the driver will find when it clears FEATURES_OK."""
        self.rounds.accepted(self.offered_features, self.driver_features)
        offer = self.next_offer(self.rounds)
        missing = core_features.unimplemented(offer)
        if missing:
            self.log.warning("%s: round %d: not offering %s: not implemented", self.name,
                             self.rounds.current, core_features.describe(missing))
        self._next_offer = self.rounds.bounded(offer & ~missing)
        self.log.info("%s: multi-round negotiation: round %d answered with %s; next offer %s",
                      self.name, self.rounds.current - 1,
                      core_features.describe(self.driver_features, self.feature_names),
                      core_features.describe(self._next_offer, self.feature_names))

    def _open_round(self) -> None:
        """The driver cleared FEATURES_OK after a non-final round: present the next offer."""
        if self._next_offer is not None:
            self.offered_features, self._next_offer = self._next_offer, None

    @property
    def first_offer(self) -> int:
        """The offer of the first round: what the device offers after every reset."""
        return self.rounds.answers[0][0] if self.rounds.answers else self.offered_features

    def accept_features(self, features: int, *, tolerate: int = 0) -> str | None:
        """Take ``features`` as final in one step, as if the driver wrote them and then
        FEATURES_OK was accepted (status becomes ACKNOWLEDGE|DRIVER|FEATURES_OK).

        For transports whose front-end does not relay the status register: a vhost-user
        front-end without the STATUS protocol feature only sends SET_FEATURES, which is final.
        Sending the same features again is a no-op; different features are refused while a
        queue runs. ``tolerate`` names bits the device did not offer but accepts anyway
        because the transport knows the rings implement them (QEMU's vhost-user front-ends
        pass on guest-acked ring features the back-end never offered). Returns why the
        features are refused (nothing changes then, the problem is recorded) or None.
        """
        if self.status & S.FEATURES_OK and features == self.driver_features:
            return None
        problem: str | None
        if not core_features.is_final(features):
            problem = (f"{self.name}: features {core_features.describe(features)} acked in one "
                       "step: multi-round negotiation needs the status register")
        elif any(q.ring is not None for q in self.queues):
            problem = (f"{self.name}: features {core_features.describe(features)} set while "
                       "queues are running")
        else:
            try:
                core_features.check_acked(self.offered_features | (tolerate & features),
                                          features)
                problem = self.validate_features(features)
            except core_features.FeatureError as exc:
                problem = str(exc)
        if problem is not None:
            self._peer_problem(problem)
            return problem
        self.driver_features = features
        self.status = (S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
                       | self.status & (S.DEVICE_NEEDS_RESET | S.FAILED))
        self.log.info("%s: features %s", self.name,
                      core_features.describe(features, self.feature_names))
        self.on_features_ok()
        return None

    def reset(self) -> None:
        """Back to the initial state: status 0, no features, every queue stopped."""
        for q in self.queues:
            q.stopped()
            q.size = 0
            q.desc = q.avail = q.used = 0
        self.status = 0
        self.driver_features = 0
        if self.rounds.answers and not core_features.is_final(self.rounds.answers[0][1]):
            self.offered_features = self.first_offer  # later rounds' offers are forgotten
        self.rounds = core_features.Rounds(self.max_rounds)
        self._next_offer = None
        self._idle_kick_reported = False
        self.on_reset()

    # ---- transport interface: config space ----------------------------------------------

    def read_config(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self.config):
            raise ConfigAccessError(
                f"{self.name}: config read at offset {offset} +{length} is outside the "
                f"{len(self.config)}-byte config space"
            )
        if self.chaos is not None:
            self.chaos.config_read(self)
        return bytes(self.config[offset : offset + length])

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > len(self.config):
            raise ConfigAccessError(
                f"{self.name}: config write at offset {offset} +{len(data)} is outside the "
                f"{len(self.config)}-byte config space"
            )
        self.on_config_write(offset, bytes(data))

    # ---- transport interface: queues ----------------------------------------------------

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    def _queue(self, index: int) -> QueueState:
        if not 0 <= index < len(self.queues):
            raise PeerError(f"{self.name}: queue {index} does not exist "
                            f"(the device has {len(self.queues)})")
        return self.queues[index]

    def start_queue(
        self,
        index: int,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        last_avail_idx: int | None = None,
        used_idx: int | None = None,
    ) -> DeviceRing:
        """Start running queue ``index`` on the given ring addresses (guest-physical).

        Raises :class:`PeerError` (a RingError) if the ring lies outside guest memory or the
        size is invalid; the queue then stays stopped.
        """
        q = self._queue(index)
        if self.memory is None:
            raise LocalError(f"{self.name}: queue {index} started before guest memory was set")
        if size > q.max_size:
            raise PeerError(f"{self.name}: queue {index} size {size} exceeds the maximum "
                            f"{q.max_size}")
        if self.negotiating:
            raise PeerError(f"{self.name}: queue {index} set up in round "
                            f"{self.rounds.current} of multi-round feature negotiation, "
                            "before the features are final")
        ring = self._make_ring(index, size, desc, avail, used, last_avail_idx, used_idx)
        q.size, q.desc, q.avail, q.used = size, desc, avail, used
        q.ring = ring
        q.engine = QueueEngine(self, index, ring)
        q.enabled = True
        self.on_queue_started(index, ring)
        return ring

    def _make_ring(self, index: int, size: int, desc: int, avail: int, used: int,
                   last_avail_idx: int | None, used_idx: int | None) -> DeviceRing:
        """The ring object of queue ``index``, in the negotiated format (split or packed);
        a fresh ring (``last_avail_idx`` None) starts where that format starts."""
        assert self.memory is not None
        features = self.driver_features
        if not self.status & S.FEATURES_OK:
            # Negotiation never completed (a legacy driver, or a hostile one that set up a
            # queue after FEATURES_OK was refused): only offered bits can be in effect, so
            # bits we never offered must not pick the ring format. Accepted features may
            # hold ring bits the transport tolerated (accept_features).
            features &= self.offered_features
        return device_ring(
            features, self.memory, size, desc, avail, used,
            endian=self.endian,
            last_avail_idx=last_avail_idx,
            used_idx=used_idx,
            name=f"{self.name} queue {index}",
        )

    def on_queue_started(self, index: int, ring: DeviceRing) -> None:
        """A queue began running (hook; e.g. flush pending input to a receive queue)."""

    def stop_queue(self, index: int) -> int:
        """Stop queue ``index``; returns its last_avail_idx (vhost-user GET_VRING_BASE)."""
        q = self._queue(index)
        ring, engine = q.ring, q.engine
        q.stopped()
        if ring is None:
            return 0
        if engine is not None:
            engine.give_back()
        self.on_queue_stopped(index, ring)
        return ring.last_avail_idx

    def on_queue_stopped(self, index: int, ring: DeviceRing) -> None:
        """A queue stopped running (hook)."""

    @property
    def live(self) -> bool:
        """Whether the device may touch its queues: DRIVER_OK is set and NEEDS_RESET is not.

        Before DRIVER_OK (and so after a reset) and while it needs a reset, a device must
        not consume or return buffers (VIRTIO 1.2 §2.1.2, §3.1.1)."""
        return self.status & LIVE_MASK == S.DRIVER_OK

    def kick(self, index: int) -> None:
        """The driver notified queue ``index``: process what is available."""
        q = self.queues[index] if 0 <= index < len(self.queues) else None
        if q is None:
            self._peer_problem(f"{self.name}: kick for queue {index}, which does not exist")
            return
        ring = q.ring
        if ring is None or ring.broken:
            return
        if self.status & LIVE_MASK != S.DRIVER_OK:
            self._idle_kick(index)
            return
        self.process_queue(index, ring)

    def _idle_kick(self, index: int) -> None:
        """A kick the device may not act on yet: recorded once per reset (a driver that
        kicks before DRIVER_OK is wrong; while NEEDS_RESET is set the cause is recorded
        already). The buffers stay available and are served when DRIVER_OK arrives."""
        if self.status & S.DEVICE_NEEDS_RESET or self._idle_kick_reported:
            return
        self._idle_kick_reported = True
        self._peer_problem(
            f"{self.name}: kick for queue {index} at status {S.describe(self.status)}, "
            "before DRIVER_OK: not served until the driver sets DRIVER_OK"
        )

    def _look_at_rings(self) -> None:
        """DRIVER_OK arrived: look at every running queue once, so buffers made available
        (and kicked) before it are served, not stranded. Goes through :attr:`poll_queue`,
        which a transport that gates queues (vhost-user: disabled vrings) replaces."""
        for index, q in enumerate(self.queues):
            if not self.live:
                return  # a handler reset the device or it needs a reset
            if q.ring is not None and not q.ring.broken and q.ring.pending():
                self.poll_queue(index)

    def process_queue(self, index: int, ring: DeviceRing) -> None:
        """Drain ``ring`` through :meth:`handle` (the queue's
        :class:`~pyvirtio.device.engine.QueueEngine`); a device whose queues have other
        roles (net's receive queues) overrides this."""
        engine = self.queues[index].engine
        if engine is not None and engine.ring is ring:
            engine.run()

    def queue_failed(self, index: int, ring: DeviceRing, exc: RingError | PeerError) -> None:
        """Serving queue ``index`` stopped on ``exc``: a malformed ring, or a malformed
        request that :meth:`handle` refused to complete. Either way the queue is broken
        (later kicks are ignored; the chain is lost to the driver) and the device needs a
        reset."""
        if isinstance(exc, RingError):
            self._peer_problem(str(exc), needs_reset=True)  # the ring broke itself
            return
        ring.fail(str(exc))
        self._peer_problem(f"{self.name} queue {index}: {exc}", needs_reset=True)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(id={self.device_id}, status={S.describe(self.status)}, "
                f"features={core_features.describe(self.driver_features)})")


#: status bits that decide whether a device may touch its queues (DRIVER_OK alone)
LIVE_MASK = S.DRIVER_OK | S.DEVICE_NEEDS_RESET


def _ignore_queue(index: int) -> None:
    pass


def _ignore() -> None:
    pass
