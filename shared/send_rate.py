"""The adaptive send rate (additive increase, multiplicative decrease), as a pure rule: given the
current state and a signal, the next state. `shared.send_rate_store` applies it in PostgreSQL
under the send window's lock, so every dispatcher replica counts calls at the same rate.

- A throttling signal (a 429 from the gateway, or a delivery report with a code that means "slow
  down") halves the rate, never below the floor. Signals within one `WINDOW` of the last one that
  counted count once: one bad burst halves the rate once, not down to the floor.
- A `delivered` report extends the run of deliveries in a row; any other report ends it. Once the
  run reaches `recovery_deliveries`, the rate rises by one, at most once per `WINDOW` and not
  within a `WINDOW` of the last halving, up to the ceiling.
- A ceiling lowered in the configuration holds at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

WINDOW = timedelta(seconds=60)

# Twilio's public error-code reference (twilio.com/docs/api/errors): codes whose documented fix is
# to send more slowly.
DEFAULT_THROTTLE_CODES = (
    "30001",  # queue overflow
    "30007",  # message filtered by the carrier
    "30022",  # US A2P 10DLC: rate limits exceeded
    "63017",  # rate limit exceeded
)
# The same reference: codes that say the number itself can't take an SMS.
DEFAULT_UNDELIVERABLE_CODES = (
    "30003",  # unreachable destination handset
    "30005",  # unknown destination handset
    "30006",  # landline or unreachable carrier
    "21211",  # invalid 'To' phone number
    "21614",  # 'To' number is not a valid mobile number
)
DEFAULT_RECOVERY_DELIVERIES = 20
DEFAULT_MIN_PER_MINUTE = 1


class Signal(StrEnum):
    THROTTLED = "throttled"
    DELIVERED = "delivered"
    NOT_DELIVERED = "not_delivered"


@dataclass(frozen=True)
class RatePolicy:
    ceiling: int
    floor: int = DEFAULT_MIN_PER_MINUTE
    recovery_deliveries: int = DEFAULT_RECOVERY_DELIVERIES

    def __post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError(f"the rate floor {self.floor} must be 1..{self.ceiling}")
        if self.recovery_deliveries < 1:
            raise ValueError("recovery_deliveries must be at least 1")


@dataclass(frozen=True)
class RateState:
    limit_per_minute: int
    delivered_in_a_row: int = 0
    throttled_at: datetime | None = None  # the last throttling signal that counted
    raised_at: datetime | None = None

    def effective(self, policy: RatePolicy) -> int:
        return min(self.limit_per_minute, policy.ceiling)


def _within_window(moment: datetime | None, now: datetime) -> bool:
    return moment is not None and now - moment < WINDOW


def next_state(state: RateState, signal: Signal, now: datetime, policy: RatePolicy) -> RateState:
    limit = state.effective(policy)
    if signal is Signal.THROTTLED:
        if _within_window(state.throttled_at, now):
            return replace(state, limit_per_minute=limit, delivered_in_a_row=0)
        return replace(
            state,
            limit_per_minute=max(policy.floor, limit // 2),
            delivered_in_a_row=0,
            throttled_at=now,
        )
    if signal is Signal.NOT_DELIVERED:
        return replace(state, limit_per_minute=limit, delivered_in_a_row=0)
    in_a_row = state.delivered_in_a_row + 1
    may_rise = (
        in_a_row >= policy.recovery_deliveries
        and limit < policy.ceiling
        and not _within_window(state.raised_at, now)
        and not _within_window(state.throttled_at, now)
    )
    if may_rise:
        return replace(
            state, limit_per_minute=limit + 1, delivered_in_a_row=in_a_row, raised_at=now
        )
    return replace(state, limit_per_minute=limit, delivered_in_a_row=in_a_row)


def signal_for_report(
    status: str, error_code: str | None, throttle_codes: frozenset[str]
) -> Signal:
    if status == "delivered":
        return Signal.DELIVERED
    if error_code is not None and error_code in throttle_codes:
        return Signal.THROTTLED
    return Signal.NOT_DELIVERED
