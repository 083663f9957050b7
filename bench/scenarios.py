"""The scenarios on the stack. Each one gets a fresh stack (database, vhost, services) and returns a
row; capacity is steady at rising rates, a fresh stack per step (bench.capacity)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.broker_stats import TIMER_PREFIX
from bench.load import paced_moments, publish_paced, publish_requests, request_body
from bench.measure import (
    claim_lateness,
    deliveries,
    fill_call_split,
    fill_cpu_per_followup,
    fill_resources,
    fill_sends,
    max_id,
    statuses,
    text_sources,
    wait_for_calls,
    wait_for_rows,
)
from bench.pending import load_direct, load_through_scheduler, memory_snapshot
from bench.probes import Sampler, queue_figures
from bench.progress import Progress
from bench.report import Row
from bench.stack import Stack
from bench.stats import flatness, mean_rate, peak_rate
from shared.bus import AmqpPublisher

GRACE = 1.5  # seconds to wait after the last expected call, so late duplicates are seen


@dataclass(frozen=True)
class Plan:
    steady_count: int = 2000
    steady_seconds: float = 20.0
    ai_delay: float = 0.3
    burst_count: int = 2000
    ingest_count: int = 10_000
    pending_count: int = 1_000_000
    pending_method: str = "direct"
    lead: float = 10.0
    settle: float = 15.0
    timeout: float = 120.0
    window: int = 1000
    # Paced arrival: each request published this many seconds before its due time.
    advance: float = 8.0
    up_front: bool = False  # steady and capacity publish every request first, then wait
    capacity_rates: tuple[int, ...] = (50, 100, 200, 400, 800)
    capacity_seconds: float = 20.0
    capacity_p99_ms: float = 50.0


Scenario = Callable[[Stack, Plan, Progress], Awaitable[Row]]


def _now() -> datetime:
    return datetime.now(UTC)


async def _schedule(
    stack: Stack,
    plan: Plan,
    progress: Progress,
    label: str,
    times: list[datetime],
    *,
    personalize: bool,
) -> tuple[int, float | None]:
    """Publishes one request per time and waits for the rows; (id before them, when all were
    in)."""
    base = await max_id(stack.pool)
    ids = stack.contractor_ids
    bodies = [
        request_body(f"{label}-{i}", ids[i % len(ids)], moment, personalize=personalize)
        for i, moment in enumerate(times)
    ]
    async with AmqpPublisher(stack.rabbitmq_url, name="bench") as publisher:
        with progress.track(f"{label}: publish", len(bodies)) as tracker:
            await publish_requests(publisher, bodies, plan.window, tracker.update)
    with progress.track(f"{label}: persisted", len(bodies)) as tracker:
        deadline = time.time() + plan.timeout
        persisted = await wait_for_rows(stack.pool, base, len(bodies), deadline, tracker)
    return base, persisted


async def _timed_sends(
    stack: Stack,
    plan: Plan,
    progress: Progress,
    row: Row,
    label: str,
    times: list[datetime],
    *,
    personalize: bool,
) -> tuple[int, list[float]]:
    """Schedules follow-ups at `times`, waits for their webhook calls and fills the row's send
    figures; returns (id before them, receive times of first calls)."""
    start = times[0].timestamp()
    base, persisted = await _schedule(stack, plan, progress, label, times, personalize=personalize)
    if persisted is None:
        row.notes.append("not every request was persisted within the timeout")
    elif persisted > start - plan.lead:
        row.notes.append(
            f"requests were still being stored {persisted - start + plan.lead:.1f} s after the "
            "first text was due to be prepared: raise --settle"
        )
    deadline = times[-1].timestamp() + plan.timeout
    with progress.track(f"{label}: sends", len(times)) as tracker:
        complete = await wait_for_calls(stack.receiver, len(times), deadline, tracker)
    if not complete:
        row.notes.append(f"timed out {plan.timeout:.0f} s after the last scheduled time")
    await asyncio.sleep(GRACE)
    first = fill_sends(row, await deliveries(stack.receiver))
    row.extra["statuses"] = await statuses(stack.pool, base)
    await fill_call_split(row, stack.pool, base, first)
    row.extra["claim_lateness_ms"] = await claim_lateness(stack.pool, base)
    return base, sorted(d.received_at for d in first)


def _steady_times(plan: Plan) -> list[datetime]:
    # Paced, the first request goes out a second from now; up front, after the settle time.
    ahead = plan.settle + plan.lead if plan.up_front else plan.advance + 1.0
    start = _now() + timedelta(seconds=ahead)
    step = timedelta(seconds=plan.steady_seconds / plan.steady_count)
    return [start + step * i for i in range(plan.steady_count)]


async def _paced_sends(
    stack: Stack,
    plan: Plan,
    progress: Progress,
    row: Row,
    label: str,
    schedule: Callable[[], list[datetime]],
    *,
    personalize: bool,
) -> tuple[int, list[float]]:
    """Publishes each request `plan.advance` seconds before its due time while the earlier ones
    are being sent, as requests arrive in production; returns what `_timed_sends` returns. The
    due times are taken from `schedule` once the publisher is connected, so a slow start never
    eats into the first requests' advance."""
    base = await max_id(stack.pool)
    ids = stack.contractor_ids
    async with AmqpPublisher(stack.rabbitmq_url, name="bench") as publisher:
        times = schedule()
        bodies = [
            request_body(f"{label}-{i}", ids[i % len(ids)], moment, personalize=personalize)
            for i, moment in enumerate(times)
        ]
        moments = paced_moments([moment.timestamp() for moment in times], plan.advance)
        publishing = asyncio.create_task(
            publish_paced(publisher, list(zip(moments, bodies, strict=True)), plan.window)
        )
        deadline = times[-1].timestamp() + plan.timeout
        with progress.track(f"{label}: sends ({plan.advance:g} s ahead)", len(times)) as tracker:
            complete = await wait_for_calls(
                stack.receiver, len(times), deadline, tracker, abort=publishing
            )
        pace = await publishing
    row.extra["pace"] = {
        "advance_s": plan.advance,
        "behind_p99_ms": pace.behind_p99_ms,
        "behind_max_ms": pace.behind_max_ms,
    }
    if (pace.behind_max_ms or 0) > 100:
        row.notes.append(
            f"the publisher fell behind its schedule by up to {pace.behind_max_ms:,.0f} ms"
        )
    if not complete:
        row.notes.append(f"timed out {plan.timeout:.0f} s after the last scheduled time")
    await asyncio.sleep(GRACE)
    stored = sum((await statuses(stack.pool, base)).values())
    if stored < len(times):
        row.notes.append(f"only {stored:,} of {len(times):,} requests were stored")
    first = fill_sends(row, await deliveries(stack.receiver))
    row.extra["statuses"] = await statuses(stack.pool, base)
    await fill_call_split(row, stack.pool, base, first)
    row.extra["claim_lateness_ms"] = await claim_lateness(stack.pool, base)
    return base, sorted(d.received_at for d in first)


