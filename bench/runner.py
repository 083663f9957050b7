"""Runs the chosen scenarios on the chosen timer backends, one fresh stack each."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console

from bench.profile import Profiler
from bench.progress import Progress
from bench.report import RESULTS, Row, print_profiles, print_report, summary, write_json
from bench.scenarios import NEEDS_AI, SCENARIOS, Plan
from bench.stack import Stack, StackOptions, plugin_available


@dataclasses.dataclass(frozen=True)
class Selection:
    scenarios: tuple[str, ...]
    backends: tuple[str, ...]
    dispatch_concurrency: int
    queue_type: str
    log_level: str
    out: Path | None
    replicas: int = 1
    repeat: int = 1
    profile: Path | None = None


async def run(plan: Plan, selection: Selection, console: Console) -> list[Row]:
    progress = Progress(console)
    log_root = RESULTS / f"{time.strftime('%Y%m%dT%H%M%S')}-logs"
    rows: list[Row] = []
    has_plugin = await plugin_available() if "plugin" in selection.backends else False
    runs = [
        (scenario, backend, attempt)
        for scenario in selection.scenarios
        for backend in selection.backends
        for attempt in range(1, selection.repeat + 1)
    ]
    for scenario, backend, attempt in runs:
        name = f"{scenario} #{attempt}" if selection.repeat > 1 else scenario
        label = f"[{name}/{backend}]"
        if backend == "plugin" and not has_plugin:
            if attempt == 1:
                progress.say(f"{label} not available on this broker: skipped")
                rows.append(Row(scenario, backend, available=False))
            continue
        options = StackOptions(
            backend=backend,
            log_dir=log_root / f"{name.replace(' #', '-')}-{backend}",
            ai_delay=plan.ai_delay if scenario in NEEDS_AI else None,
            lead=plan.lead,
            dispatch_concurrency=selection.dispatch_concurrency,
            queue_type=selection.queue_type,
            log_level=selection.log_level,
            replicas=selection.replicas,
        )
        progress.say(f"{label} starting the stack (service logs in {options.log_dir})")
        try:
            row = await _one(scenario, options, plan, selection, progress)
        except Exception as exc:
            # The machine is shared (someone may stop the broker): keep the other rows.
            progress.say(f"{label} failed: {exc!r}")
            row = Row(scenario, backend, notes=[f"failed: {exc!r}"[:400]])
        row.scenario = name
        rows.append(row)
        progress.say(f"{label} done: {summary(row)}")
    print_report(console, rows)
    settings = {**dataclasses.asdict(plan), **dataclasses.asdict(selection)}
    path = write_json(rows, settings, selection.out)
    console.print(f"results written to {path}", highlight=False)
    return rows


async def _one(
    scenario: str, options: StackOptions, plan: Plan, selection: Selection, progress: Progress
) -> Row:
    async with Stack(options) as stack:
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
        if stack.broker_closed_connections():
            row.notes.append(
                "the broker closed the services' connections during this run (stopped by "
                "another user of the machine?): figures disturbed"
            )
    return row
