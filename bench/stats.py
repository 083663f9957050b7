"""Figures from raw observations: percentiles, rates over a sliding window, duplicate sends."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): always a value that was observed."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Spread:
    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


def spread(values: Sequence[float]) -> Spread:
    return Spread(
        count=len(values),
        p50=percentile(values, 50),
        p95=percentile(values, 95),
        p99=percentile(values, 99),
        max=max(values) if values else None,
    )


def tail_by_second(points: Iterable[tuple[float, float]]) -> list[dict[str, float]]:
    """(due time in epoch seconds, lateness ms) → per second of due time from the first: count,
    p99 and max, so a slow tail can be told apart as a warm-up, a steady cost or a stall."""
    buckets: dict[int, list[float]] = {}
    ordered = sorted(points)
    if not ordered:
        return []
    start = ordered[0][0]
    for due, lateness in ordered:
        buckets.setdefault(int(due - start), []).append(lateness)
    return [
        {
            "second": second,
            "count": len(values),
            "p99": round(percentile(values, 99) or 0.0, 1),
            "max": round(max(values), 1),
        }
        for second, values in sorted(buckets.items())
    ]


def tail(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max, to a tenth of a unit; None for each when there are no values."""
    found = spread(values)
    return {
        name: None if value is None else round(value, 1)
        for name, value in (("p50", found.p50), ("p99", found.p99), ("max", found.max))
    }


def call_split(calls: Iterable[tuple[float, float, float]]) -> dict[str, Any]:
    """(scheduled, call start, receive) in epoch seconds for each first call → where its lateness
    went: before the call (its start as the dispatcher recorded it − scheduled) and in the call
    (receive − start: the request on its way and the receiver's wait for a core), overall and
    per second of due time (`tail_by_second`)."""
    ordered = sorted(calls)
    before = [(due, (start - due) * 1000) for due, start, _ in ordered]
    within = [(due, (received - start) * 1000) for due, start, received in ordered]
    return {
        "before_call_ms": tail([ms for _, ms in before]),
        "call_ms": tail([ms for _, ms in within]),
        "by_second": {"before_call": tail_by_second(before), "call": tail_by_second(within)},
    }


def peak_rate(times: Iterable[float], window: float = 1.0) -> float:
    """The most events seen in any `window` seconds, per second (a sliding window)."""
    if window <= 0:
        raise ValueError("window must be positive")
    ordered = sorted(times)
    best = 0
    start = 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best / window


def mean_rate(count: int, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


@dataclass(frozen=True)
class Duplicates:
    # Follow-ups whose webhook saw more than one Idempotency-Key: a real double send.
    different_keys: int
    # Follow-ups called more than once with the same key (retries the receiver can fold).
    repeated_calls: int


def duplicates(calls: Iterable[tuple[int, str]]) -> Duplicates:
    """`calls` are (followup_id, idempotency key) pairs, one per webhook call received."""
    keys: dict[int, set[str]] = defaultdict(set)
    per_followup: Counter[int] = Counter()
    for followup_id, key in calls:
        keys[followup_id].add(key)
        per_followup[followup_id] += 1
    return Duplicates(
        different_keys=sum(1 for found in keys.values() if len(found) > 1),
        repeated_calls=sum(1 for n in per_followup.values() if n > 1),
    )


def flatness(samples: Sequence[float]) -> float | None:
    """Growth from the first to the last quarter of a series, as a fraction of the first
    (0.05: five percent more); memory that grows with the work shows up here."""
    if len(samples) < 4:
        return None
    quarter = len(samples) // 4
    head = sum(samples[:quarter]) / quarter
    tail = sum(samples[-quarter:]) / quarter
    return (tail - head) / head if head else None
