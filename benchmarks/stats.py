"""Honest figures for noisy machines, shared by every benchmark.

These machines swing up to 3x between rounds, so one median decides nothing. Every cell is
shown as min / median / max over the rounds, and a comparison of two back-ends is the ratio
of their medians *plus* the range of the per-round ratios (round i of one against round i of
the other: the rounds alternate, so each pair ran under the same machine conditions). A
comparison is only called when the whole range of per-round ratios is on one side of 1.0;
otherwise it is "undecided".
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """min / median / max of one cell's per-round values."""

    low: float
    median: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            nan = float("nan")
            return cls(nan, nan, nan)
        return cls(min(values), statistics.median(values), max(values))

    def show(self, fmt: str = ".0f") -> str:
        return f"{self.low:{fmt}} / {self.median:{fmt}} / {self.high:{fmt}}"


@dataclass(frozen=True)
class Ratio:
    """ours / theirs: the ratio of the medians and the range of the per-round ratios."""

    of_medians: float
    low: float
    high: float

    @classmethod
    def of(cls, ours: Sequence[float], theirs: Sequence[float]) -> Ratio:
        med = statistics.median(ours) / statistics.median(theirs) if ours and theirs \
            else float("nan")
        rounds = [a / b for a, b in zip(ours, theirs, strict=False) if b]
        if not rounds:
            return cls(med, float("nan"), float("nan"))
        return cls(med, min(rounds), max(rounds))

    def verdict(self, higher_is_better: bool = True) -> str:
        """"ok" when every round was at least as good, "worse" when every round was worse,
        "undecided" when the per-round ratios straddle 1.0."""
        if self.low != self.low:  # NaN: nothing to compare
            return "n/a"
        best, worst = (self.high, self.low) if higher_is_better else (1 / self.low,
                                                                        1 / self.high)
        if worst >= 1.0:
            return "ok"
        if best < 1.0:
            return "worse"
        return "undecided"

    def show(self) -> str:
        return f"{self.of_medians:5.2f} [{self.low:.2f}-{self.high:.2f}]"


def best(candidates: Mapping[str, Sequence[float]], higher_is_better: bool = True
         ) -> str | None:
    """The candidate with the best median (the highest, or the lowest with
    ``higher_is_better=False``): the strongest peer of a cell, which a comparison is judged
    against. None when no candidate has a value."""
    medians = {name: statistics.median(v) for name, v in candidates.items() if v}
    if not medians:
        return None
    pick = max if higher_is_better else min
    return pick(medians, key=lambda name: medians[name])
