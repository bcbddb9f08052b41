"""Percentiles: the one place where tlscache turns latencies into p50 and p99.

Two shapes of data need them: raw samples (dc_test, the farm's workload, the
benchmarks) and the fixed-bucket histogram that :class:`~tlscache.SessionCache`
keeps on the handshake path (and that the farm adds up across backends). Both
answers are defined once here so that every report agrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["histogram_quantile", "nearest_rank"]


def nearest_rank(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of already sorted samples.

    None when there are no samples, rather than a misleading zero. The p99 of
    100 samples is the 99th smallest.
    """
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def histogram_quantile(
    bounds: Sequence[float], counts: Sequence[int], q: float, top: float
) -> float:
    """The ``q`` quantile of a bucketed histogram, interpolated within its bucket.

    ``bounds`` are the buckets' upper bounds; ``counts`` has one more entry than
    ``bounds``, the overflow bucket, whose upper bound is ``top`` (the largest
    value seen). The answer never exceeds ``top``; 0.0 for an empty histogram.
    """
    total = sum(counts)
    if total == 0:
        return 0.0
    top = max(top, 0.0)
    target = q * total
    seen = 0
    lower = 0.0
    for i, count in enumerate(counts):
        upper = bounds[i] if i < len(bounds) else max(top, lower)
        if count and seen + count >= target:
            return min(lower + (upper - lower) * (target - seen) / count, top)
        seen += count
        lower = upper
    return top
