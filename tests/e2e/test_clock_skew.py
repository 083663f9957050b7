"""The services on a host clock 100 ms off the database's, through real processes: the
database's clock is the clock of record, so the skew changes nothing.

The services run under libfaketime (Debian's `faketime`, installed by scripts/ensure-services.sh)
with their wall clock shifted and their monotonic clock left real, which is what a host whose NTP
is off looks like. The test process, the broker and the database keep the real clock.

What a skew broke while the services used their own clock:
- ahead: the send timer arrived early by the database's clock and the claim refused it as not yet
  due, so the timer was dropped as stale and the repair sweep sent the follow-up much later; a
  timer that did arrive late enough to be claimed was sent early by the database's clock;
- behind: every send waited for the host's instant, late by the whole skew.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from glob import glob
from typing import Any

import pytest

from tests.e2e.conftest import request_followup, soon, wait_for_final
from tests.support.data import add_contractor

SKEW_SECONDS = 0.1
FOLLOWUPS = 36
SWEEP_GRACE_SECONDS = 2


def faketime_library() -> str:
    found = sorted(glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is missing: run scripts/ensure-services.sh (apt package faketime)")
    return found[0]


def shifted_clock(seconds: float) -> dict[str, str]:
    """Environment that shifts a process's wall clock by `seconds` and keeps its monotonic clock
    (the event loop's) real. libfaketime reads fractions of a second in this form."""
    return {
        "LD_PRELOAD": faketime_library(),
        "FAKETIME": f"{seconds:+.6f}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def wall_minus_monotonic(extra_env: dict[str, str]) -> float:
    probe = "import time; print(time.time() - time.monotonic())"
    output = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **extra_env},
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return float(output)


def log_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


@pytest.mark.parametrize("skew", [SKEW_SECONDS, -SKEW_SECONDS], ids=["host-ahead", "host-behind"])
async def test_a_host_clock_off_the_database_still_sends_every_followup_on_time(
    pool, bus, receiver, start_services, skew
):
    env = shifted_clock(skew)
    # The harness itself: the shift reaches a child process, its monotonic clock stays real.
    shift = wall_minus_monotonic(env) - wall_minus_monotonic({})
    assert abs(shift - skew) < SKEW_SECONDS / 2, f"faketime shifted the clock by {shift:.4f} s"

    contractor = await add_contractor(pool)
    # A quick sweep, so that a follow-up whose timer was dropped is still sent and shows up here
    # as a re-arm, not as a timeout.
    services = start_services(
        SWEEP_INTERVAL_SECONDS="1", SWEEP_GRACE_SECONDS=str(SWEEP_GRACE_SECONDS), **env
    )
    for i in range(FOLLOWUPS):
        await request_followup(bus, contractor, soon(3 + i * 0.1), idempotency_key=f"skew-{i}")
    rows = await wait_for_final(pool, FOLLOWUPS, timeout=90)

    events = log_events(services["dispatcher"].log_text())
    stale = [e for e in events if e.get("event") == "stale timer dropped"]
    rearmed = sum(
        e.get("dispatch", 0)
        for e in events
        if e.get("event") == "repair sweep re-armed lost timers"
    )
    takeovers = await pool.fetchval(
        "SELECT count(*) FROM followup_transitions WHERE detail->>'takeover' = 'true'"
    )
    calls = await pool.fetch(
        """SELECT w.called_at, f.scheduled_time,
                  extract(epoch FROM w.called_at - f.scheduled_time)::float8 AS lateness
           FROM webhook_calls AS w JOIN contractor_followup_schedules AS f ON f.id = w.followup_id
           ORDER BY f.scheduled_time"""
    )
    assert calls, "no webhook call was made"
    lateness = sorted(c["lateness"] for c in calls)
    early = [c["lateness"] for c in calls if c["called_at"] < c["scheduled_time"]]
    print(
        f"\nhost clock {skew:+.3f} s: {sum(r['status'] == 'sent' for r in rows)}/{FOLLOWUPS} sent,"
        f" {len(stale)} timers dropped as stale, {rearmed} re-armed by the sweep,"
        f" {len(early)} early; call start - scheduled_time by the database's clock (ms):"
        f" min {lateness[0] * 1000:.1f} / median {statistics.median(lateness) * 1000:.1f}"
        f" / max {lateness[-1] * 1000:.1f}"
    )

    assert [r["status"] for r in rows] == ["sent"] * FOLLOWUPS
    assert len(stale) == 0, "live follow-ups' timers were refused and dropped"
    assert rearmed == 0, "follow-ups were left to the repair sweep"
    assert lateness[-1] < SWEEP_GRACE_SECONDS, "a follow-up waited as long as the sweep's grace"
    assert takeovers == 0
    assert len(calls) == FOLLOWUPS
    assert len({call.json["followup_id"] for call in receiver.calls}) == FOLLOWUPS
    assert early == [], "calls started before their time by the database's clock"
    # The start is recorded at the call's instant; the receiver, outside the shifted clock and on
    # the database's host, tells when the call really came.
    due_of = {r["id"]: r["scheduled_time"].timestamp() for r in rows}
    arrived_early = [c for c in receiver.calls if c.received_at < due_of[c.json["followup_id"]]]
    assert arrived_early == [], "calls reached the gateway before their time"
    # A host behind the database waited for its own instant: every call late by the whole skew.
    assert statistics.median(lateness) < SKEW_SECONDS
