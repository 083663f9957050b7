"""The capacity scenario's stepping: steady at 50, 100, 200, 400, 800 follow-ups/s, 20 s each, a
fresh stack per step (so one step's backlog never weighs on the next), until p99 lateness passes
the threshold. The rate that held is the last step whose every follow-up was sent, none early,
with p99 at or under the threshold."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    rate: int  # follow-ups due per second
    sent: int
    expected: int
    early: int
    p99_ms: float | None

    def held(self, threshold_ms: float) -> bool:
        return (
            self.expected > 0
            and self.sent >= self.expected
            and self.early == 0
            and self.p99_ms is not None
            and self.p99_ms <= threshold_ms
        )


def step_count(rate: int, seconds: float) -> int:
    return max(1, round(rate * seconds))


def go_on(steps: list[Step], threshold_ms: float) -> bool:
    """Whether to run the next rate: only while every step so far held."""
    return all(step.held(threshold_ms) for step in steps)


def held_rate(steps: list[Step], threshold_ms: float) -> int | None:
    """The highest rate reached before the first step that did not hold; None if the first
    did not."""
    best = None
    for step in steps:
        if not step.held(threshold_ms):
            break
        best = step.rate
    return best


def verdict(steps: list[Step], rates: tuple[int, ...], threshold_ms: float) -> str:
    best = held_rate(steps, threshold_ms)
    missed = next((step for step in steps if not step.held(threshold_ms)), None)
    if missed is not None and missed.expected == 0:
        return f"the {missed.rate}/s step failed (see its row); held up to {best or 0}/s before it"
    if best is None:
        return f"p99 over {threshold_ms:g} ms already at {rates[0]}/s"
    if len(steps) == len(rates) and steps[-1].held(threshold_ms):
        return f"held at every step up to {best}/s (p99 ≤ {threshold_ms:g} ms): not saturated"
    return f"held up to {best}/s (p99 ≤ {threshold_ms:g} ms)"