async def _steady_into(stack: Stack, plan: Plan, progress: Progress, row: Row, label: str) -> None:
    row.expected = plan.steady_count
    if plan.up_front:
        base, received = await _timed_sends(
            stack, plan, progress, row, label, _steady_times(plan), personalize=True
        )
    else:
        base, received = await _paced_sends(
            stack, plan, progress, row, label, lambda: _steady_times(plan), personalize=True
        )
    if len(received) > 1:
        row.throughput = mean_rate(len(received) - 1, received[-1] - received[0])
        row.throughput_unit = "sends/s"
    row.extra["text"] = await text_sources(stack.pool, base)
    row.extra["arrival"] = "up front" if plan.up_front else f"paced, {plan.advance:g} s ahead"


async def _steady_row(stack: Stack, plan: Plan, progress: Progress, name: str) -> Row:
    row = Row(name, stack.options.backend)
    sampler = Sampler(stack.service_pids(), stack.pool, helpers=[stack.receiver.pid])
    await sampler.start()
    try:
        await _steady_into(stack, plan, progress, row, name)
    finally:
        await sampler.stop()
        fill_resources(row, sampler)
    fill_cpu_per_followup(row, plan.steady_count)
    return row


async def steady(stack: Stack, plan: Plan, progress: Progress) -> Row:
    """2,000 follow-ups spread evenly over 20 s, AI on (the stand-in answers in 300 ms), each
    request published 8 s before its due time (or all up front with --up-front)."""
    return await _steady_row(stack, plan, progress, "steady")


async def capacity(stack: Stack, plan: Plan, progress: Progress) -> Row:
    """One step of capacity: steady at `plan.steady_count / plan.steady_seconds` per second."""
    return await _steady_row(stack, plan, progress, "capacity")


async def burst(stack: Stack, plan: Plan, progress: Progress) -> Row:
    """2,000 follow-ups due at the same instant: how fast the backlog drains."""
    row = Row("burst", stack.options.backend, expected=plan.burst_count)
    due = _now() + timedelta(seconds=plan.settle + plan.lead)
    sampler = Sampler(stack.service_pids(), stack.pool, helpers=[stack.receiver.pid])
    await sampler.start()
    try:
        _, received = await _timed_sends(
            stack, plan, progress, row, "burst", [due] * plan.burst_count, personalize=False
        )
    finally:
        await sampler.stop()
        fill_resources(row, sampler)
    fill_cpu_per_followup(row, plan.burst_count)
    if received:
        drain = received[-1] - due.timestamp()
        row.throughput = mean_rate(len(received), drain)
        row.throughput_unit = "sends/s"
        row.extra["drain_seconds"] = round(drain, 3)
        row.extra["first_call_ms"] = round((received[0] - due.timestamp()) * 1000, 1)
        row.extra["peak_sends_per_second_1s"] = peak_rate(received, 1.0)
    return row


