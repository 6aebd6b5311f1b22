"""Hostile-device mode: a seeded, reproducible fault injector for hardening drivers.

People who harden drivers against untrusted devices (confidential VMs, fuzzing) need a
device that misbehaves on purpose, and the same way every time. :class:`Chaos` sits where
every pyvirtio device returns buffers and raises interrupts — the one
:class:`~pyvirtio.device.engine.QueueEngine` (:meth:`QueueEngine.publish` and its signal)
and the device's config space — so any device type can be made hostile, with ``pyvirtio
serve DEVICE ... --chaos SEED[:RATE] [--chaos-faults a,b]``.

Every completion the device returns is one *request* (numbered from 1, per device
instance: a new front-end connection starts again at 1). For each, a generator seeded with
``SEED`` decides with probability ``RATE`` whether a fault is injected and which (one of
the enabled classes the ring supports). The generator is consulted only there, so the same
seed and the same sequence of requests give the same faults: one command replays a run.
Every fault is logged (logger ``pyvirtio.chaos``) and kept in :attr:`Chaos.injected`::

    chaos seed=7 req=1234: used id 99 (not a head) for head 3

A harness that wants a guest to boot undisturbed starts the device with ``--chaos-after
signal`` and arms it (SIGUSR2, :meth:`Chaos.arm`) when the guest is ready; the log then
says after how many requests, and ``--chaos-after N`` replays the same run without the
signal (the first N requests pass untouched and do not consult the generator).

Fault classes (:data:`FAULTS`):

``bad-id``        the used entry names an id that is not an in-flight head (packed: a wrong
                  buffer id); the real buffer is never returned
``id-range``      the used entry names an id beyond the queue size
``double``        the buffer is returned, then returned again
``len``           the used length is larger than the buffer's writable bytes
``idx-ahead``     (split) used->idx jumps past slots never written (by more than the size)
``wrap``          (packed) the used descriptor carries the wrong wrap counter
``irq-drop``      the interrupt for these completions is not sent
``irq-spurious``  an interrupt is sent with nothing new in the ring
``event-never``   event-index games: no interrupt at all for the next
                  :data:`EVENT_WINDOW` drains, whatever the driver asked for
``event-always``  an interrupt after each of the next :data:`EVENT_WINDOW` drains, even
                  when the driver suppressed them
``config-change`` config bytes change (and the config interrupt fires) while a request is
                  in flight
``config-gen``    the config generation changes on every config read for the next
                  :data:`CHURN_READS` reads (transports whose generation is the device's)
``needs-reset``   the device sets DEVICE_NEEDS_RESET after returning the buffer

Faults that leave the ring in a state no correct driver accepts are followed by nothing
else: the device goes on serving, and it is the driver's job to notice. Rings that run
VIRTIO_F_IN_ORDER are left alone by the ring-entry classes (their completions are
published in runs the injector does not forge).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvirtio.errors import LocalError
from pyvirtio.ring import DescriptorChain, DeviceRing
from pyvirtio.ring.packed import PackedDeviceQueue

if TYPE_CHECKING:
    from pyvirtio.device.base import VirtioDevice
    from pyvirtio.device.engine import Completion, QueueEngine

log = logging.getLogger("pyvirtio.chaos")

#: ring-entry faults, for either ring layout
ENTRY_FAULTS = ("bad-id", "id-range", "double", "len")
#: faults only one ring layout can express
SPLIT_FAULTS = ("idx-ahead",)
PACKED_FAULTS = ("wrap",)
#: interrupt and event-index faults
IRQ_FAULTS = ("irq-drop", "irq-spurious", "event-never", "event-always")
#: config-space and status faults
CONFIG_FAULTS = ("config-change", "config-gen", "needs-reset")
#: every fault class, in the order of the docs
FAULTS = ENTRY_FAULTS + SPLIT_FAULTS + PACKED_FAULTS + IRQ_FAULTS + CONFIG_FAULTS

DEFAULT_RATE = 0.01
#: drains an event-index game lasts
EVENT_WINDOW = 16
#: config reads a generation churn lasts (more than any sane driver retries)
CHURN_READS = 256


def parse_spec(spec: str) -> tuple[int, float]:
    """``SEED[:RATE]`` -> (seed, rate); raises :class:`LocalError` if malformed."""
    seed_text, _, rate_text = spec.partition(":")
    try:
        seed = int(seed_text, 0)
        rate = float(rate_text) if rate_text else DEFAULT_RATE
    except ValueError:
        raise LocalError(f"--chaos {spec!r}: expected SEED[:RATE], e.g. 7 or 7:0.05") from None
    if not 0.0 <= rate <= 1.0:
        raise LocalError(f"--chaos {spec!r}: RATE must be between 0 and 1")
    return seed, rate


def parse_faults(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of fault classes (None or empty: all of them)."""
    if not text:
        return FAULTS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise LocalError(f"unknown chaos fault class {', '.join(unknown)}; known: "
                         f"{', '.join(FAULTS)}")
    return names


