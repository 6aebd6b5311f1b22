"""Joining guests' virtqueues (§9.2 of the virtio paper): ``pyvirtio join``.

"Get a buffer from this guest's virtqueue, the other guest's virtqueue, and memcpy data
between them based on the read/write flags of the buffers." Two (or more) front-ends attach
to the sides of a :class:`Join`; each side shows the device id, features and config space of
one device type and no device model behind it. Per device type:

* ``console``: generic routes (:mod:`.core`): each side's transmitq (queue 1) into the other
  side's receiveq (queue 0), or any queues the user names (:class:`~.core.Mapping`); bytes
  are copied as they are, nothing is dropped.
* ``net``: the two sides' transmit queues into each other's receive queue, translating the
  virtio-net header where the two drivers' features differ (:mod:`.net`).

Every side is offered the same features (less what the user withholds from one side with
``withhold``, to stand for a guest that refuses them). With ``multi_round``, sides whose
drivers follow multi-round negotiation (pyvirtio drivers) converge to the features both can
use (:mod:`.rounds`, docs/multi-round.md); a driver that does not (Linux) answers once, and
the joiner translates where the two sides differ.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvirtio.device.join.core import JoinSide, Mapping, Route, crosswise
from pyvirtio.device.join.core import connect as connect_routes
from pyvirtio.device.join.net import JoinNetSide, join_net
from pyvirtio.device.join.rounds import DEFAULT_ROUND_WAIT, RoundBroker
from pyvirtio.device.net import NetDevice
from pyvirtio.device.net.endpoint import format_mac
from pyvirtio.errors import LocalError
from pyvirtio.spec import console as C
from pyvirtio.spec import features as F
from pyvirtio.spec import ids

KINDS = ("net", "console")
CONSOLE_FEATURE_NAMES = F.names_in(vars(C), "VIRTIO_CONSOLE_F_", strip="VIRTIO_")

__all__ = [
    "KINDS",
    "Join",
    "JoinNetSide",
    "JoinSide",
    "Mapping",
    "RoundBroker",
    "Route",
    "parse_features",
]


def parse_features(text: str, names: dict[int, str]) -> int:
    """``"guest_tso4,guest_tso6,12"``: feature names (as in ``names``, any case, with or
    without the ``VIRTIO_NET_F_`` style prefix) or bit numbers, as a mask."""
    by_name = {n.upper(): b for b, n in names.items()}
    by_name.update({n.upper(): b for b, n in F.NAMES.items()})
    mask = 0
    for item in filter(None, (s.strip() for s in text.split(","))):
        key = item.upper()
        for prefix in ("VIRTIO_NET_F_", "VIRTIO_CONSOLE_F_", "VIRTIO_F_"):
            key = key.removeprefix(prefix)
        if key.isdigit():
            mask |= F.bit(int(key))
        elif key in by_name:
            mask |= F.bit(by_name[key])
        else:
            raise LocalError(f"unknown feature {item!r}; known: "
                             + ", ".join(sorted(n.lower() for n in names.values())))
    return mask


class Join:
    """The sides of one join and the routes between them (see the module doc).

    ``kind``: ``"net"`` or ``"console"``. ``mappings``: for console, which queue of which side
    is copied into which (default: crosswise, 2 sides). ``withhold``: side -> feature mask
    not offered to that side. ``macs``: net, one per side (default ``02:70:79:76:00:0N``).
    Other keyword arguments (``queue_size``, ``transport_features``) go to every side.
    """

    def __init__(self, kind: str, sides: int = 2, *, mappings: Sequence[Mapping] | None = None,
                 withhold: dict[int, int] | None = None, macs: Sequence[bytes] | None = None,
                 multi_round: bool = False, round_wait: float = DEFAULT_ROUND_WAIT,
                 **kwargs: object) -> None:
        if kind not in KINDS:
            raise LocalError(f"cannot join {kind!r} devices; one of {', '.join(KINDS)}")
        if sides < 2:
            raise LocalError(f"a join needs at least 2 sides, not {sides}")
        self.kind = kind
        self.broker = RoundBroker(sides, round_wait)
        self.routes: list[Route] = []
        self.sides: list[JoinSide | JoinNetSide] = []
        if kind == "net":
            if sides != 2 or mappings:
                raise LocalError("a net join has exactly 2 sides, each transmitq into the "
                                 "other's receiveq (use `pyvirtio serve net` for a switch)")
            macs = list(macs) if macs else [bytes.fromhex(f"02707976000{i + 1}")
                                            for i in range(2)]
            nets = [JoinNetSide(macs[i], side=i, name=f"side{i}", multi_round=multi_round,
                                **kwargs) for i in range(2)]
            join_net(nets[0], nets[1])
            self.sides.extend(nets)
        else:
            consoles = [JoinSide(ids.CONSOLE, 2, 0, config=bytes(C.CONFIG_SIZE), side=i,
                                 name=f"side{i}", feature_names=CONSOLE_FEATURE_NAMES,
                                 multi_round=multi_round,
                                 **kwargs)  # type: ignore[arg-type]
                        for i in range(sides)]
            self.routes = connect_routes(
                consoles, list(mappings) if mappings else crosswise(sides, tx=1, rx=0))
            self.sides.extend(consoles)
        for side in self.sides:
            side.broker = self.broker
        for index, mask in (withhold or {}).items():
            if not 0 <= index < sides:
                raise LocalError(f"cannot withhold features from side {index}: sides are "
                                 f"0..{sides - 1}")
            self.sides[index].offered_features &= ~mask

    @staticmethod
    def feature_names_of(kind: str) -> dict[int, str]:
        """The names of ``kind``'s device-specific feature bits."""
        return NetDevice.feature_names if kind == "net" else CONSOLE_FEATURE_NAMES

    def describe(self) -> str:
        """One line per side and route, for humans."""
        lines = []
        for side in self.sides:
            extra = f" mac {format_mac(side.mac)}" if isinstance(side, JoinNetSide) else ""
            lines.append(f"{side.name}: virtio-{ids.name(side.device_id)}{extra}")
        if self.kind == "net":
            lines.append("routes: side0 transmitq > side1 receiveq, side1 transmitq > side0 "
                         "receiveq (header translated where the drivers' features differ)")
        else:
            lines.append("routes: " + ", ".join(
                f"{r.src.name}:{r.src_queue} > {r.dst.name}:{r.dst_queue}" for r in self.routes))
        return "\n".join(lines)

    def stats_table(self) -> str:
        """Counters per route (console) or per side (net)."""
        if self.kind == "net":
            rows = []
            for side in self.sides:
                assert isinstance(side, JoinNetSide)
                s = side.stats
                rows.append(f"{side.name}: tx {s.tx_frames} frames {s.tx_bytes} bytes "
                            f"(errors {s.tx_errors}, dropped {s.tx_dropped}), rx {s.rx_frames} "
                            f"frames {s.rx_bytes} bytes (dropped {s.rx_dropped}, converted "
                            f"{s.rx_converted}, busy {s.rx_busy})")
            return "\n".join(rows)
        return "\n".join(f"{r!r}: " + ", ".join(f"{k} {v}" for k, v in r.stats.as_dict().items())
                         for r in self.routes)