async def ingest(stack: Stack, plan: Plan, progress: Progress) -> Row:
    """10,000 followup.requested published as fast as possible: rows and timers stored per
    second, measured by polling the table until the last row is there."""
    row = Row("ingest", stack.options.backend, expected=plan.ingest_count)
    far = _now() + timedelta(days=1)
    times = [far + timedelta(milliseconds=i) for i in range(plan.ingest_count)]
    sampler = Sampler(stack.service_pids(), stack.pool, helpers=[stack.receiver.pid])
    await sampler.start()
    started = time.time()
    try:
        base, persisted = await _schedule(stack, plan, progress, "ingest", times, personalize=False)
    finally:
        await sampler.stop()
        fill_resources(row, sampler)
    fill_cpu_per_followup(row, plan.ingest_count)
    row.sent = sum((await statuses(stack.pool, base)).values())
    if persisted is None:
        row.notes.append("not every request was persisted within the timeout")
    else:
        row.throughput = mean_rate(row.sent, persisted - started)
        row.throughput_unit = "req/s"
        row.extra["seconds"] = round(persisted - started, 2)
    if stack.options.backend == "levels":
        timers = await settled_timer_count(stack.vhost)
        row.extra["timers_pending"] = timers
        row.notes.append(f"{timers:,} timers held by the broker (two per follow-up expected)")
    return row


async def settled_timer_count(vhost: str, patience: float = 12.0) -> int:
    """Messages in the timer queues. The broker refreshes queue figures every few
    seconds, so this asks until two answers agree."""
    deadline = time.monotonic() + patience
    last = -1
    while True:
        queues = await asyncio.to_thread(queue_figures, vhost)
        count = sum(n for name, (n, _) in queues.items() if name.startswith(TIMER_PREFIX))
        if count == last or time.monotonic() > deadline:
            return count
        last = count
        await asyncio.sleep(2.5)


async def pending(stack: Stack, plan: Plan, progress: Progress) -> Row:
    """N follow-ups days ahead: memory of services, broker and database, then the steady
    scenario's timing while they wait."""
    row = Row("pending", stack.options.backend)
    sampler = Sampler(stack.service_pids(), stack.pool, helpers=[stack.receiver.pid])
    await sampler.start()
    try:
        before = await memory_snapshot(stack)
        load = load_direct if plan.pending_method == "direct" else load_through_scheduler
        loaded = await load(stack, plan.pending_count, plan.lead, plan.window, progress)
        after_load = await memory_snapshot(stack)
        await _steady_into(stack, plan, progress, row, "pending")
        after_steady = await memory_snapshot(stack)
    finally:
        await sampler.stop()
        fill_resources(row, sampler)
    row.extra["pending"] = loaded
    row.extra["memory"] = {
        "before_load": before,
        "after_load": after_load,
        "after_steady": after_steady,
    }
    row.extra["rss_series_mb"] = {
        name: [round(v, 1) for v in trace.rss_samples[:: max(1, len(trace.rss_samples) // 40)]]
        for name, trace in sampler.traces.items()
    }
    growth = {name: flatness(trace.rss_samples) for name, trace in sampler.traces.items()}
    row.extra["rss_growth_pct"] = {
        name: None if value is None else round(value * 100, 1) for name, value in growth.items()
    }
    row.notes.extend(_memory_notes(before, after_load, after_steady, loaded))
    row.notes.append(
        "services RSS growth, last quarter of the run over the first: "
        + ", ".join(
            f"{name} {pct:+.1f} %"
            for name, pct in row.extra["rss_growth_pct"].items()
            if pct is not None
        )
    )
    return row


def _memory_notes(
    before: dict[str, Any],
    after_load: dict[str, Any],
    after_steady: dict[str, Any],
    loaded: dict[str, Any],
) -> list[str]:
    services = ", ".join(
        f"{name} {before['services_rss_mb'][name]:.0f}→{after_load['services_rss_mb'][name]:.0f}"
        f"→{after_steady['services_rss_mb'][name]:.0f}"
        for name in before["services_rss_mb"]
    )
    return [
        f"{loaded['count']:,} follow-ups pending ({loaded['method']}, loaded in "
        f"{loaded['seconds']:.0f} s, {loaded['rows_per_second']:,.0f} rows/s with their timers)",
        f"services RSS MB before load → after load → after steady: {services}",
        f"broker RSS {before['broker_rss_mb']:.0f}→{after_load['broker_rss_mb']:.0f} MB (node "
        f"total, shared with others); timer queues hold {after_load['timer_messages']:,} "
        f"messages in {after_load['timer_queue_mb']:.0f} MB",
        f"database {before['database_mb']['database']:.0f}→"
        f"{after_load['database_mb']['database']:.0f} MB on disk; services' backends RSS "
        f"{after_load['backend_rss_mb']:.0f} MB",
    ]


SCENARIOS: dict[str, Scenario] = {
    "steady": steady,
    "burst": burst,
    "ingest": ingest,
    "pending": pending,
    "capacity": capacity,
}
# Which scenarios ask the stand-in model for text.
NEEDS_AI = {"steady", "pending", "capacity"}
