"""Timer work from the broker's own statistics: how many times a follow-up's timer messages enter
a queue (the publish that arms a timer, then one dead-lettering per hop).

What RabbitMQ 3.10 counts (checked on this broker with a TTL queue dead-lettering into another,
classic and quorum, at-most-once and at-least-once):

- a queue's `message_stats.publish` in the management API counts the messages a client channel
  routed into it, not the ones dead-lettered into it (the dead-letter target showed no `publish`
  while it held every message); exchanges' `publish_in` likewise;
- a classic queue's `backing_queue_status.next_seq_id` counts every message that entered it,
  dead-lettered ones included; quorum queues have no such figure;
- the node's global counters (`rabbit_global_counters`, the same ones the Prometheus plugin
  exports as `rabbitmq_global_messages_dead_lettered_expired_total`) count every message that
  expired into a dead-letter exchange, per queue type, for the whole node: other vhosts included.

So: timer publishes = `publish` summed over the timer queues (names starting with
`followups.timers.`) and the two work queues (a timer already due goes straight there); hops =
expired dead-letterings, exact per vhost when the timer queues are classic (`next_seq_id` −
`publish`), otherwise the node's counter over the run, with the messages published on other
vhosts meanwhile reported beside it. The dead-letterings into the work queues are exact either
way: deliveries − redeliveries + messages still there − `publish`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from shared.topology import TIMER_PLUGIN_EXCHANGE
from testbed.infra import broker_node

CREDENTIALS = base64.b64encode(b"guest:guest").decode()
TIMER_PREFIX = "followups.timers."
WORK_QUEUES = ("followups.personalizer.due", "followups.dispatcher.due")
# The broker emits queue statistics every 5 s (collect_statistics_interval).
STATS_INTERVAL = 5.2


class ManagementUnavailable(RuntimeError):
    pass


def management_get(path: str, timeout: float = 10.0) -> Any:
    api = broker_node().management_api
    request = urllib.request.Request(f"{api}/{path}")
    request.add_header("Authorization", f"Basic {CREDENTIALS}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        raise ManagementUnavailable(
            f"the management API on {api} did not answer ({exc}): "
            "`rabbitmq-plugins enable rabbitmq_management` (see docs/performance.md)"
        ) from exc


def vhost_queues(vhost: str) -> list[dict[str, Any]]:
    return list(management_get(f"queues/{quote(vhost, safe='')}"))


def vhost_published(vhost: str) -> int:
    """Messages client channels published into this vhost's exchanges."""
    data = management_get(f"vhosts/{quote(vhost, safe='')}")
    return int(data.get("message_stats", {}).get("publish", 0))


@dataclass(frozen=True)
class NodeCounters:
    dead_lettered_expired: int
    received: int


_EVAL = (
    "Sum = fun(Name) -> maps:fold(fun(_, C, A) -> A + maps:get(Name, C, 0) end, 0, "
    "rabbit_global_counters:overview()) end, "
    "{Sum(messages_dead_lettered_expired_total), Sum(messages_received_total)}."
)


def parse_node_counters(text: str) -> NodeCounters:
    """`{12,34}` as rabbitmqctl eval prints the tuple."""
    match = re.fullmatch(r"\s*\{\s*(\d+)\s*,\s*(\d+)\s*\}\s*", text)
    if match is None:
        raise ValueError(f"unexpected answer from the broker: {text!r}")
    return NodeCounters(int(match[1]), int(match[2]))


