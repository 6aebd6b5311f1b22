"""An L2 learning switch joining several network endpoints in one process.

Each :class:`SwitchPort` is linked to one endpoint: a :class:`~pyvirtio.device.net.NetDevice`
(a guest's virtio-net queues, typically served over vhost-user), a tap, anything that is a
:class:`~pyvirtio.device.net.endpoint.NetEndpoint`. A frame the endpoint sends into its port
is forwarded by destination MAC:

* the source MAC is learned on the ingress port (entries age out after ``ageing_time``);
* broadcast, multicast and unknown unicast are flooded to every other port;
* known unicast goes to its port only (or is dropped if that is the ingress port).

Delivery to a device copies straight from the sender guest's transmit buffers into the
receiver guest's receive buffers (one copy, no intermediate). When a receiver answers BUSY
(no receive buffers posted) the frame is copied once into that port's bounded queue
(``queue_frames`` frames / ``queue_bytes`` bytes); when the queue is full the frame is
dropped and counted on that port. The receiver calls ``peer_ready`` when it has buffers
again and the queue drains. So a guest that never posts receive buffers costs the others
nothing but one bounded queue, and a guest's transmit queue never waits for another guest.

Offloads: every endpoint accepts every valid offload and completes in software what its own
consumer did not negotiate (see :mod:`pyvirtio.device.net`), so the switch passes TSO and
partial-checksum frames through untouched: two guests that both negotiated GUEST_TSO4 and
GUEST_CSUM exchange 64 KiB frames at the cost of one copy, and a guest without them gets
segmented, checksummed frames.

The switch is sans-I/O: no fds, no timers. Ageing is lazy (on lookup, and a sweep when the
table is full), driven by ``clock`` (tests pass a fake one). Everything around it shares one
event loop: each guest's device is served by its own vhost-user server on that loop, a tap
port reads its fd on that loop, and a device out of transmit budget yields to that loop::

    loop, switch = EventLoop(), Switch()
    for i, path in enumerate(sockets):
        device = NetDevice(f"52:54:00:00:00:{i:02x}")
        switch.add_port(device, f"guest{i}", capture=PcapWriter(f"guest{i}.pcap"))
        ...serve ``device`` over vhost-user at ``path`` on ``loop``...
    switch.add_port(TapBackend(Tap.open("tap0"), loop), "tap0")
    loop.run()
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from pyvirtio.device.net.endpoint import (
    Delivery,
    Frame,
    FrameSink,
    NetEndpoint,
    Offload,
    format_mac,
    frame_bytes,
    link,
)
from pyvirtio.errors import LocalError
from pyvirtio.spec.net import NetHdr

DEFAULT_AGEING_TIME = 300.0  # seconds, as IEEE 802.1D and Linux bridges
DEFAULT_QUEUE_FRAMES = 256
DEFAULT_QUEUE_BYTES = 4 << 20
DEFAULT_MAX_MACS = 4096


@dataclass
class PortStats:
    """Counters of one port, from the attached endpoint's (the guest's) point of view."""

    rx_frames: int = 0  # frames delivered to the endpoint
    rx_bytes: int = 0
    tx_frames: int = 0  # frames the endpoint sent into the switch
    tx_bytes: int = 0
    drops: int = 0  # frames for this port dropped because its queue was full
    drop_bytes: int = 0
    refused: int = 0  # frames the endpoint refused (its filter, buffer size, link down...)
    queued_max: int = 0  # high-water mark of the queue, in frames

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class SwitchPort(NetEndpoint):
    """One port: the switch side of a link to an endpoint, with its bounded queue."""

    def __init__(self, switch: Switch, name: str, *, queue_frames: int, queue_bytes: int,
                 capture: FrameSink | None = None) -> None:
        self.switch = switch
        self.name = name
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        self.capture = capture
        self.stats = PortStats()
        self.queue: deque[tuple[NetHdr, bytes]] = deque()
        self.queued_bytes = 0
        self._draining = False
        self.attached = True

    def __repr__(self) -> str:
        return f"SwitchPort({self.name}, queued={len(self.queue)})"

    # ---- the endpoint sends into the switch ---------------------------------------------

    def receive(self, hdr: NetHdr, frame: Frame, length: int, *,
                flush: bool = True) -> Delivery:
        if not self.attached:
            return Delivery.DROPPED
        self.switch.forward(self, hdr, frame, length)
        if flush:
            self.switch.flush()
        return Delivery.DELIVERED

    def flush_rx(self) -> None:
        self.switch.flush()

    def rx_offloads(self) -> Offload:
        # Whatever enters is passed on; each final receiver converts what it cannot take.
        return Offload.CSUM | Offload.TSO4 | Offload.TSO6

    # ---- the switch sends to the endpoint -----------------------------------------------

    def deliver(self, hdr: NetHdr, frame: Frame, length: int,
                snapshot: list[bytes | None]) -> None:
        """Offer a frame to the endpoint; queue it (copied once, shared through
        ``snapshot`` by every port that needs it) if the endpoint is busy."""
        peer = self.peer
        if peer is None or not self.attached:
            return
        if self.queue or self._draining:
            self._enqueue(hdr, frame, length, snapshot)  # keep the order behind the queue
            return
        result = peer.receive(hdr, frame, length, flush=False)
        if result == Delivery.DELIVERED:
            self._delivered(frame, length)
            self.switch.dirty.add(self)
        elif result == Delivery.BUSY:
            self._enqueue(hdr, frame, length, snapshot)
        else:
            self.stats.refused += 1

    def _delivered(self, frame: Frame, length: int) -> None:
        self.stats.rx_frames += 1
        self.stats.rx_bytes += length
        if self.capture is not None:
            self.capture.write_frame(frame, length)

    def _enqueue(self, hdr: NetHdr, frame: Frame, length: int,
                 snapshot: list[bytes | None]) -> None:
        if (len(self.queue) >= self.queue_frames
                or self.queued_bytes + length > self.queue_bytes):
            self.stats.drops += 1
            self.stats.drop_bytes += length
            return
        data = snapshot[0]
        if data is None:
            data = snapshot[0] = frame_bytes(frame, length)
        self.queue.append((hdr, data))
        self.queued_bytes += length
        if len(self.queue) > self.stats.queued_max:
            self.stats.queued_max = len(self.queue)

    def peer_ready(self) -> None:
        """The endpoint has room again: drain the queue into it until it is busy again."""
        if self._draining:
            return  # re-entered from inside the drain below; the loop there continues
        peer = self.peer
        if peer is None:
            return
        self._draining = True
        try:
            while self.queue:
                hdr, data = self.queue[0]
                result = peer.receive(hdr, (data,), len(data), flush=False)
                if result == Delivery.BUSY:
                    break
                self.queue.popleft()
                self.queued_bytes -= len(data)
                if result == Delivery.DELIVERED:
                    self._delivered((data,), len(data))
                else:
                    self.stats.refused += 1
        finally:
            self._draining = False
            peer.flush_rx()

    def clear_queue(self) -> int:
        """Drop everything queued (counted as drops); returns how many frames."""
        n = len(self.queue)
        self.stats.drops += n
        self.stats.drop_bytes += self.queued_bytes
        self.queue.clear()
        self.queued_bytes = 0
        return n


class Switch:
    """The learning switch. Add endpoints with :meth:`add_port`."""

    def __init__(
        self,
        *,
        ageing_time: float = DEFAULT_AGEING_TIME,
        queue_frames: int = DEFAULT_QUEUE_FRAMES,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_macs: int = DEFAULT_MAX_MACS,
        clock: Callable[[], float] = time.monotonic,
        capture: FrameSink | None = None,
    ) -> None:
        self.ageing_time = ageing_time
        #: sees every frame entering the switch once, from whichever port (a port's own
        #: ``capture`` sees that port's frames in both directions)
        self.capture = capture
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        self.max_macs = max_macs
        self.clock = clock
        self.ports: list[SwitchPort] = []
        self._fdb_port: dict[bytes, SwitchPort] = {}
        self._fdb_seen: dict[bytes, float] = {}
        #: ports that were delivered to since the last flush (their endpoints batch used
        #: ring updates until flushed)
        self.dirty: set[SwitchPort] = set()
        self.flooded = 0  # frames flooded (broadcast, multicast, unknown unicast)
        self.filtered = 0  # unicast frames whose destination is on the ingress port
        self.learn_overflows = 0  # source addresses not learned because the table was full
        self.moves = 0  # addresses seen moving to another port

    # ---- ports --------------------------------------------------------------------------

    def add_port(self, endpoint: NetEndpoint, name: str | None = None, *,
                 capture: FrameSink | None = None, queue_frames: int | None = None,
                 queue_bytes: int | None = None) -> SwitchPort:
        """Attach ``endpoint`` on a new port (linking the two) and return the port.

        ``capture`` (e.g. a pcap writer) sees every frame the port carries, both ways.
        """
        if any(p.peer is endpoint for p in self.ports):
            raise LocalError(f"{endpoint!r} is already attached to this switch")
        port = SwitchPort(
            self, name or f"port{len(self.ports)}",
            queue_frames=self.queue_frames if queue_frames is None else queue_frames,
            queue_bytes=self.queue_bytes if queue_bytes is None else queue_bytes,
            capture=capture,
        )
        self.ports.append(port)
        link(port, endpoint)
        endpoint.peer_offloads_changed()
        return port

    def remove_port(self, port: SwitchPort) -> None:
        """Detach a port: forget its addresses, drop its queue, unlink its endpoint."""
        if port not in self.ports:
            raise LocalError(f"{port!r} is not a port of this switch")
        self.ports.remove(port)
        port.attached = False
        port.clear_queue()
        self.dirty.discard(port)
        for mac in [m for m, p in self._fdb_port.items() if p is port]:
            del self._fdb_port[mac]
            del self._fdb_seen[mac]
        endpoint = port.peer
        port.connect(None)
        if endpoint is not None and endpoint.peer is port:
            endpoint.connect(None)

    def port(self, name: str) -> SwitchPort:
        for p in self.ports:
            if p.name == name:
                return p
        raise LocalError(f"no port named {name!r}")

    # ---- forwarding ---------------------------------------------------------------------

    def forward(self, ingress: SwitchPort, hdr: NetHdr, frame: Frame, length: int) -> None:
        """Switch one frame that ``ingress``'s endpoint sent. The frame's buffers are only
        read during this call (queued copies are made when a receiver is busy)."""
        stats = ingress.stats
        stats.tx_frames += 1
        stats.tx_bytes += length
        if ingress.capture is not None:
            ingress.capture.write_frame(frame, length)
        if self.capture is not None:
            self.capture.write_frame(frame, length)
        if length < 12:
            ingress.stats.refused += 1
            return
        head = frame_bytes(frame, 12)
        dst = head[:6]
        src = head[6:12]
        now = self.clock()
        if not src[0] & 1:
            self._learn(src, ingress, now)
        snapshot: list[bytes | None] = [None]
        if not dst[0] & 1:
            out = self._lookup(dst, now)
            if out is not None:
                if out is ingress:
                    self.filtered += 1
                else:
                    out.deliver(hdr, frame, length, snapshot)
                return
        self.flooded += 1
        for port in tuple(self.ports):
            if port is not ingress:
                port.deliver(hdr, frame, length, snapshot)

    def flush(self) -> None:
        """Publish batched deliveries: each touched endpoint updates its used ring once."""
        while self.dirty:
            port = self.dirty.pop()
            peer = port.peer
            if peer is not None:
                peer.flush_rx()

    # ---- the forwarding database --------------------------------------------------------

    def _learn(self, mac: bytes, port: SwitchPort, now: float) -> None:
        old = self._fdb_port.get(mac)
        if old is None and len(self._fdb_port) >= self.max_macs:
            self.expire(now)
            if len(self._fdb_port) >= self.max_macs:
                self.learn_overflows += 1
                return
        if old is not None and old is not port:
            self.moves += 1
        self._fdb_port[mac] = port
        self._fdb_seen[mac] = now

    def _lookup(self, mac: bytes, now: float) -> SwitchPort | None:
        port = self._fdb_port.get(mac)
        if port is None:
            return None
        if now - self._fdb_seen[mac] > self.ageing_time:
            del self._fdb_port[mac]
            del self._fdb_seen[mac]
            return None
        return port

    def expire(self, now: float | None = None) -> int:
        """Forget addresses not seen for ``ageing_time``; returns how many."""
        now = self.clock() if now is None else now
        old = [m for m, seen in self._fdb_seen.items() if now - seen > self.ageing_time]
        for mac in old:
            del self._fdb_port[mac]
            del self._fdb_seen[mac]
        return len(old)

    def fdb(self) -> Iterator[tuple[str, str, float]]:
        """(MAC, port name, age in seconds) for every learned address."""
        now = self.clock()
        for mac, port in self._fdb_port.items():
            yield format_mac(mac), port.name, now - self._fdb_seen[mac]

    def lookup(self, mac: bytes) -> SwitchPort | None:
        """The port ``mac`` was learned on (None if unknown or aged out)."""
        return self._lookup(mac, self.clock())

    # ---- statistics ---------------------------------------------------------------------

    def stats_table(self) -> str:
        """A fixed-width table of per-port counters (for ``--stats``)."""
        cols = ("port", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "drops",
                "refused", "queued")
        rows = [cols]
        for p in self.ports:
            s = p.stats
            rows.append((p.name, str(s.rx_frames), str(s.rx_bytes), str(s.tx_frames),
                         str(s.tx_bytes), str(s.drops), str(s.refused), str(len(p.queue))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                           for i, c in enumerate(r)) for r in rows]
        lines.append(f"learned {len(self._fdb_port)} addresses; flooded {self.flooded}, "
                     f"filtered {self.filtered}, learn overflows {self.learn_overflows}")
        return "\n".join(lines)
