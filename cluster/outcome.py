"""What the webhook receiver saw, turned into the one line `make cluster` prints."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from bench.measure import Delivery, first_calls
from bench.stats import duplicates

# Sends must resume within this long after the node is killed, and no follow-up may be later
# than this.
RESUME_WITHIN_SECONDS = 10.0
# Gaps are looked for from the kill up to this long after it.
GAP_WINDOW_SECONDS = 30.0


def longest_gap(
    received: Iterable[float], kill_at: float, until: float, window: float = GAP_WINDOW_SECONDS
) -> float:
    """The longest pause between consecutive receives that ends after the kill and starts
    before `kill_at + window` (the pause the kill caused, and any right after it). With no
    receive after the kill, sends never resumed: the pause lasts from the last receive (or the
    kill) to `until`."""
    times = sorted(received)
    before = [t for t in times if t <= kill_at]
    after = [t for t in times if t > kill_at]
    if not after:
        return until - (before[-1] if before else kill_at)
    best = after[0] - (before[-1] if before else kill_at)
    for earlier, later in pairwise(after):
        if earlier >= kill_at + window:
            break
        best = max(best, later - earlier)
    return best


def longest_gap_before(received: Iterable[float], kill_at: float) -> float:
    """The longest pause between receives before the kill: how far apart sends are anyway."""
    times = sorted(t for t in received if t <= kill_at)
    return max((b - a for a, b in pairwise(times)), default=0.0)


@dataclass(frozen=True)
class Outcome:
    requested: int
    sent: int  # follow-ups of this run called at least once
    lost: int  # requested and never called
    double_keys: int  # follow-ups called under more than one Idempotency-Key
    repeated_calls: int  # follow-ups called more than once under the same key
    early: int  # calls received before their scheduled_time
    worst_lateness_s: float | None
    late: int  # follow-ups sent more than RESUME_WITHIN_SECONDS after their time
    stall_s: float  # how long sends stopped around the kill
    usual_gap_s: float  # the longest pause before the kill

    @property
    def met_goal(self) -> bool:
        return (
            self.lost == 0
            and self.double_keys == 0
            and self.early == 0
            and self.late == 0
            and self.stall_s <= RESUME_WITHIN_SECONDS
        )


def outcome(
    requested: int,
    expected_ids: Sequence[int],
    found: Sequence[Delivery],
    kill_at: float,
    until: float,
) -> Outcome:
    """`expected_ids`: the rows the requests became (fewer than `requested` if some never
    became a row); `found`: every webhook call of the run."""
    wanted = set(expected_ids)
    mine = [d for d in found if d.followup_id in wanted]
    first = first_calls(mine)
    dup = duplicates((d.followup_id, d.key) for d in mine)
    lateness = [d.received_at - d.scheduled_at for d in first]
    return Outcome(
        requested=requested,
        sent=len(first),
        lost=requested - len(first),
        double_keys=dup.different_keys,
        repeated_calls=dup.repeated_calls,
        early=sum(1 for d in mine if d.received_at < d.scheduled_at),
        worst_lateness_s=max(lateness) if lateness else None,
        late=sum(1 for seconds in lateness if seconds > RESUME_WITHIN_SECONDS),
        stall_s=longest_gap((d.received_at for d in mine), kill_at, until),
        usual_gap_s=longest_gap_before((d.received_at for d in mine), kill_at),
    )


def summary_line(result: Outcome, killed: str) -> str:
    lateness = "n/a" if result.worst_lateness_s is None else f"{result.worst_lateness_s:.2f} s"
    verdict = "ok" if result.met_goal else "FAILED"
    return (
        f"cluster {verdict}: sent {result.sent}/{result.requested}, lost {result.lost}, "
        f"double keys {result.double_keys}, early {result.early}, worst lateness {lateness} "
        f"({result.late} later than {RESUME_WITHIN_SECONDS:.0f} s), "
        f"sends stopped {result.stall_s:.2f} s after killing {killed} "
        f"(longest gap before: {result.usual_gap_s:.2f} s; "
        f"repeated calls, same key: {result.repeated_calls})"
    )
