"""What the machine says about processes: resident memory and CPU time from /proc, the broker's
and the database's own view of their memory. Linux only, like the servers this runs against."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from testbed.infra import broker_node

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK")


def _status_mb(pid: int, key: str) -> float | None:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """Resident set size now, in MB; None when the process is gone."""
    return _status_mb(pid, "VmRSS:")


def peak_rss_mb(pid: int) -> float | None:
    """The highest resident set size the process has had (the kernel's high-water mark)."""
    return _status_mb(pid, "VmHWM:")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time the process has used so far."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def pids_by_name(*names: str) -> dict[str, list[int]]:
    """One pass over /proc: the processes whose command name is one of `names`."""
    found: dict[str, list[int]] = {name: [] for name in names}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if comm in found:
                found[comm].append(int(entry.name))
    return found


def pids_named(name: str) -> list[int]:
    return pids_by_name(name)[name]


def is_broker(pid: int) -> bool:
    """The RabbitMQ node, not a short-lived rabbitmqctl (an Erlang VM of the same name)."""
    try:
        return b"rabbit boot" in (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
    except (FileNotFoundError, ProcessLookupError):
        return False


def listening_inodes(port: int, tables: Iterable[str] = ("tcp", "tcp6")) -> set[str]:
    """Socket inodes listening on `port` (state 0A in /proc/net/tcp*)."""
    found = set()
    for table in tables:
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                found.add(fields[9])
    return found


def holds_socket(pid: int, inodes: set[str]) -> bool:
    try:
        for fd in (PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return True
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return False


def the_broker(candidates: list[int]) -> list[int]:
    """The node the services use (listening on the AMQP port): other RabbitMQ nodes on the
    machine (someone's cluster test) are not counted as our broker."""
    nodes = [pid for pid in candidates if is_broker(pid)]
    inodes = listening_inodes(broker_node().amqp_port)
    ours = [pid for pid in nodes if holds_socket(pid, inodes)] if inodes else []
    return ours or nodes


def broker_pids() -> list[int]:
    return the_broker(pids_named("beam.smp"))


def server_pids() -> dict[str, list[int]]:
    """The broker node and every PostgreSQL process, in one pass over /proc."""
    found = pids_by_name("beam.smp", "postgres")
    return {"broker": the_broker(found["beam.smp"]), **found}


class CpuMeter:
    """CPU seconds used by a changing set of processes between start() and the last sample().
    A process that appears later counts from its own start; one that exits keeps its last
    reading."""

    def __init__(self, find: Callable[[], Iterable[int]]) -> None:
        self._find = find
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}

    def start(self) -> None:
        self._base = {pid: cpu for pid in self._find() if (cpu := cpu_seconds(pid)) is not None}
        self._last = dict(self._base)

    def sample(self) -> None:
        for pid in self._find():
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self._last[pid] = cpu

    @property
    def seconds(self) -> float:
        return sum(cpu - self._base.get(pid, 0.0) for pid, cpu in self._last.items())


@dataclass
class ProcessTrace:
    """Memory samples and CPU use of one service process over a scenario."""

    pid: int
    rss_samples: list[float] = field(default_factory=list)
    high_water: float | None = None
    cpu_start: float = 0.0
    cpu_end: float = 0.0

    @property
    def rss_peak(self) -> float | None:
        # A fresh process per scenario: its high-water mark also covers peaks between samples.
        return max(
            [*self.rss_samples, *([self.high_water] if self.high_water else [])], default=None
        )

    @property
    def cpu(self) -> float:
        return self.cpu_end - self.cpu_start


class Sampler:
    """Samples the services' memory and CPU, the broker's and the database's CPU, and the
    machine's load, every `interval` seconds while a scenario runs."""

    def __init__(
        self,
        services: dict[str, int],
        pool: asyncpg.Pool,
        interval: float = 0.5,
        helpers: list[int] | None = None,
    ) -> None:
        """`helpers`: the bench's own child processes (the webhook receiver), counted with it."""
        self.traces = {name: ProcessTrace(pid) for name, pid in services.items()}
        self._servers: dict[str, list[int]] = {"broker": [], "postgres": []}
        self.broker = CpuMeter(lambda: self._servers["broker"])
        self.database = CpuMeter(lambda: self._servers["postgres"])
        self._pool = pool
        self._backends: list[int] = []
        self.database_ours = CpuMeter(lambda: self._backends)
        self.interval = interval
        self.machine_busy_fraction: float | None = None
        # The broker is shared: another user restarting it disturbs the figures.
        self.broker_restarted = False
        self._broker_at_start: set[int] = set()
        self._machine_start = (0.0, 0.0)
        self._task: asyncio.Task[None] | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0
        self.load_average_start = 0.0
        self.load_average_end = 0.0
        # This process (load, model stand-in) and its helpers (webhook receiver) are load too.
        self.bench_cpu = 0.0
        self._bench_cpu_start = 0.0
        self._helpers = helpers or []
        self._helpers_cpu_start = 0.0

    def _sample(self) -> None:
        for trace in self.traces.values():
            rss = rss_mb(trace.pid)
            if rss is not None:
                trace.rss_samples.append(rss)
            cpu = cpu_seconds(trace.pid)
            if cpu is not None:
                trace.cpu_end = cpu
        self.broker.sample()
        self.database.sample()
        self.database_ours.sample()

    async def _run(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.interval)
            if rounds % 8 == 0:
                # Finding processes is the costly part: done every few samples, not each one.
                self._backends = await service_backend_pids(self._pool)
                self._servers = await asyncio.to_thread(server_pids)
                if set(self._servers["broker"]) != self._broker_at_start:
                    self.broker_restarted = True
            rounds += 1
            await asyncio.to_thread(self._sample)

    async def start(self) -> None:
        self._backends = await service_backend_pids(self._pool)
        self._servers = server_pids()
        self._broker_at_start = set(self._servers["broker"])
        self.started_at = time.time()
        self.load_average_start = os.getloadavg()[0]
        self._bench_cpu_start = time.process_time()
        self._helpers_cpu_start = self._helpers_cpu()
        for trace in self.traces.values():
            trace.cpu_start = trace.cpu_end = cpu_seconds(trace.pid) or 0.0
        self.broker.start()
        self.database.start()
        self.database_ours.start()
        self._machine_start = machine_busy()
        self._sample()
        self._task = asyncio.create_task(self._run())

    def _helpers_cpu(self) -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in self._helpers)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._servers = server_pids()
        if set(self._servers["broker"]) != self._broker_at_start:
            self.broker_restarted = True
        self._sample()
        for trace in self.traces.values():
            trace.high_water = peak_rss_mb(trace.pid)
        self.stopped_at = time.time()
        self.load_average_end = os.getloadavg()[0]
        self.bench_cpu = (
            time.process_time()
            - self._bench_cpu_start
            + self._helpers_cpu()
            - self._helpers_cpu_start
        )
        busy, total = machine_busy()
        elapsed = total - self._machine_start[1]
        if elapsed > 0:
            self.machine_busy_fraction = (busy - self._machine_start[0]) / elapsed


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        broker_node().cli(*args), capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout if result.returncode == 0 else ""


def queue_figures(vhost: str) -> dict[str, tuple[int, int]]:
    """Queue name → (messages, memory in bytes) in one vhost."""
    out = rabbitmqctl(
        "list_queues", "-p", vhost, "--no-table-headers", "name", "messages", "memory"
    )
    figures = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            figures[parts[0]] = (int(parts[1]), int(parts[2]))
    return figures


def broker_rss_mb() -> float | None:
    sizes = [rss for pid in broker_pids() if (rss := rss_mb(pid)) is not None]
    return sum(sizes) if sizes else None


def broker_reported_mb() -> float | None:
    """Total memory as the broker counts it (rabbitmqctl status), the whole node."""
    for line in rabbitmqctl("status").splitlines():
        if line.startswith("Total memory used:"):
            amount, unit = line.split(":", 1)[1].split()
            return float(amount) * {"gb": 1024, "mb": 1, "kb": 1 / 1024}.get(unit.lower(), 1)
    return None


async def database_sizes(pool: asyncpg.Pool) -> dict[str, float]:
    """MB on disk: the whole database and the follow-ups table with its indexes."""
    row = await pool.fetchrow(
        """SELECT pg_database_size(current_database()) AS database,
                  pg_total_relation_size('contractor_followup_schedules') AS followups,
                  pg_total_relation_size('followup_transitions') AS transitions"""
    )
    return {key: value / 2**20 for key, value in dict(row).items()}


BENCH_APPLICATION = "followups-bench"


async def service_backend_pids(pool: asyncpg.Pool) -> list[int]:
    """The database backends serving the services (the bench's own connections left out)."""
    rows = await pool.fetch(
        """SELECT pid FROM pg_stat_activity
           WHERE datname = current_database() AND application_name <> $1""",
        BENCH_APPLICATION,
    )
    return [row["pid"] for row in rows]


async def backend_rss_mb(pool: asyncpg.Pool) -> float:
    """Resident memory of the services' database backends (the shared buffers they touched
    count in each one, so this is an upper bound)."""
    pids = await service_backend_pids(pool)
    return sum(rss for pid in pids if (rss := rss_mb(pid)) is not None)
