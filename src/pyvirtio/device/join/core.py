"""The joiner's generic part: sides, routes, and the copy between two guests' chains.

A :class:`JoinSide` is what one guest's front-end attaches to (over vhost-user, or in memory
in tests): it has the device id, features and config space of the device type the guests
expect, but no device model. A :class:`Route` joins one queue of one side (the *source*: its
driver makes buffers with readable bytes available) to one queue of another side (the
*destination*: its driver posts writable buffers). For each source chain the route copies the
readable bytes into as many destination buffers as they need, writes into each destination
used element exactly the bytes it copied there (the trusted used length of §9.2 of the virtio
paper: a receiver never sees bytes that were not copied), and completes the source chain with
used length 0 once all of its bytes are copied. Nothing in the bytes is parsed.

No destination buffer: the source chain waits (the engine's RETRY) and the route resumes
when the destination driver posts buffers, starts the queue, or a new front-end attaches; a
partly copied chain continues where it stopped. So nothing is dropped (console ports are
byte streams). A destination whose ring is malformed breaks only itself (its queue fails and
needs a reset); the source waits for the destination's next driver. A malformed source ring
breaks the source queue in its own engine; the destination is untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from pyvirtio.core import features as CF
from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.engine import RETRY
from pyvirtio.errors import LocalError
from pyvirtio.ring import DescriptorChain, DeviceRing, RingError
from pyvirtio.ring.chain import transfer

if TYPE_CHECKING:
    from pyvirtio.device.join.rounds import RoundBroker


@dataclass(frozen=True)
class Mapping:
    """``src`` side's queue ``src_queue`` is copied into ``dst`` side's queue ``dst_queue``."""

    src: int
    src_queue: int
    dst: int
    dst_queue: int

    _SYNTAX = re.compile(r"^(\d+):(\d+)(?:>|->)(\d+):(\d+)$")

    @classmethod
    def parse(cls, text: str) -> Mapping:
        """``"0:1>1:0"``: side 0's queue 1 into side 1's queue 0 (``->`` works too)."""
        m = cls._SYNTAX.match(text.replace(" ", ""))
        if m is None:
            raise LocalError(f"queue mapping {text!r} is not SIDE:QUEUE>SIDE:QUEUE "
                             "(e.g. 0:1>1:0)")
        a, b, c, d = (int(g) for g in m.groups())
        return cls(a, b, c, d)

    def __str__(self) -> str:
        return f"{self.src}:{self.src_queue}>{self.dst}:{self.dst_queue}"


def crosswise(sides: int, tx: int, rx: int) -> list[Mapping]:
    """The default mappings of two sides: each side's queue ``tx`` into the other's ``rx``."""
    if sides != 2:
        raise LocalError(f"the default queue mapping joins 2 sides, not {sides}: name the "
                         "mapping (--map SIDE:QUEUE>SIDE:QUEUE) for more")
    return [Mapping(0, tx, 1, rx), Mapping(1, tx, 0, rx)]


@dataclass
class RouteStats:
    chains: int = 0  # source chains copied completely (and completed)
    bytes: int = 0  # bytes copied
    buffers: int = 0  # destination buffers filled
    waits: int = 0  # times a source chain waited for destination buffers
    dropped: int = 0  # source chains completed without copying (destination gone, lossy)
    bad_buffers: int = 0  # destination buffers without writable bytes, returned empty

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Route:
    """One mapping in action (see the module doc)."""

    def __init__(self, src: JoinSide, src_queue: int, dst: JoinSide, dst_queue: int) -> None:
        self.src, self.src_queue, self.dst, self.dst_queue = src, src_queue, dst, dst_queue
        self.stats = RouteStats()
        self._head: int | None = None  # the source chain copied in part, and how far
        self._offset = 0

    def __repr__(self) -> str:
        return f"Route({self.src.name}:{self.src_queue} > {self.dst.name}:{self.dst_queue})"

    def copy(self, chain: DescriptorChain) -> int:
        """Copy a source chain; returns its used length (0) or RETRY (wait for buffers)."""
        dst = self.dst
        engine = dst.engine(self.dst_queue)
        if engine is None or not dst.live or engine.ring.broken is not None:
            self.stats.waits += 1
            return RETRY  # resumed when the destination's driver (or the next one) is up
        total = chain.readable_len
        offset = self._offset if self._head == chain.head else 0
        done = engine.done
        stats = self.stats
        try:
            while offset < total:
                buf = engine.buffer(0)
                if buf is None:
                    if engine.out_of_buffers():
                        continue  # buffers arrived meanwhile
                    self._head, self._offset = chain.head, offset
                    stats.waits += 1
                    return RETRY
                engine.held.popleft()
                n = transfer(chain.readable, offset, buf.writable)
                done.append((buf, n))
                if n == 0:
                    stats.bad_buffers += 1
                    if stats.bad_buffers <= 10:  # a hostile guest must not flood the log
                        dst.problem(f"{dst.name} queue {self.dst_queue}: buffer {buf.head} "
                                    "has no writable bytes: returned empty")
                    continue
                offset += n
                stats.bytes += n
                stats.buffers += 1
        except RingError as exc:
            # The destination's ring is malformed: it breaks itself, not the source.
            dst.queue_failed(self.dst_queue, engine.ring, exc)
            self._head, self._offset = chain.head, offset
            stats.waits += 1
            return RETRY
        self._head, self._offset = None, 0
        stats.chains += 1
        return 0

    def forget(self) -> None:
        """The source queue stopped: a partly copied chain is not continued."""
        self._head, self._offset = None, 0

    def flush(self) -> None:
        """Publish the destination buffers filled (one used-index update, one interrupt)."""
        engine = self.dst.engine(self.dst_queue)
        if engine is not None and engine.done:
            engine.complete(())

    def resume(self) -> None:
        """The destination can take bytes again: run the source queue if it waited."""
        engine = self.src.engine(self.src_queue)
        if engine is not None and engine.blocked and self.src.live:
            engine.run()
        self.flush()


class Joined:
    """What every side of a join shares, whatever its device type: its place among the
    sides and multi-round negotiation through the join's :class:`RoundBroker`."""

    side: int = 0
    broker: RoundBroker | None = None

    def next_offer(self, rounds: CF.Rounds) -> int:
        if self.broker is None:
            return super().next_offer(rounds)  # type: ignore[misc]
        return self.broker.next_offer(self.side, rounds)

    def on_features_ok(self) -> None:
        super().on_features_ok()  # type: ignore[misc]
        if self.broker is not None:
            self.broker.finished(self.side, self.driver_features)  # type: ignore[attr-defined]

    def on_reset(self) -> None:
        super().on_reset()  # type: ignore[misc]
        if self.broker is not None:
            self.broker.reset(self.side)


