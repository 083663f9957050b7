"""The BullMQ design (Node.js, BullMQ delayed jobs in Redis, PostgreSQL) in the same run, when
`BENCH_PEER` names a prepared copy of it (docs/performance.md). Its `run.sh` starts and stops its
own Redis, receiver and workers; its rows are computed here from its raw files (schedule,
receiver log, producer report, per-component CPU samples) with the same definitions as ours.

Our scenarios on it: steady = its scenario A (N due over the steady window, concurrency 5),
burst = B (N due at one instant, concurrency 50), ingest = its enqueue rate (N requests, each an
INSERT and a delayed job, one at a time like an API handler), capacity = steady at each rate.
Its producer always enqueues everything before the first due time (up front).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.progress import Progress
from bench.report import Row
from bench.stats import duplicates, mean_rate, peak_rate, spread

PEER_BACKEND = "bullmq (peer)"
TICKS = os.sysconf("SC_CLK_TCK")
# cpumon.py's categories that work for the follow-ups; "foreign" (other people's processes) and
# "kernel" (kernel threads) are left out, as ours leave out everything but our own processes.
WORKERS = ("workers",)
STANDINS = ("producer", "receiver", "harness")  # load, webhook receiver, run.sh and its monitor
BROKER = ("redis",)
DATABASE = ("pg_ours", "pg_shared")
PEER_SCENARIOS = ("steady", "burst", "ingest", "capacity")
ENQUEUE_GUESS = 400  # requests/s the producer is assumed to manage, to start the first due after it


class PeerNotReady(RuntimeError):
    pass


def peer_dir() -> Path | None:
    value = os.environ.get("BENCH_PEER")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "run.sh").is_file() or not (path / "node_modules").is_dir():
        raise PeerNotReady(
            f"BENCH_PEER={value} is not a prepared copy of the BullMQ design "
            "(run.sh and node_modules expected): see docs/performance.md"
        )
    return path


def peer_python(path: Path) -> str:
    """The python with aiohttp that the peer's receiver needs: BENCH_PEER_PY, or the venv made
    in the prepared copy."""
    chosen = os.environ.get("BENCH_PEER_PY") or str(path / ".venv" / "bin" / "python")
    if not Path(chosen).exists():
        raise PeerNotReady(
            f"no python for the peer's receiver at {chosen}: make one in the copy with "
            "`python3 -m venv .venv && .venv/bin/pip install aiohttp` (docs/performance.md)"
        )
    return chosen


@dataclass(frozen=True)
class PeerPlan:
    n: int
    spread: float
    start_in: float
    concurrency: int

    def args(self) -> list[str]:
        return [
            "--n",
            str(self.n),
            "--spread",
            f"{self.spread:g}",
            "--start-in",
            f"{self.start_in:g}",
            "--concurrency",
            str(self.concurrency),
            "--with-db",
            "1",
        ]


def peer_plan(scenario: str, count: int, seconds: float) -> PeerPlan:
    """Its run.sh parameters for one of our scenarios (`seconds`: the steady window)."""
    # Everything is enqueued before the first due time: leave the producer time for it.
    start_in = 5.0 + count / ENQUEUE_GUESS
    if scenario in ("steady", "capacity"):
        return PeerPlan(count, seconds, start_in, 5)
    if scenario in ("burst", "ingest"):
        return PeerPlan(count, 0.0, start_in, 50)
    raise ValueError(f"no peer scenario for {scenario}")


async def run_peer(path: Path, plan: PeerPlan, label: str, progress: Progress) -> dict[str, Any]:
    """One run.sh run; its summary line, with the run's directory."""
    env = {**os.environ, "PY": peer_python(path), "LABEL": label.replace(" ", "-").replace("/", "")}
    progress.say(f"[{label}/{PEER_BACKEND}] run.sh {' '.join(plan.args())}")
    process = await asyncio.create_subprocess_exec(
        str(path / "run.sh"),
        *plan.args(),
        cwd=path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    lines = out.decode(errors="replace").strip().splitlines()
    if process.returncode != 0 or not lines:
        tail = err.decode(errors="replace")[-800:]
        raise RuntimeError(f"the peer's run.sh failed ({process.returncode}): {tail}")
    summary: dict[str, Any] = json.loads(lines[-1])
    summary["run_path"] = str(path / "runs" / summary["run_dir"])
    return summary


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class PeerSend:
    contractor_id: int
    key: str
    received_at: float
    due: float


def peer_sends(
    schedule: Iterable[Mapping[str, Any]], received: Iterable[Mapping[str, Any]]
) -> list[PeerSend]:
    """Every 2xx-answered webhook call of a scheduled contractor, joined with its due time."""
    due = {int(r["contractor_id"]): float(r["due"]) for r in schedule}
    found = []
    for call in received:
        if not 200 <= int(call.get("status", 200)) < 300:
            continue
        contractor = int(call["body"].get("contractor_id", -1))
        if contractor not in due:
            continue
        headers = {k.lower(): v for k, v in call.get("headers", {}).items()}
        key = headers.get("idempotency-key", "")
        found.append(PeerSend(contractor, key, float(call["t"]), due[contractor]))
    return found


def cpu_between(
    samples: Sequence[Mapping[str, Any]], start: float | None = None, end: float | None = None
) -> dict[str, float]:
    """CPU seconds per cpumon category between the last sample at or before `start` and the
    first at or after `end` (the whole run when not given). Its counters are cumulative ticks."""
    if not samples:
        return {}
    first = samples[0]
    last = samples[-1]
    if start is not None:
        before = [s for s in samples if s["t"] <= start]
        first = before[-1] if before else samples[0]
    if end is not None:
        after = [s for s in samples if s["t"] >= end]
        last = after[0] if after else samples[-1]
    names = set(first["cat"]) | set(last["cat"])
    return {
        name: max(0, last["cat"].get(name, 0) - first["cat"].get(name, 0)) / TICKS
        for name in sorted(names)
    }


def _sum(cpu: Mapping[str, float], names: Iterable[str]) -> float:
    return sum(cpu.get(name, 0.0) for name in names)


def fill_peer_cpu(row: Row, cpu: Mapping[str, float], followups: int, seconds: float) -> None:
    row.service_cpu_s = {name: round(cpu.get(name, 0.0), 2) for name in WORKERS}
    row.broker_cpu_s = round(_sum(cpu, BROKER), 2)
    row.db_cpu_s = round(_sum(cpu, DATABASE), 2)
    row.db_cpu_services_s = round(cpu.get("pg_ours", 0.0), 2)
    row.extra["bench_process_cpu_s"] = round(_sum(cpu, STANDINS), 2)
    row.extra["cpu_s_by_component"] = {name: round(value, 2) for name, value in cpu.items()}
    row.duration_s = round(seconds, 1)
    if followups > 0:
        total = _sum(cpu, (*WORKERS, *STANDINS, *BROKER, *DATABASE))
        row.cpu_ms_per_followup = round(total * 1000 / followups, 2)
        row.extra["cpu_ms_per_followup"] = {
            name: round(cpu.get(name, 0.0) * 1000 / followups, 2)
            for name in (*WORKERS, *STANDINS, *BROKER, *DATABASE)
        }


def peer_row(name: str, scenario: str, summary: Mapping[str, Any]) -> Row:
    """Our row for one of its runs, from its raw files."""
    run = Path(summary["run_path"])
    schedule = _jsonl(run / "schedule.jsonl")
    sends = peer_sends(schedule, _jsonl(run / "received.jsonl"))
    samples = _jsonl(run / "cpu_samples.jsonl")
    producer = (summary.get("producer") or {}) if isinstance(summary.get("producer"), dict) else {}
    row = Row(name, PEER_BACKEND, expected=len(schedule))
    first: dict[int, PeerSend] = {}
    for send in sorted(sends, key=lambda s: s.received_at):
        first.setdefault(send.contractor_id, send)
    dup = duplicates((s.contractor_id, s.key) for s in sends)
    row.duplicate_keys = dup.different_keys
    row.repeated_calls = dup.repeated_calls
    row.early = sum(1 for s in first.values() if s.received_at < s.due)
    received = sorted(s.received_at for s in first.values())
    if scenario == "ingest":
        row.sent = int(producer.get("enqueued", 0))
        row.throughput = producer.get("jobs_per_s")
        row.throughput_unit = "req/s"
        start, end = producer.get("start_t"), producer.get("end_t")
        cpu = cpu_between(samples, start, end)
        seconds = (end - start) if start and end else 0.0
        fill_peer_cpu(row, cpu, row.sent, seconds)
    else:
        row.sent = len(first)
        row.lateness_ms = spread([(s.received_at - s.due) * 1000 for s in first.values()])
        if scenario == "burst" and received and schedule:
            instant = min(float(r["due"]) for r in schedule)
            row.throughput = mean_rate(len(received), received[-1] - instant)
            row.extra["peak_sends_per_second_1s"] = peak_rate(received, 1.0)
        elif len(received) > 1:
            row.throughput = mean_rate(len(received) - 1, received[-1] - received[0])
        row.throughput_unit = "sends/s"
        cpu = cpu_between(samples)
        seconds = (samples[-1]["t"] - samples[0]["t"]) if len(samples) > 1 else 0.0
        fill_peer_cpu(row, cpu, len(schedule), seconds)
    busy = ((summary.get("cpu_run") or {}).get("machine_busy_pct")) if summary else None
    row.machine_busy_pct = busy
    foreign = ((summary.get("cpu_run") or {}).get("core_pct") or {}).get("foreign")
    if foreign is not None and foreign > 10:
        row.notes.append(f"other people's processes used {foreign:.0f} % of a core meanwhile")
    row.extra["peer_run"] = summary.get("run_dir")
    row.extra["peer_params"] = summary.get("params")
    row.extra["arrival"] = "up front"
    return row
