"""`make cluster`'s pure parts: which node to kill, how long sends stopped, the summary line."""

from __future__ import annotations

import pytest

from bench.measure import Delivery
from cluster.leaders import busiest_leader, under_replicated
from cluster.outcome import longest_gap, longest_gap_before, outcome, summary_line

A, B, C = "n1@localhost", "n2@localhost", "n3@localhost"


def queue(name: str, leader: str | None, members: int = 3, kind: str = "quorum") -> dict:
    return {"name": name, "leader": leader, "members": [A, B, C][:members], "type": kind}


def test_the_node_leading_most_timer_queues_is_picked_by_prefix_not_by_exact_names() -> None:
    rows = [
        queue("followups.timers.digit.0.1", B),
        queue("followups.timers.digit.0.2", B),
        queue("followups.timers.level.07", A),  # any layout under the prefix counts
        queue("followups.timers.orphans", C),
        # Not timer queues: however many they are, they do not decide.
        queue("followups.scheduler.inbox", A),
        queue("followups.dispatcher.due", A),
        queue("followups.personalizer.due", A),
        queue("followups.timersish", A),
    ]
    found = busiest_leader(rows)
    assert (found.node, found.led, found.timer_queues) == (B, 2, 4)
    assert found.by_node == {A: 1, B: 2, C: 1}


def test_a_tie_goes_to_the_first_name_and_queues_without_a_leader_are_not_counted() -> None:
    rows = [
        queue("followups.timers.a", C),
        queue("followups.timers.b", B),
        queue("followups.timers.c", None),  # mid-election
        queue("followups.timers.d", ""),
    ]
    found = busiest_leader(rows)
    assert (found.node, found.led, found.timer_queues) == (B, 1, 4)


def test_no_timer_queue_with_a_leader_is_an_error() -> None:
    with pytest.raises(ValueError, match="no timer queue has a leader"):
        busiest_leader([queue("followups.scheduler.inbox", A), queue("followups.timers.x", None)])


def test_under_replicated_names_classic_and_short_timer_queues() -> None:
    rows = [
        queue("followups.timers.ok", A),
        queue("followups.timers.two", A, members=2),
        queue("followups.timers.classic", None, members=0, kind="classic"),
        queue("followups.scheduler.inbox", A, members=1),  # not a timer queue
    ]
    assert under_replicated(rows, 3) == ["followups.timers.classic", "followups.timers.two"]


def test_the_gap_is_the_longest_pause_ending_after_the_kill() -> None:
    received = [1.0, 2.0, 3.0, 9.5, 10.0, 10.5, 18.0]
    # Killed at 4.0: sends stopped from 3.0 to 9.5. The 7.5 s pause at 10.5 starts within the
    # window after the kill, so it counts too and is the longest.
    assert longest_gap(received, kill_at=4.0, until=20.0) == pytest.approx(7.5)
    # With a window too short to reach 10.5, only the pause across the kill counts.
    assert longest_gap(received, kill_at=4.0, until=20.0, window=6.0) == pytest.approx(6.5)
    # A pause that ended before the kill is not the kill's doing; the one across it is.
    assert longest_gap([0.0, 10.0, 11.0, 11.5], kill_at=10.5, until=20.0) == pytest.approx(1.0)


def test_sends_that_never_resume_stop_until_the_end() -> None:
    assert longest_gap([1.0, 2.0], kill_at=3.0, until=50.0) == pytest.approx(48.0)
    assert longest_gap([], kill_at=3.0, until=50.0) == pytest.approx(47.0)
    # Nothing before the kill: the pause runs from the kill to the first send.
    assert longest_gap([6.0, 7.0], kill_at=3.0, until=50.0) == pytest.approx(3.0)


def test_the_usual_gap_is_measured_before_the_kill_only() -> None:
    assert longest_gap_before([1.0, 1.5, 3.5, 4.0, 20.0], kill_at=5.0) == pytest.approx(2.0)
    assert longest_gap_before([6.0], kill_at=5.0) == 0.0


def delivery(followup_id: int, key: str, received: float, scheduled: float) -> Delivery:
    return Delivery(followup_id=followup_id, key=key, received_at=received, scheduled_at=scheduled)


def test_outcome_counts_lost_double_keys_repeats_and_early_sends() -> None:
    found = [
        delivery(1, "k1", 10.2, 10.0),
        delivery(1, "k1", 11.0, 10.0),  # a retry under the same key: not a double send
        delivery(2, "k2", 12.0, 11.0),
        delivery(2, "k2-other", 12.5, 11.0),  # a second key: a double send
        delivery(3, "k3", 11.9, 12.0),  # before its time
        delivery(99, "old", 12.0, 12.0),  # not this run's
    ]
    result = outcome(5, [1, 2, 3, 4], found, kill_at=10.5, until=20.0)
    assert (result.requested, result.sent, result.lost) == (5, 3, 2)  # 4 never sent, 5 no row
    assert (result.double_keys, result.repeated_calls, result.early) == (1, 2, 1)
    assert result.worst_lateness_s == pytest.approx(1.0)
    assert not result.met_goal


def test_the_goal_is_none_lost_doubled_or_early_and_sends_back_within_ten_seconds() -> None:
    found = [delivery(i, f"k{i}", float(i) + 0.1, float(i)) for i in range(1, 5)]
    on_time = outcome(4, [1, 2, 3, 4], found, kill_at=2.5, until=10.0)
    assert (on_time.lost, on_time.stall_s) == (0, pytest.approx(1.0))
    assert on_time.met_goal
    stalled = [*found[:2], delivery(3, "k3", 14.0, 3.0), delivery(4, "k4", 14.1, 4.0)]
    assert not outcome(4, [1, 2, 3, 4], stalled, kill_at=2.5, until=20.0).met_goal
    # Sends kept flowing (no long pause), but one follow-up waited 30 s: not met either.
    flowing = [*found, *(delivery(i, f"k{i}", i + 0.1, i) for i in range(5, 40))]
    held = [*flowing, delivery(40, "k40", 40.0, 10.0)]
    result = outcome(40, list(range(1, 41)), held, kill_at=2.5, until=50.0)
    assert (result.lost, result.late, result.stall_s) == (0, 1, pytest.approx(1.0))
    assert not result.met_goal


def test_the_summary_is_one_line_with_every_figure() -> None:
    found = [delivery(1, "k1", 10.25, 10.0), delivery(2, "k2", 16.0, 15.0)]
    line = summary_line(outcome(2, [1, 2], found, kill_at=11.0, until=20.0), B)
    assert "\n" not in line
    assert line.startswith("cluster ok: sent 2/2, lost 0, double keys 0, early 0")
    assert "worst lateness 1.00 s (0 later than 10 s)" in line
    assert f"sends stopped 5.75 s after killing {B}" in line
    failed = summary_line(outcome(3, [1, 2], found, kill_at=11.0, until=20.0), B)
    assert failed.startswith("cluster FAILED: sent 2/3, lost 1")
