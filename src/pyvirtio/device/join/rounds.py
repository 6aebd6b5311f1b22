"""Multi-round feature negotiation across the sides of a join (docs/multi-round.md, §9.2 of
the virtio paper): every side is offered the same features, and sides whose drivers follow
rounds are led, round by round, to the set every side can use.

The rule, per side X answering round k with ``a`` (MULTI_ROUND acked):

* X waits (at most ``wait`` seconds) until every other side has answered round k too, or has
  finished (a driver that does not know the bit finishes in its first round);
* X's next offer is ``a`` with its device-specific bits narrowed to those every other side's
  latest answer holds (ring and transport bits are per side: each side has its own rings);
* the offer keeps MULTI_ROUND while some other side is still negotiating with a different
  device-specific set, so that side's next answer can still narrow it; otherwise it is final.

Two drivers that follow rounds both end on the intersection of their wishes (in two rounds
if one set holds the other, three otherwise); against a driver that does not follow them,
the other side ends on what both can use, and the joiner translates only where a side that
answered once took more. The waiting needs the sides' drivers to run concurrently (threads,
processes): a vhost-user server answers on one event loop and does not carry rounds yet.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from pyvirtio.core import features as CF
from pyvirtio.spec import features as F

#: seconds a side waits for the other sides' answer to the same round
DEFAULT_ROUND_WAIT = 5.0
#: device-independent bits (reserved range 24..49: ring, transport and negotiation features)
_TRANSPORT_BITS = ((1 << 50) - 1) & ~((1 << 24) - 1)


def device_bits(features: int) -> int:
    """The device-specific bits of ``features`` (0-23 and 50 up)."""
    return features & ~_TRANSPORT_BITS


@dataclass
class _SideState:
    round: int = 0  # rounds answered since the last reset
    latest: int | None = None  # the latest answer (without MULTI_ROUND)
    final: bool = False


class RoundBroker:
    """The shared state of the sides' negotiations (thread-safe)."""

    def __init__(self, sides: int, wait: float = DEFAULT_ROUND_WAIT) -> None:
        self.wait = wait
        self._cond = threading.Condition()
        self._sides = [_SideState() for _ in range(sides)]
        #: how many times a side stopped waiting for another side (it never answered)
        self.timeouts = 0

    def reset(self, side: int) -> None:
        """Side ``side`` was reset: its rounds are forgotten."""
        with self._cond:
            self._sides[side] = _SideState()
            self._cond.notify_all()

    def finished(self, side: int, features: int) -> None:
        """Side ``side``'s features are final."""
        with self._cond:
            s = self._sides[side]
            s.round += 1
            s.latest = features & ~F.bit(F.MULTI_ROUND)
            s.final = True
            self._cond.notify_all()

    def next_offer(self, side: int, rounds: CF.Rounds) -> int:
        """The next offer for ``side``, whose last answer in ``rounds`` acked MULTI_ROUND."""
        answer = rounds.answers[-1][1] & ~F.bit(F.MULTI_ROUND)
        k = len(rounds.answers)
        with self._cond:
            me = self._sides[side]
            me.round, me.latest, me.final = k, answer, False
            self._cond.notify_all()
            deadline = time.monotonic() + self.wait
            while True:
                # Looked up again each time: a side's reset replaces its state.
                others = [s for i, s in enumerate(self._sides) if i != side]
                if all(o.final or o.round >= k for o in others):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self.timeouts += 1
                    break
                self._cond.wait(left)
            common = device_bits(answer)
            for o in others:
                if o.latest is not None:
                    common &= device_bits(o.latest)
            offer = (answer & _TRANSPORT_BITS) | common
            more = any(not o.final and o.latest is not None and device_bits(o.latest) != common
                       for o in others)
            return offer | F.bit(F.MULTI_ROUND) if more else offer
