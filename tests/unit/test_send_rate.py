"""The adaptive send rate's rule, without a database: halve on a throttling signal (once per
window), rise by one per window after enough deliveries in a row, between floor and ceiling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.send_rate import (
    DEFAULT_THROTTLE_CODES,
    DEFAULT_UNDELIVERABLE_CODES,
    WINDOW,
    RatePolicy,
    RateState,
    Signal,
    next_state,
    signal_for_report,
)

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
POLICY = RatePolicy(ceiling=10, floor=2, recovery_deliveries=3)


def run(state: RateState, *steps: tuple[Signal, float]) -> RateState:
    for signal, seconds in steps:
        state = next_state(state, signal, T0 + timedelta(seconds=seconds), POLICY)
    return state


def test_a_throttling_signal_halves_the_rate():
    state = run(RateState(10), (Signal.THROTTLED, 0))
    assert state.limit_per_minute == 5
    assert state.throttled_at == T0


def test_signals_within_one_window_count_once():
    state = run(
        RateState(10), (Signal.THROTTLED, 0), (Signal.THROTTLED, 1), (Signal.THROTTLED, 59.9)
    )
    assert state.limit_per_minute == 5
    assert state.throttled_at == T0, "the window runs from the signal that counted"


def test_a_signal_a_window_later_halves_again_but_never_below_the_floor():
    window = WINDOW.total_seconds()
    state = run(
        RateState(10),
        (Signal.THROTTLED, 0),
        (Signal.THROTTLED, window),
        (Signal.THROTTLED, 2 * window),
        (Signal.THROTTLED, 3 * window),
    )
    assert state.limit_per_minute == 2


def test_recovery_needs_enough_deliveries_in_a_row_and_a_window_after_the_halving():
    state = run(RateState(10), (Signal.THROTTLED, 0))
    state = run(state, (Signal.DELIVERED, 10), (Signal.DELIVERED, 11), (Signal.DELIVERED, 12))
    assert state.limit_per_minute == 5, "no rise within a window of the halving"
    state = run(state, (Signal.DELIVERED, 61))
    assert state.limit_per_minute == 6
    assert state.raised_at == T0 + timedelta(seconds=61)


def test_a_report_that_is_not_a_delivery_ends_the_run():
    state = run(
        RateState(5),
        (Signal.DELIVERED, 0),
        (Signal.DELIVERED, 1),
        (Signal.NOT_DELIVERED, 2),
        (Signal.DELIVERED, 3),
        (Signal.DELIVERED, 4),
    )
    assert state.limit_per_minute == 5
    assert state.delivered_in_a_row == 2
    assert run(state, (Signal.DELIVERED, 5)).limit_per_minute == 6


def test_the_rate_rises_by_one_per_minute_up_to_the_ceiling():
    state = run(RateState(7), *[(Signal.DELIVERED, n) for n in range(3)])
    assert state.limit_per_minute == 8
    # a delivery every 20 s for four minutes: one rise a minute, then the ceiling
    limits = []
    for n in range(1, 13):
        state = run(state, (Signal.DELIVERED, 2 + n * 20))
        limits.append(state.limit_per_minute)
    assert limits == [8, 8, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10]


def test_a_throttle_resets_the_run_of_deliveries():
    state = run(RateState(8), (Signal.DELIVERED, 0), (Signal.DELIVERED, 1), (Signal.THROTTLED, 2))
    assert (state.limit_per_minute, state.delivered_in_a_row) == (4, 0)


def test_a_lowered_ceiling_holds_at_once():
    assert next_state(RateState(50), Signal.DELIVERED, T0, POLICY).limit_per_minute == 10
    assert next_state(RateState(50), Signal.THROTTLED, T0, POLICY).limit_per_minute == 5


def test_at_the_ceiling_deliveries_change_only_the_run():
    state = run(RateState(10), *[(Signal.DELIVERED, n) for n in range(5)])
    assert (state.limit_per_minute, state.delivered_in_a_row) == (10, 5)


def test_the_policy_refuses_a_floor_above_the_ceiling():
    with pytest.raises(ValueError, match="floor"):
        RatePolicy(ceiling=3, floor=4)


@pytest.mark.parametrize(
    ("status", "code", "signal"),
    [
        ("delivered", None, Signal.DELIVERED),
        ("undelivered", "30007", Signal.THROTTLED),
        ("failed", "30022", Signal.THROTTLED),
        ("undelivered", "30003", Signal.NOT_DELIVERED),
        ("failed", None, Signal.NOT_DELIVERED),
    ],
)
def test_the_signal_of_a_report(status, code, signal):
    assert signal_for_report(status, code, frozenset(DEFAULT_THROTTLE_CODES)) is signal


def test_the_default_lists_do_not_overlap():
    assert not set(DEFAULT_THROTTLE_CODES) & set(DEFAULT_UNDELIVERABLE_CODES)
    assert {"30001", "30007", "30022"} <= set(DEFAULT_THROTTLE_CODES)
    assert {"30003", "30005", "30006"} <= set(DEFAULT_UNDELIVERABLE_CODES)