class JoinSide(Joined, VirtioDevice):
    """One guest's end of a generic join: a device id, features and config, no model."""

    def __init__(self, device_id: int, num_queues: int, device_features: int = 0, *,
                 config: bytes = b"", side: int = 0, broker: RoundBroker | None = None,
                 feature_names: dict[int, str] | None = None, **kwargs: object) -> None:
        self.device_id = device_id
        self.side, self.broker = side, broker
        if feature_names is not None:
            self.feature_names = feature_names
        super().__init__(num_queues, device_features, config_size=len(config),
                         **kwargs)  # type: ignore[arg-type]
        self.config[:] = config
        self.routes_out: dict[int, Route] = {}  # source queue -> its route
        self.routes_in: dict[int, Route] = {}  # destination queue -> its route

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        route = self.routes_out.get(queue)
        if route is None:  # process_queue drains only routed queues
            raise LocalError(f"{self.name}: queue {queue} is not routed")
        return route.copy(chain)

    def process_queue(self, index: int, ring: DeviceRing) -> None:
        into = self.routes_in.get(index)
        if into is not None:
            # Buffers to fill: popped on demand; we asked for a kick only when we ran out.
            engine = self.queues[index].engine
            if engine is not None and engine.buffers_posted():
                into.resume()
            return
        out = self.routes_out.get(index)
        if out is None:
            return  # not routed: its buffers stay where they are
        super().process_queue(index, ring)
        out.flush()

    def on_queue_started(self, index: int, ring: DeviceRing) -> None:
        into = self.routes_in.get(index)
        if into is not None and self.live:
            into.resume()

    def on_driver_ok(self) -> None:
        for route in self.routes_in.values():
            route.resume()

    def on_queue_stopped(self, index: int, ring: DeviceRing) -> None:
        out = self.routes_out.get(index)
        if out is not None:
            out.forget()

    def on_reset(self) -> None:
        super().on_reset()
        for route in getattr(self, "routes_out", {}).values():
            route.forget()


def connect(sides: list[JoinSide], mappings: list[Mapping]) -> list[Route]:
    """Make the routes of ``mappings`` between ``sides`` (each queue in one route at most)."""
    used: set[tuple[int, int]] = set()
    routes = []
    for m in mappings:
        for side, queue in ((m.src, m.src_queue), (m.dst, m.dst_queue)):
            if not 0 <= side < len(sides):
                raise LocalError(f"mapping {m}: there is no side {side} "
                                 f"(sides 0..{len(sides) - 1})")
            if not 0 <= queue < sides[side].num_queues:
                raise LocalError(f"mapping {m}: side {side} has no queue {queue} "
                                 f"(queues 0..{sides[side].num_queues - 1})")
            if (side, queue) in used:
                raise LocalError(f"mapping {m}: queue {side}:{queue} is in another mapping")
            used.add((side, queue))
        if m.src == m.dst:
            raise LocalError(f"mapping {m} joins a side to itself")
        route = Route(sides[m.src], m.src_queue, sides[m.dst], m.dst_queue)
        sides[m.src].routes_out[m.src_queue] = route
        sides[m.dst].routes_in[m.dst_queue] = route
        routes.append(route)
    return routes