def node_counters() -> NodeCounters:
    result = subprocess.run(
        broker_node().cli("eval", _EVAL), capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl eval failed: {result.stderr.strip()}")
    return parse_node_counters(result.stdout)


@dataclass(frozen=True)
class TimerWork:
    timer_queues: int  # how many timer queues the vhost has
    timer_publishes: int
    hops: int | None  # dead-letterings: exact per vhost, or the node's count (see `exact`)
    exact: bool
    into_work_queues: int  # dead-lettered into the work queues (always exact)
    timer_messages_left: int  # still waiting in the timer queues
    other_vhost_publishes: int | None = None  # node-wide published − this vhost's, meanwhile

    @property
    def total(self) -> int | None:
        return None if self.hops is None else self.timer_publishes + self.hops

    def per_followup(self, followups: int) -> float | None:
        total = self.total
        return None if total is None or followups <= 0 else total / followups


def _stat(queue: Mapping[str, Any], name: str) -> int:
    return int((queue.get("message_stats") or {}).get(name, 0))


def entered(queue: Mapping[str, Any]) -> int | None:
    """Every message that entered a timer queue, where the broker keeps that figure: a classic
    queue's next sequence id; for one that holds messages without a TTL (orphans), what it
    holds and delivered; None for a quorum TTL queue."""
    status = queue.get("backing_queue_status") or {}
    if "next_seq_id" in status:
        return int(status["next_seq_id"])
    if "x-message-ttl" not in (queue.get("arguments") or {}):
        return consumed_entries(queue)
    return None


def consumed_entries(queue: Mapping[str, Any]) -> int:
    """First deliveries plus messages still there: what entered a queue that consumers drain."""
    first = _stat(queue, "deliver_get") - _stat(queue, "redeliver")
    return first + int(queue.get("messages", 0) or 0)


def timer_work(
    queues: Iterable[Mapping[str, Any]],
    node_before: NodeCounters | None = None,
    node_after: NodeCounters | None = None,
    vhost_publishes: int | None = None,
    plugin_exchange: Mapping[str, Any] | None = None,
) -> TimerWork:
    """From one vhost's queue list (management API), the node counters around the run and,
    for the plugin, its exchange's statistics."""
    timers = [q for q in queues if str(q["name"]).startswith(TIMER_PREFIX)]
    work = [q for q in queues if q["name"] in WORK_QUEUES]
    timer_publishes = sum(_stat(q, "publish") for q in timers) + sum(
        _stat(q, "publish") for q in work
    )
    into_work = sum(consumed_entries(q) - _stat(q, "publish") for q in work)
    left = sum(int(q.get("messages", 0) or 0) for q in timers)
    counts = [entered(q) for q in timers]
    other = None
    if node_before is not None and node_after is not None and vhost_publishes is not None:
        other = max(0, node_after.received - node_before.received - vhost_publishes)
    if not timers:
        # The plugin: no timer queues. Each timer is one publish into its exchange and one
        # delivery from it into a work queue, which the queue counts as a publish of its own;
        # what else the work queues took was published to them directly.
        stats = (plugin_exchange or {}).get("message_stats") or {}
        armed, delivered = int(stats.get("publish_in", 0)), int(stats.get("publish_out", 0))
        direct = max(0, timer_publishes - delivered)
        return TimerWork(0, armed + direct, delivered + into_work, True, delivered, 0, other)
    known = [c for c in counts if c is not None]
    if len(known) == len(counts):
        between = sum(c - _stat(q, "publish") for c, q in zip(known, timers, strict=True))
        return TimerWork(len(timers), timer_publishes, between + into_work, True, into_work, left)
    hops = None
    if node_before is not None and node_after is not None:
        hops = node_after.dead_lettered_expired - node_before.dead_lettered_expired
    return TimerWork(len(timers), timer_publishes, hops, False, into_work, left, other)


def _fingerprint(queues: list[dict[str, Any]]) -> list[tuple[str, int, int, int, int]]:
    return sorted(
        (
            str(q["name"]),
            _stat(q, "publish"),
            _stat(q, "deliver_get"),
            int(q.get("messages", 0) or 0),
            int((q.get("backing_queue_status") or {}).get("next_seq_id", 0)),
        )
        for q in queues
    )


async def settled_queues(vhost: str, patience: float = 30.0) -> list[dict[str, Any]]:
    """The vhost's queues once two answers a statistics interval apart agree."""
    deadline = time.monotonic() + patience
    last = await asyncio.to_thread(vhost_queues, vhost)
    while time.monotonic() < deadline:
        await asyncio.sleep(STATS_INTERVAL)
        now = await asyncio.to_thread(vhost_queues, vhost)
        if _fingerprint(now) == _fingerprint(last):
            return now
        last = now
    return last


def plugin_exchange(vhost: str) -> dict[str, Any] | None:
    """The delayed-message exchange's statistics, or None where the vhost has none (levels)."""
    try:
        return dict(management_get(f"exchanges/{quote(vhost, safe='')}/{TIMER_PLUGIN_EXCHANGE}"))
    except ManagementUnavailable:
        return None


async def measure_after(vhost: str, node_before: NodeCounters | None) -> TimerWork:
    queues = await settled_queues(vhost)
    published = await asyncio.to_thread(vhost_published, vhost)
    node_after = await asyncio.to_thread(node_counters) if node_before else None
    delayed = await asyncio.to_thread(plugin_exchange, vhost)
    return timer_work(queues, node_before, node_after, published, delayed)
