"""The run: a three-node cluster, the services on quorum `levels` timers through the balancer,
follow-ups due over a window, and the node that leads most timer queues killed in the middle."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.load import publish_requests, request_body
from bench.measure import deliveries, statuses
from bench.progress import Progress
from bench.stack import StackOptions, add_contractors, service_env
from cluster.balancer import Balancer, Target
from cluster.leaders import Leadership, busiest_leader, under_replicated
from cluster.nodes import DEFAULT_DLX_CONFIRM_TIMEOUT_MS, Cluster
from cluster.outcome import Outcome, outcome, summary_line
from shared.bus import AmqpPublisher
from shared.db import create_pool
from shared.migrate import migrate
from testbed.infra import PG_ADMIN, Infra
from testbed.processes import ServiceSet
from testbed.webhook import WebhookReceiver

SERVICES = ("scheduler", "personalizer", "dispatcher")
LEADER_COLUMNS = ("name", "leader", "members", "type")


@dataclass(frozen=True)
class Plan:
    followups: int = 300
    lead_in: float = 20.0  # seconds from publishing to the first due time
    span: float = 90.0  # the due times are spread evenly over this many seconds
    kill_at: float = 0.35  # when to kill, as a fraction of the span
    settle: float = 30.0  # after the last due time: late calls and double sends still count
    keep: bool = False  # keep node data and logs after a successful run
    dlx_confirm_timeout_ms: int = DEFAULT_DLX_CONFIRM_TIMEOUT_MS
    sweep: bool = False  # let the repair sweep run as configured by default
    restart_after: float | None = None  # bring the killed node back this long after the kill

    @property
    def patience(self) -> float:
        """After the last due time, at most, for the missing ones: long enough for a dead-letter
        worker to forward again once."""
        return max(120.0, self.dlx_confirm_timeout_ms / 1000 + 60.0)


async def run(plan: Plan, progress: Progress) -> Outcome:
    base = _workspace()
    tag = uuid.uuid4().hex[:6]
    cluster = Cluster(base / "nodes", tag=tag, dlx_confirm_timeout_ms=plan.dlx_confirm_timeout_ms)
    balancer: Balancer | None = None
    receiver = WebhookReceiver()
    services: ServiceSet | None = None
    database = Infra(f"followups_cluster_{tag}")
    pool: asyncpg.Pool | None = None
    restart: asyncio.Task[None] | None = None
    succeeded = False
    progress.say(
        f"cluster: 3 nodes under {base}, dead-letter confirm timeout "
        f"{plan.dlx_confirm_timeout_ms} ms, repair sweep {'on' if plan.sweep else 'held back'}"
    )
    try:
        await asyncio.to_thread(cluster.start, progress.say)
        balancer = Balancer([Target(n.name, "127.0.0.1", n.port) for n in cluster.nodes])
        await balancer.start()
        progress.say(f"  balancer on 127.0.0.1:{balancer.port} (fewest connections first)")

        await asyncio.to_thread(migrate, database.database_url)
        pool = await create_pool(database.database_url, max_size=4, application_name="cluster")
        contractors = await add_contractors(pool, 100)
        await receiver.start()
        env = {
            **service_env(
                StackOptions(backend="levels", log_dir=base), database, receiver.url, None
            ),
            "RABBITMQ_URL": balancer.url,
            "DELAY_QUEUE_TYPE": "quorum",
        }
        if not plan.sweep:
            # The repair sweep would re-arm a lost timer after its grace: held back for the
            # whole run, every send must come from a timer the cluster kept.
            env["SWEEP_GRACE_SECONDS"] = "3600"
        services = ServiceSet(env, base / "services", SERVICES)
        (base / "services").mkdir()
        progress.say("services starting (they declare the topology on the formed cluster)")
        await asyncio.to_thread(services.start)

        rows = await asyncio.to_thread(cluster.list_queues, *LEADER_COLUMNS)
        thin = under_replicated(rows, len(cluster.nodes))
        if thin:
            raise RuntimeError(f"timer queues not replicated on every node: {thin}")
        leadership = busiest_leader(rows)
        progress.say(f"  {leadership.timer_queues} timer queues, 3 members; {_led(leadership)}")

        first_due = datetime.now(UTC) + timedelta(seconds=plan.lead_in)
        step = plan.span / max(plan.followups - 1, 1)
        due = [first_due + timedelta(seconds=i * step) for i in range(plan.followups)]
        keys = [f"cluster-{tag}-{i}" for i in range(plan.followups)]
        bodies = [
            request_body(key, contractors[i % len(contractors)], moment)
            for i, (key, moment) in enumerate(zip(keys, due, strict=True))
        ]
        async with AmqpPublisher(balancer.url, name="cluster") as publisher:
            await publish_requests(publisher, bodies, window=100)
        progress.say(
            f"{plan.followups} follow-ups requested, due {step:.2f} s apart over {plan.span:.0f} s "
            f"from {first_due:%H:%M:%S}"
        )

        kill_moment = first_due.timestamp() + plan.kill_at * plan.span
        last_due = due[-1].timestamp()
        with progress.track("webhook calls", plan.followups) as tracker:
            while time.time() < kill_moment:
                tracker.update(len(receiver.calls), "before the kill")
                await asyncio.sleep(0.2)
            rows = await asyncio.to_thread(cluster.list_queues, *LEADER_COLUMNS)
            leadership = busiest_leader(rows)
            victim = cluster.by_name(leadership.node)
            links = balancer.connections_on(victim.name)
            killed_at = time.time()
            await asyncio.to_thread(cluster.kill, victim.name)
            progress.say(
                f"  SIGKILL {victim.name} (pid {victim.pid}) at {len(receiver.calls)} calls: "
                f"leader of {leadership.led}/{leadership.timer_queues} timer queues, "
                f"{links} client connections on it"
            )
            if plan.restart_after is not None:
                restart = asyncio.create_task(
                    _restart(cluster, victim.name, killed_at + plan.restart_after, progress)
                )
            resumed = False
            deadline = last_due + plan.patience
            settle_until = last_due + plan.settle
            while time.time() < deadline:
                calls = list(receiver.calls)
                if not resumed and calls and calls[-1].received_at > killed_at:
                    resumed = True
                    progress.say(
                        f"  first send after the kill: "
                        f"{calls[-1].received_at - killed_at:.2f} s after it"
                    )
                tracker.update(len(calls), "after the kill")
                if len(calls) >= plan.followups and time.time() >= settle_until:
                    break
                await asyncio.sleep(0.2)
            tracker.update(len(receiver.calls), "done")
        ended_at = time.time()
        if restart is not None:
            await restart

        # The database is this run's own: every row is one of its requests.
        found = await pool.fetch("SELECT id FROM contractor_followup_schedules")
        result = outcome(
            plan.followups, [r["id"] for r in found], deliveries(receiver), killed_at, ended_at
        )
        progress.say(f"  rows by status: {await statuses(pool, 0)}")
        with contextlib.suppress(Exception):
            after = busiest_leader(await asyncio.to_thread(cluster.list_queues, *LEADER_COLUMNS))
            progress.say(f"  after the kill: {_led(after)}")
        progress.say(summary_line(result, victim.name))
        succeeded = result.met_goal
        return result
    finally:
        progress.say("stopping the services, the balancer and the cluster's nodes")
        if restart is not None and not restart.done():
            restart.cancel()
            await asyncio.gather(restart, return_exceptions=True)
        if services is not None:
            await asyncio.to_thread(services.stop)
        with contextlib.suppress(Exception):
            await receiver.stop()
        if balancer is not None:
            await balancer.stop()
        await asyncio.to_thread(cluster.stop)
        if pool is not None:
            await pool.close()
        await _drop_database(database.name)
        if succeeded and not plan.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            progress.say(f"node and service logs kept in {base}")


async def _restart(cluster: Cluster, name: str, at: float, progress: Progress) -> None:
    """Start the killed node again on its own data, as an orchestrator restarts a lost pod."""
    await asyncio.sleep(max(0.0, at - time.time()))
    await asyncio.to_thread(cluster.restart, name)
    progress.say(f"  {name} is back (pid {cluster.by_name(name).pid}), restarted on its own data")


def _workspace() -> Path:
    base = Path(tempfile.mkdtemp(prefix="followups-cluster-"))
    base.chmod(0o755)  # the nodes run as the rabbitmq user, under this directory
    return base


def _led(leadership: Leadership) -> str:
    spread = ", ".join(f"{node} {n}" for node, n in sorted(leadership.by_node.items()))
    return f"timer queue leaders: {spread}"


async def _drop_database(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
