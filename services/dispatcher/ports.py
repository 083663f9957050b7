"""What the dispatcher's handlers need of the record (`DispatchStore`), and the values it answers
with; `DispatchRepository` is the PostgreSQL one, a fake in a test is another."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol
from uuid import UUID

from services.dispatcher.send_window import CallSlot
from shared.occurrences import Ends, NextOccurrence
from shared.rows import Followup, SendContext
from shared.send_rate import RatePolicy
from shared.send_rate_store import RateChange


@dataclass(frozen=True)
class Sent:
    row: Followup | None  # None: the claim was lost meanwhile, nothing recorded on the row
    following: Followup | None
    too_late: str | None  # "cancel" or "reschedule" when one came during the accepted call


@dataclass(frozen=True)
class Retry:
    """Try again at `at` (its timer is armed once the row is released for it)."""

    at: datetime
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str
    plan: NextOccurrence | None


class Settlement(StrEnum):
    RETRY = "retry"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RESCHEDULED = "rescheduled"
    LOST = "lost"


@dataclass(frozen=True)
class Settled:
    kind: Settlement
    row: Followup | None = None
    following: Followup | None = None


class DispatchStore(Ends, Protocol):
    """What the dispatcher's handlers need of the record."""

    async def get(self, followup_id: int) -> Followup | None: ...

    async def claim(
        self,
        followup_id: int,
        version: int,
        lease: timedelta,
        early: timedelta,
        *,
        resume: UUID | None = None,
        linger: float = 0.0,
    ) -> tuple[Followup, SendContext | None] | None: ...

    async def renew(self, row: Followup, lease: timedelta) -> bool: ...

    async def start_call(
        self, row: Followup, *, limit_per_minute: int, lease: timedelta
    ) -> CallSlot: ...

    async def pause_gateway(
        self, until: datetime, reason: str, *, policy: RatePolicy, followup_id: int
    ) -> RateChange | None: ...

    async def release_for_retry(
        self,
        row: Followup,
        *,
        next_attempt_at: datetime,
        error: str,
        count_attempt: bool = True,
        deferred_reason: str | None = None,
        waiting: bool = False,
    ) -> bool: ...

    async def mark_sent(
        self,
        row: Followup,
        *,
        call_id: int,
        post_lateness: timedelta,
        http_status: int | None,
        sent_by: str,
        note: str | None,
        text_fallback_reason: str | None,
        next_occurrence: NextOccurrence | None,
        linger: float = 0.0,
    ) -> Sent: ...

    async def settle_unsent(
        self,
        row: Followup,
        *,
        call_id: int | None,
        outcome: str,
        http_status: int | None,
        then: Retry | GiveUp,
    ) -> Settled: ...
