"""Which node leads the timer queues, from `rabbitmqctl list_queues name leader members type`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Every queue of the timer topology is named under this prefix, whatever its layout.
TIMER_QUEUE_PREFIX = "followups.timers."


def is_timer_queue(row: Mapping[str, Any]) -> bool:
    return str(row.get("name", "")).startswith(TIMER_QUEUE_PREFIX)


@dataclass(frozen=True)
class Leadership:
    node: str  # the node leading the most timer queues
    led: int  # how many it leads
    timer_queues: int  # timer queues listed
    by_node: dict[str, int]


def busiest_leader(rows: Iterable[Mapping[str, Any]]) -> Leadership:
    """The node that leads the most timer queues; on a tie, the first name in sort order (so a
    run can be repeated). Queues without a leader (classic, or mid-election) are not counted."""
    timers = [row for row in rows if is_timer_queue(row)]
    counts = Counter(str(row["leader"]) for row in timers if row.get("leader"))
    if not counts:
        raise ValueError("no timer queue has a leader: is the topology declared on quorum queues?")
    node, led = min(counts.items(), key=lambda item: (-item[1], item[0]))
    return Leadership(node=node, led=led, timer_queues=len(timers), by_node=dict(counts))


def under_replicated(rows: Iterable[Mapping[str, Any]], size: int) -> list[str]:
    """Timer queues that are not quorum queues with a member on each of `size` nodes."""
    return sorted(
        str(row["name"])
        for row in rows
        if is_timer_queue(row)
        and (row.get("type") != "quorum" or len(row.get("members") or []) < size)
    )
