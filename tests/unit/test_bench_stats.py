"""The benchmark's statistics helpers (bench/stats.py): percentiles, sliding-window rates,
duplicate sends and memory growth."""

from __future__ import annotations

import pytest

from bench.stats import (
    call_split,
    duplicates,
    flatness,
    mean_rate,
    peak_rate,
    percentile,
    spread,
    tail_by_second,
)


def test_percentile_is_nearest_rank_and_an_observed_value() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([7.5, 1.0, 3.0], 50) == 3.0  # unsorted input


def test_percentile_of_nothing_is_none_and_bad_q_is_refused() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_spread_summarises_a_sample() -> None:
    summary = spread([5.0, 1.0, 2.0, 4.0, 3.0])
    assert (summary.count, summary.p50, summary.max) == (5, 3.0, 5.0)
    empty = spread([])
    assert (empty.count, empty.p99, empty.max) == (0, None, None)


def test_peak_rate_counts_the_busiest_window() -> None:
    # 10 events in the first half second, then one a second: the busiest second holds 10.
    times = [i * 0.05 for i in range(10)] + [2.0, 3.0, 4.0]
    assert peak_rate(times, 1.0) == 10.0
    assert peak_rate(times, 0.5) == 20.0
    # A window is half-open: events exactly one window apart are not in the same one.
    assert peak_rate([0.0, 1.0, 2.0], 1.0) == 1.0
    assert peak_rate([], 1.0) == 0.0
    with pytest.raises(ValueError, match="positive"):
        peak_rate([1.0], 0)


def test_mean_rate_needs_elapsed_time() -> None:
    assert mean_rate(100, 2.0) == 50.0
    assert mean_rate(5, 0.0) is None


def test_duplicates_tell_a_double_send_from_a_retry() -> None:
    calls = [
        (1, "a"),
        (2, "b"),
        (2, "b"),  # retried with the same key: repeated, not a double send
        (3, "c"),
        (3, "d"),  # two keys for one follow-up: a double send
    ]
    found = duplicates(calls)
    assert found.different_keys == 1
    assert found.repeated_calls == 2
    assert duplicates([]).different_keys == 0


def test_flatness_compares_the_first_and_last_quarters() -> None:
    assert flatness([100.0] * 8) == 0.0
    assert flatness([100.0, 100.0, 110.0, 110.0, 120.0, 120.0, 150.0, 150.0]) == pytest.approx(0.5)
    assert flatness([1.0, 2.0]) is None


def test_the_tail_by_second_counts_each_second_of_due_time_from_the_first():
    points = [(100.0, 5.0), (100.9, 7.0), (101.1, 300.0), (103.0, 1.0), (101.5, 2.0)]
    assert tail_by_second(points) == [
        {"second": 0, "count": 2, "p99": 7.0, "max": 7.0},
        {"second": 1, "count": 2, "p99": 300.0, "max": 300.0},
        {"second": 3, "count": 1, "p99": 1.0, "max": 1.0},
    ]
    assert tail_by_second([]) == []


def test_the_call_split_tells_the_wait_before_the_call_from_the_call_itself():
    # (scheduled, call start, receive): one call waited 30 ms to start, one took 40 ms on its way.
    calls = [(100.0, 100.002, 100.005), (100.5, 100.53, 100.532), (101.2, 101.201, 101.241)]
    found = call_split(calls)
    assert found["before_call_ms"] == {"p50": 2.0, "p99": 30.0, "max": 30.0}
    assert found["call_ms"] == {"p50": 3.0, "p99": 40.0, "max": 40.0}
    assert found["by_second"] == {
        "before_call": [
            {"second": 0, "count": 2, "p99": 30.0, "max": 30.0},
            {"second": 1, "count": 1, "p99": 1.0, "max": 1.0},
        ],
        "call": [
            {"second": 0, "count": 2, "p99": 3.0, "max": 3.0},
            {"second": 1, "count": 1, "p99": 40.0, "max": 40.0},
        ],
    }
    empty = call_split([])
    assert empty["call_ms"] == {"p50": None, "p99": None, "max": None}
    assert empty["by_second"] == {"before_call": [], "call": []}