@dataclass
class _Game:
    """An event-index game running on one queue."""

    kind: str  # "never" or "always"
    drains: int


class Chaos:
    """The fault injector of one device instance (see the module doc)."""

    def __init__(self, seed: int, rate: float = DEFAULT_RATE,
                 faults: Iterable[str] | None = None, *, after: int | None = 0) -> None:
        self.seed = seed
        self.rate = rate
        #: requests passed through untouched (and without consulting the generator) before
        #: the first that may get a fault; None: not armed yet (see :meth:`arm`)
        self.after = after
        self.faults = tuple(faults) if faults is not None else FAULTS
        bad = [f for f in self.faults if f not in FAULTS]
        if bad:
            raise LocalError(f"unknown chaos fault class {', '.join(bad)}")
        self._random = random.Random(seed)
        #: requests seen (completions the device returned or was about to return)
        self.requests = 0
        #: every fault injected, as logged, oldest first
        self.injected: list[str] = []
        self._drop_irq: set[int] = set()
        self._games: dict[int, _Game] = {}
        self._churn = 0

    @classmethod
    def from_spec(cls, spec: str, faults: str | None = None) -> Chaos:
        """From the command line: ``--chaos SEED[:RATE]`` and ``--chaos-faults a,b``."""
        seed, rate = parse_spec(spec)
        return cls(seed, rate, parse_faults(faults))

    def __repr__(self) -> str:
        after = "signal" if self.after is None else self.after
        return (f"Chaos(seed={self.seed}, rate={self.rate}, faults={','.join(self.faults)}, "
                f"after={after}, requests={self.requests})")

    def _record(self, what: str) -> None:
        line = f"chaos seed={self.seed} req={self.requests}: {what}"
        self.injected.append(line)
        log.warning("%s", line)

    def _applicable(self, ring: DeviceRing, device: VirtioDevice) -> list[str]:
        packed = isinstance(ring, PackedDeviceQueue)
        in_order = bool(getattr(ring, "in_order", False))
        out = []
        for f in self.faults:
            if f in ENTRY_FAULTS or f in SPLIT_FAULTS or f in PACKED_FAULTS:
                if in_order:
                    continue
                if (f in SPLIT_FAULTS and packed) or (f in PACKED_FAULTS and not packed):
                    continue
            if f == "config-change" and not device.config:
                continue
            out.append(f)
        return out

    def arm(self) -> None:
        """Start injecting from the next request on (``--chaos-after signal``: a harness
        arms the device once its guest has booted). Logged with the request count, which
        replays the run with ``--chaos-after N``."""
        if self.after is None:
            self.after = self.requests
            line = (f"chaos seed={self.seed}: armed after {self.requests} requests "
                    f"(replay with --chaos-after {self.requests})")
            self.injected.append(line)
            log.warning("%s", line)

    def _draw(self, ring: DeviceRing, device: VirtioDevice) -> str | None:
        """The next request: which fault it gets, if any."""
        self.requests += 1
        if self.after is None or self.requests <= self.after:
            return None
        if self._random.random() >= self.rate:
            return None
        choices = self._applicable(ring, device)
        if not choices:
            return None
        return self._random.choice(choices)

    # ---- the engine's two hooks -----------------------------------------------------------

    def push_many(self, engine: QueueEngine, done: list[Completion]) -> None:
        """Return ``done`` to the ring as the engine would, injecting faults."""
        ring = engine.ring
        device = engine.device
        batch: list[Completion] = []
        for completion in done:
            fault = self._draw(ring, device)
            if fault is None:
                batch.append(completion)
                continue
            if batch:
                ring.push_many(batch)
                batch = []
            self._inject(fault, engine, completion)
        if batch:
            ring.push_many(batch)

    def signal(self, engine: QueueEngine, wanted: bool) -> bool:
        """Whether to interrupt the driver after a drain that published something
        (``wanted``: whether the driver asked for it)."""
        index = engine.index
        game = self._games.get(index)
        if game is not None:
            game.drains -= 1
            if game.drains <= 0:
                del self._games[index]
            return game.kind == "always"
        if wanted and index in self._drop_irq:
            self._drop_irq.discard(index)
            return False
        return wanted

    def config_read(self, device: VirtioDevice) -> None:
        """The driver reads config space: churn the generation if a fault says so."""
        if self._churn > 0:
            self._churn -= 1
            device.config_generation = (device.config_generation + 1) & 0xFFFFFFFF

    # ---- the faults -----------------------------------------------------------------------

    def _inject(self, fault: str, engine: QueueEngine, completion: Completion) -> None:
        ring = engine.ring
        device = engine.device
        chain, written = completion
        head = chain.head if isinstance(chain, DescriptorChain) else chain
        rnd = self._random
        where = f"{ring.name}"
        if fault == "bad-id":
            busy = set(ring.in_flight())
            free = [i for i in range(ring.size) if i not in busy and i != head]
            if free:
                bad = rnd.choice(free)
                ring.forge_used(bad, written)
                self._record(f"{where}: used id {bad} (not a head) for head {head}")
                return
            fault = "id-range"  # every id is in flight: one out of range is as bad
        if fault == "id-range":
            bad = ring.size + rnd.randrange(0x10000 - ring.size)
            ring.forge_used(bad, written)
            self._record(f"{where}: used id {bad} (out of range, queue size {ring.size}) "
                         f"for head {head}")
        elif fault == "double":
            ring.push_many([completion])
            ring.forge_used(head, written)
            self._record(f"{where}: head {head} completed twice (used len {written})")
        elif fault == "len":
            capacity = self._capacity(ring, chain)
            bad = capacity + 1 + rnd.randrange(4096)
            ring.forge_used(head, bad, retire=True)
            self._record(f"{where}: used len {bad} for head {head}, which has {capacity} "
                         "writable bytes")
        elif fault == "idx-ahead":
            skip = ring.size + 1 + rnd.randrange(ring.size)
            ring.forge_used(head, written, skip=skip, retire=True)
            self._record(f"{where}: used idx jumps {skip} entries past head {head}'s")
        elif fault == "wrap":
            ring.forge_used(head, written, wrong_wrap=True, retire=True)
            self._record(f"{where}: used descriptor for id {head} with the wrong wrap "
                         "counter")
        elif fault == "irq-drop":
            ring.push_many([completion])
            self._drop_irq.add(engine.index)
            self._record(f"{where}: interrupt for head {head} dropped")
        elif fault == "irq-spurious":
            device.notify_queue(engine.index)
            ring.push_many([completion])
            self._record(f"{where}: spurious interrupt before head {head} was returned")
        elif fault in ("event-never", "event-always"):
            ring.push_many([completion])
            kind = fault.split("-")[1]
            self._games[engine.index] = _Game(kind, EVENT_WINDOW)
            self._record(f"{where}: {kind} notify for the next {EVENT_WINDOW} drains "
                         f"(from head {head})")
        elif fault == "config-change":
            offset = rnd.randrange(len(device.config))
            size = min(8, len(device.config) - offset)
            data = rnd.randbytes(size)
            device.update_config(offset, data)
            ring.push_many([completion])
            self._record(f"config bytes {offset}..{offset + size - 1} changed to {data.hex()} "
                         f"while head {head} of {where} was in flight")
        elif fault == "config-gen":
            self._churn = CHURN_READS
            device.update_config(0, b"")  # a config interrupt (and generation), no change
            ring.push_many([completion])
            self._record(f"config generation churns for the next {CHURN_READS} config reads "
                         f"(at head {head} of {where})")
        elif fault == "needs-reset":
            ring.push_many([completion])
            device.set_needs_reset(f"chaos seed={self.seed} req={self.requests}: "
                                   "DEVICE_NEEDS_RESET set on purpose")
            self._record(f"DEVICE_NEEDS_RESET set after head {head} of {where}")

    @staticmethod
    def _capacity(ring: DeviceRing, chain: DescriptorChain | int) -> int:
        if isinstance(chain, DescriptorChain):
            return chain.writable_len
        return ring.chain(chain).writable_len
