"""Reading the BullMQ peer's raw files the way ours are read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.peer import TICKS, cpu_between, peer_plan, peer_row, peer_sends


def test_its_parameters_follow_our_scenarios():
    steady = peer_plan("steady", 2000, 20)
    assert (steady.n, steady.spread, steady.concurrency) == (2000, 20, 5)
    assert steady.start_in >= 5 + 2000 / 1000  # the producer enqueues everything first
    burst = peer_plan("burst", 2000, 20)
    assert (burst.spread, burst.concurrency) == (0, 50)
    capacity = peer_plan("capacity", 16_000, 20)
    assert capacity.args()[:4] == ["--n", "16000", "--spread", "20"]
    with pytest.raises(ValueError, match="no peer scenario"):
        peer_plan("pending", 10, 20)


def test_only_answered_calls_of_scheduled_follow_ups_count():
    schedule = [{"contractor_id": 1, "due": 100.0}, {"contractor_id": 2, "due": 101.0}]
    received = [
        {
            "t": 100.02,
            "status": 200,
            "headers": {"Idempotency-Key": "a"},
            "body": {"contractor_id": 1},
        },
        {"t": 101.5, "status": 503, "headers": {}, "body": {"contractor_id": 2}},
        {"t": 101.9, "status": 200, "headers": {}, "body": {"contractor_id": 2}},
        {"t": 102.0, "status": 200, "headers": {}, "body": {"contractor_id": 99}},
    ]
    sends = peer_sends(schedule, received)
    assert [(s.contractor_id, s.key, s.due) for s in sends] == [(1, "a", 100.0), (2, "", 101.0)]


def sample(t: float, **ticks: int) -> dict:
    return {"t": t, "total": 0, "idle": 0, "cat": ticks}


def test_cpu_is_the_difference_of_cumulative_ticks_over_the_window():
    samples = [
        sample(10, workers=0),
        sample(11, workers=TICKS, redis=TICKS // 2),
        sample(12, workers=3 * TICKS, redis=TICKS),
    ]
    assert cpu_between(samples) == {"redis": 1.0, "workers": 3.0}
    assert cpu_between(samples, start=11.5, end=11.9) == {"redis": 0.5, "workers": 2.0}
    assert cpu_between([]) == {}


def test_a_steady_run_becomes_a_row_with_our_definitions(tmp_path: Path):
    run = tmp_path / "run-1"
    run.mkdir()
    schedule = [{"contractor_id": i, "due": 100.0 + i} for i in range(3)]
    received = [
        {
            "t": 100.0 + i + 0.01 * (i + 1),
            "status": 200,
            "headers": {},
            "body": {"contractor_id": i},
        }
        for i in range(3)
    ]
    received.append(dict(received[0]))  # a repeated call of the first
    (run / "schedule.jsonl").write_text("".join(json.dumps(r) + "\n" for r in schedule))
    (run / "received.jsonl").write_text("".join(json.dumps(r) + "\n" for r in received))
    samples = [sample(99, workers=0, foreign=0), sample(104, workers=TICKS * 3, foreign=TICKS * 50)]
    (run / "cpu_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = {"run_path": str(run), "run_dir": "run-1", "cpu_run": {"core_pct": {"foreign": 5}}}
    row = peer_row("steady", "steady", summary)
    assert (row.sent, row.expected, row.early, row.repeated_calls) == (3, 3, 0, 1)
    assert row.lateness_ms is not None
    assert row.lateness_ms.max == pytest.approx(30.0)
    assert row.throughput == pytest.approx(2 / (102.03 - 100.01))
    assert row.cpu_ms_per_followup == pytest.approx(1000.0)  # other people's CPU left out
    assert row.notes == []
