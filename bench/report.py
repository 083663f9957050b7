"""One row per scenario and backend: printed as a table and written as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stats import Spread

RESULTS = Path(__file__).parent / "results"


@dataclass
class Row:
    scenario: str
    backend: str
    available: bool = True
    expected: int = 0
    sent: int = 0
    duplicate_keys: int | None = None
    repeated_calls: int | None = None
    early: int | None = None
    lateness_ms: Spread | None = None
    throughput: float | None = None
    throughput_unit: str = ""
    rss_peak_mb: dict[str, float] = field(default_factory=dict)
    service_cpu_s: dict[str, float] = field(default_factory=dict)
    broker_cpu_s: float | None = None
    db_cpu_s: float | None = None
    db_cpu_services_s: float | None = None
    machine_busy_pct: float | None = None
    duration_s: float | None = None
    # Whole life, everything on the machine (bench.measure.cpu_seconds_total) / follow-ups.
    cpu_ms_per_followup: float | None = None
    # (timer publishes + dead-letterings) / follow-ups, from the broker's statistics.
    timer_work_per_followup: float | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


PEER_SUFFIX = "(peer)"


def is_peer(row: Row) -> bool:
    return row.backend.endswith(PEER_SUFFIX)


def ratio(ours: float | None, peer: float | None) -> float | None:
    """ours / peer; None when either is missing or the peer's is zero."""
    if ours is None or peer is None or peer == 0:
        return None
    return ours / peer


@dataclass(frozen=True)
class Ratios:
    p50: float | None
    p99: float | None
    throughput: float | None
    cpu: float | None


def peer_ratios(row: Row, rows: list[Row]) -> Ratios | None:
    """Ours / the peer's, for the peer's row of the same scenario (and repeat) in this run."""
    if is_peer(row):
        return None
    peer = next((r for r in rows if is_peer(r) and r.scenario == row.scenario), None)
    if peer is None:
        return None
    ours, theirs = row.lateness_ms, peer.lateness_ms
    return Ratios(
        p50=ratio(ours.p50, theirs.p50) if ours and theirs else None,
        p99=ratio(ours.p99, theirs.p99) if ours and theirs else None,
        throughput=ratio(row.throughput, peer.throughput),
        cpu=ratio(row.cpu_ms_per_followup, peer.cpu_ms_per_followup),
    )


def _times(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}×" if value < 10 else f"{value:,.0f}×"


COLUMNS = (
    "scenario",
    "backend",
    "sent/expected",
    "dup keys/rep",
    "early",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "throughput",
    "CPU ms/fu",
    "timer entries/fu",
    "p50 ×peer",
    "p99 ×peer",
    "thru ×peer",
    "CPU ×peer",
    "peak RSS MB sch/per/dis",
    "broker CPU s",
    "DB CPU s",
)


def table(rows: list[Row]) -> Table:
    grid = Table(title="followups benchmark", show_lines=False)
    for name in COLUMNS:
        grid.add_column(name, justify="left" if name in ("scenario", "backend") else "right")
    for row in rows:
        if not row.available:
            blank = [""] * (len(COLUMNS) - 3)
            grid.add_row(row.scenario, row.backend, "not available on this broker", *blank)
            continue
        spread = row.lateness_ms
        rss = "/".join(
            _num(row.rss_peak_mb.get(s), 0) for s in ("scheduler", "personalizer", "dispatcher")
        )
        ratios = peer_ratios(row, rows)
        grid.add_row(
            row.scenario,
            row.backend,
            f"{row.sent:,}/{row.expected:,}",
            f"{_num(row.duplicate_keys, 0)}/{_num(row.repeated_calls, 0)}",
            _num(row.early, 0),
            _ms(spread.p50 if spread else None),
            _ms(spread.p95 if spread else None),
            _ms(spread.p99 if spread else None),
            _ms(spread.max if spread else None),
            f"{_num(row.throughput, 0)} {row.throughput_unit}".strip(),
            _num(row.cpu_ms_per_followup, 2),
            _num(row.timer_work_per_followup, 1),
            _times(ratios.p50 if ratios else None),
            _times(ratios.p99 if ratios else None),
            _times(ratios.throughput if ratios else None),
            _times(ratios.cpu if ratios else None),
            rss if not is_peer(row) else "-",
            _num(row.broker_cpu_s),
            _num(row.db_cpu_s),
        )
    return grid


def summary(row: Row) -> str:
    """One line, printed as soon as a scenario ends."""
    parts = [f"sent {row.sent:,}/{row.expected:,}"]
    if row.lateness_ms is not None and row.lateness_ms.count:
        parts.append(
            f"lateness p50 {_ms(row.lateness_ms.p50)} p99 {_ms(row.lateness_ms.p99)} "
            f"max {_ms(row.lateness_ms.max)} ms, early {row.early}, dup keys {row.duplicate_keys}"
        )
    split = row.extra.get("lateness_split")
    if split and split["call_ms"]["p99"] is not None:
        parts.append(
            f"p99 before the call {_ms(split['before_call_ms']['p99'])} ms, "
            f"in the call {_ms(split['call_ms']['p99'])} ms"
        )
    if row.throughput is not None:
        parts.append(f"{row.throughput:,.0f} {row.throughput_unit}")
    if row.cpu_ms_per_followup is not None:
        parts.append(f"CPU {row.cpu_ms_per_followup:.2f} ms/follow-up")
    if row.timer_work_per_followup is not None:
        parts.append(f"timer entries {row.timer_work_per_followup:.1f}/follow-up")
    return "; ".join(parts)


def print_report(console: Console, rows: list[Row]) -> None:
    console.print(table(rows))
    for row in rows:
        for note in row.notes:
            console.print(f"  {row.scenario}/{row.backend}: {note}", highlight=False)


def print_profiles(
    console: Console, label: str, profiles: dict[str, dict[str, list[tuple[str, float]]]]
) -> None:
    for service, summary in profiles.items():
        console.print(f"profile {label} {service}: where the samples were", highlight=False)
        for kind in ("self", "inclusive"):
            for name, share in summary.get(kind, [])[:10]:
                console.print(f"  {kind:9} {share:5.1f} %  {name}", highlight=False, markup=False)


def _git_commit() -> str | None:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or None


def write_json(rows: list[Row], options: dict[str, Any], path: Path | None = None) -> Path:
    now = datetime.now(UTC)
    target = path or RESULTS / f"{now:%Y%m%dT%H%M%SZ}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started": now.isoformat(),
        "commit": _git_commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "options": options,
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    target.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return target
