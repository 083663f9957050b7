"""Runs the chosen scenarios on the chosen timer backends, one fresh stack each, and the BullMQ
peer beside them when BENCH_PEER names a prepared copy."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from rich.console import Console

from bench.broker_stats import ManagementUnavailable, NodeCounters, measure_after, node_counters
from bench.capacity import Step, go_on, held_rate, step_count, verdict
from bench.peer import PEER_BACKEND, PEER_SCENARIOS, peer_dir, peer_plan, peer_row, run_peer
from bench.profile import Profiler
from bench.progress import Progress
from bench.report import RESULTS, Row, print_profiles, print_report, summary, write_json
from bench.scenarios import NEEDS_AI, SCENARIOS, Plan
from bench.stack import Stack, StackOptions, plugin_available
from bench.timer_probe import timerwork

# Scenarios that run without the services' stack.
PROBES = ("timerwork",)
PROBE_PATIENCE = 300.0


@dataclasses.dataclass(frozen=True)
class Selection:
    scenarios: tuple[str, ...]
    backends: tuple[str, ...]
    dispatch_concurrency: int
    queue_type: str
    log_level: str
    out: Path | None
    replicas: int = 1
    dispatcher_nice: int = 0
    slack_nice: bool = True
    repeat: int = 1
    profile: Path | None = None


@dataclasses.dataclass
class Context:
    plan: Plan
    selection: Selection
    progress: Progress
    log_root: Path
    has_plugin: bool
    peer: Path | None
    rows: list[Row] = dataclasses.field(default_factory=list)


def _slug(name: str) -> str:
    """`capacity 50/s` → `capacity-50s`: a file name."""
    return name.replace(" #", "-").replace(" ", "-").replace("/", "")


def _name(scenario: str, attempt: int, repeat: int) -> str:
    return f"{scenario} #{attempt}" if repeat > 1 else scenario


async def run(plan: Plan, selection: Selection, console: Console) -> list[Row]:
    progress = Progress(console)
    peer = peer_dir()
    if peer is not None:
        progress.say(f"the BullMQ peer runs beside ours, from {peer}")
    context = Context(
        plan=plan,
        selection=selection,
        progress=progress,
        log_root=RESULTS / f"{time.strftime('%Y%m%dT%H%M%S')}-logs",
        has_plugin=await plugin_available() if "plugin" in selection.backends else False,
        peer=peer,
    )
    for scenario in selection.scenarios:
        for attempt in range(1, selection.repeat + 1):
            name = _name(scenario, attempt, selection.repeat)
            if scenario in PROBES:
                await _probe(context, name)
            elif scenario == "capacity":
                await _capacity(context, name)
            else:
                for backend in selection.backends:
                    await _ours(context, scenario, name, backend, plan)
                if peer is not None and scenario in PEER_SCENARIOS:
                    await _peer(context, scenario, name, _count(scenario, plan))
    print_report(console, context.rows)
    settings = {**dataclasses.asdict(plan), **dataclasses.asdict(selection), "peer": str(peer)}
    path = write_json(context.rows, settings, selection.out)
    console.print(f"results written to {path}", highlight=False)
    return context.rows


def _count(scenario: str, plan: Plan) -> int:
    return {
        "steady": plan.steady_count,
        "burst": plan.burst_count,
        "ingest": plan.ingest_count,
    }.get(scenario, plan.steady_count)


async def _probe(context: Context, name: str) -> None:
    context.progress.say(f"[{name}] arming single timers in vhosts of their own")
    try:
        # The broker is shared: a stuck connection must not hold up the rest of the run.
        row = await asyncio.wait_for(timerwork(context.progress), PROBE_PATIENCE)
    except Exception as exc:
        row = Row(name, "levels", notes=[f"failed: {exc!r}"[:400]])
    row.scenario = name
    context.rows.append(row)
    for note in row.notes:
        context.progress.say(f"[{name}] {note}")


async def _ours(context: Context, scenario: str, name: str, backend: str, plan: Plan) -> Row:
    label = f"[{name}/{backend}]"
    if backend == "plugin" and not context.has_plugin:
        row = Row(name, backend, available=False)
        if not any(r.scenario == name and r.backend == backend for r in context.rows):
            context.progress.say(f"{label} not available on this broker: skipped")
            context.rows.append(row)
        return row
    selection = context.selection
    options = StackOptions(
        backend=backend,
        log_dir=context.log_root / f"{_slug(name)}-{backend}",
        ai_delay=plan.ai_delay if scenario in NEEDS_AI else None,
        lead=plan.lead,
        dispatch_concurrency=selection.dispatch_concurrency,
        queue_type=selection.queue_type,
        log_level=selection.log_level,
        replicas=selection.replicas,
        dispatcher_nice=selection.dispatcher_nice,
        slack_nice=selection.slack_nice,
    )
    context.progress.say(f"{label} starting the stack (service logs in {options.log_dir})")
    try:
        row = await _one(scenario, options, plan, selection, context.progress)
    except Exception as exc:
        # The machine is shared (someone may stop the broker): keep the other rows.
        context.progress.say(f"{label} failed: {exc!r}")
        row = Row(name, backend, notes=[f"failed: {exc!r}"[:400]])
    row.scenario = name
    context.rows.append(row)
    context.progress.say(f"{label} done: {summary(row)}")
    return row


async def _peer(context: Context, scenario: str, name: str, count: int) -> Row:
    assert context.peer is not None
    plan = context.plan
    seconds = plan.capacity_seconds if scenario == "capacity" else plan.steady_seconds
    try:
        found = await run_peer(
            context.peer, peer_plan(scenario, count, seconds), name, context.progress
        )
        row = peer_row(name, scenario, found)
    except Exception as exc:
        context.progress.say(f"[{name}/{PEER_BACKEND}] failed: {exc!r}")
        row = Row(name, PEER_BACKEND, notes=[f"failed: {exc!r}"[:400]])
    context.rows.append(row)
    context.progress.say(f"[{name}/{PEER_BACKEND}] done: {summary(row)}")
    return row


def _step(rate: int, row: Row) -> Step:
    return Step(
        rate=rate,
        sent=row.sent,
        expected=row.expected,
        early=row.early or 0,
        p99_ms=row.lateness_ms.p99 if row.lateness_ms else None,
    )


async def _capacity(context: Context, name: str) -> None:
    """Steady at each rate, a fresh stack per step, until p99 passes the threshold; the same
    steps for the peer."""
    plan = context.plan
    threshold = plan.capacity_p99_ms
    verdicts: list[str] = []
    for backend in [*context.selection.backends, *([PEER_BACKEND] if context.peer else [])]:
        steps: list[Step] = []
        for rate in plan.capacity_rates:
            if not go_on(steps, threshold):
                break
            count = step_count(rate, plan.capacity_seconds)
            step_name = f"{name} {rate}/s"
            if backend == PEER_BACKEND:
                row = await _peer(context, "capacity", step_name, count)
            else:
                step_plan = dataclasses.replace(
                    plan, steady_count=count, steady_seconds=plan.capacity_seconds
                )
                row = await _ours(context, "capacity", step_name, backend, step_plan)
                if not row.available:
                    break
            steps.append(_step(rate, row))
        if steps:
            found = held_rate(steps, threshold)
            text = verdict(steps, plan.capacity_rates, threshold)
            verdicts.append(f"{backend}: {text}")
            context.rows.append(
                Row(
                    f"{name} held",
                    backend,
                    expected=len(steps),
                    sent=sum(1 for s in steps if s.held(threshold)),
                    throughput=float(found) if found else None,
                    throughput_unit="/s held",
                    notes=[text],
                    extra={"steps": [dataclasses.asdict(s) for s in steps]},
                )
            )
    for text in verdicts:
        context.progress.say(f"[{name}] {text}")


async def _node_counters(progress: Progress) -> NodeCounters | None:
    try:
        return await asyncio.to_thread(node_counters)
    except Exception as exc:
        progress.say(f"the broker's node counters could not be read: {exc!r}")
        return None


async def _timer_work(stack: Stack, row: Row, before: NodeCounters | None, followups: int) -> None:
    """(timer publishes + dead-letterings) / follow-ups, from the broker (bench.broker_stats).
    `followups`: 0 where the scenario's timers have not lived their whole life (pending)."""
    try:
        work = await measure_after(stack.vhost, before)
    except ManagementUnavailable as exc:
        row.notes.append(str(exc))
        return
    row.extra["timer_work"] = dataclasses.asdict(work) | {"total": work.total}
    row.timer_work_per_followup = work.per_followup(followups)
    if work.total is not None and not work.exact:
        others = work.other_vhost_publishes
        row.notes.append(
            f"timer work: {work.timer_publishes:,} timer publishes + {work.hops:,} "
            "dead-letterings (the node's count: quorum queues keep none of their own; "
            f"{others:,} messages were published on other vhosts meanwhile)"
        )


async def _one(
    scenario: str, options: StackOptions, plan: Plan, selection: Selection, progress: Progress
) -> Row:
    async with Stack(options) as stack:
        before = await _node_counters(progress)
        profiler = None
        if selection.profile is not None:
            profiler = Profiler(selection.profile, f"{scenario}-{options.backend}")
            profiler.start(stack.service_pids())
        try:
            row = await SCENARIOS[scenario](stack, plan, progress)
        finally:
            profiles = profiler.stop() if profiler else {}
        if profiles:
            row.extra["profile"] = profiles
            print_profiles(progress.console, f"{scenario}/{options.backend}", profiles)
        await _timer_work(stack, row, before, 0 if scenario == "pending" else row.expected)
        if stack.broker_closed_connections():
            row.notes.append(
                "the broker closed the services' connections during this run (stopped by "
                "another user of the machine?): figures disturbed"
            )
    return row
