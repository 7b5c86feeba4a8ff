"""Percentiles and a mergeable log-bucketed histogram, shared by the load generator and reports."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

# 1 % wide buckets from 1 us up: a percentile read from the histogram is within 1 % of the
# true sample, and a window's histogram stays small (a few hundred keys) whatever its size.
_UNIT: Final = 1e-6
_SCALE: Final = 1 / math.log(1.01)
_BELOW_UNIT: Final = -1  # the bucket for values under 1 us (0 included: same-read arrivals)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Histogram:
    """Counts of values (seconds) in 1 %-wide logarithmic buckets; add, merge, read percentiles."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        key = int(math.log(seconds / _UNIT) * _SCALE) if seconds >= _UNIT else _BELOW_UNIT
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Histogram) -> None:
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100), as its bucket's upper edge (the max for the top one)."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        keys = sorted(self.counts)
        for key in keys:
            seen += self.counts[key]
            if seen >= rank:
                if key == keys[-1]:
                    return self.max
                return 0.0 if key == _BELOW_UNIT else min(_upper_edge(key), self.max)
        return self.max

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def to_json(self) -> dict[str, object]:
        return {
            "counts": {str(k): v for k, v in sorted(self.counts.items())},
            "count": self.count,
            "total": self.total,
            "max": self.max,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Histogram:
        hist = cls()
        counts = data.get("counts", {})
        if isinstance(counts, Mapping):
            hist.counts = {int(k): int(v) for k, v in counts.items()}
        hist.count = _as_int(data.get("count", 0))
        hist.total = _as_float(data.get("total", 0.0))
        hist.max = _as_float(data.get("max", 0.0))
        return hist

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        out = cls()
        for part in parts:
            out.merge(part)
        return out


def _upper_edge(key: int) -> float:
    return _UNIT * math.exp((key + 1) / _SCALE)


def _as_int(value: object) -> int:
    return int(value) if isinstance(value, int | float | str) else 0


def _as_float(value: object) -> float:
    return float(value) if isinstance(value, int | float | str) else 0.0
