"""The capacity scenario's stepping: go on while every step held, report the last that held."""

from __future__ import annotations

from bench.capacity import Step, go_on, held_rate, step_count, verdict

RATES = (50, 100, 200, 400, 800)


def step(rate: int, p99: float | None, *, sent: int | None = None, early: int = 0) -> Step:
    expected = rate * 20
    return Step(rate, expected if sent is None else sent, expected, early, p99)


def test_a_step_holds_only_with_every_send_none_early_and_p99_within():
    assert step(50, 50.0).held(50)
    assert not step(50, 50.1).held(50)
    assert not step(50, 10.0, sent=999).held(50)
    assert not step(50, 10.0, early=1).held(50)
    assert not step(50, None).held(50)


def test_stepping_goes_on_while_every_step_held():
    assert go_on([], 50)
    assert go_on([step(50, 3.0), step(100, 40.0)], 50)
    assert not go_on([step(50, 3.0), step(100, 60.0)], 50)


def test_the_rate_that_held_is_the_last_before_the_first_miss():
    steps = [step(50, 3.0), step(100, 9.0), step(200, 75.0)]
    assert held_rate(steps, 50) == 100
    assert verdict(steps, RATES, 50) == "held up to 100/s (p99 ≤ 50 ms)"


def test_a_miss_at_the_first_step_holds_nothing():
    steps = [step(50, 120.0)]
    assert held_rate(steps, 50) is None
    assert verdict(steps, RATES, 50) == "p99 over 50 ms already at 50/s"


def test_holding_every_step_says_it_was_not_saturated():
    steps = [step(rate, 5.0) for rate in RATES]
    assert held_rate(steps, 50) == 800
    assert "not saturated" in verdict(steps, RATES, 50)


def test_a_step_has_rate_times_seconds_follow_ups():
    assert step_count(800, 20) == 16_000
    assert step_count(1, 0.1) == 1


def test_a_step_that_failed_to_run_is_not_reported_as_a_slow_one():
    failed = Step(100, 0, 0, 0, None)
    steps = [step(50, 3.0), failed]
    assert held_rate(steps, 50) == 50
    assert (
        verdict(steps, RATES, 50)
        == "the 100/s step failed (see its row); held up to 50/s before it"
    )
