"""What the dispatcher's handlers are given (`DispatcherDeps`, built once by the app) and what
passes from the checks to the call (`PreparedSend`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from zoneinfo import ZoneInfo

from services.dispatcher.gateway import Gateway
from services.dispatcher.ports import DispatchStore
from services.dispatcher.resumable import ResumableClaims
from shared.bus import Publisher
from shared.consumer import Incoming
from shared.occurrences import NextOccurrence
from shared.rows import Followup
from shared.send_rate import DEFAULT_MIN_PER_MINUTE, DEFAULT_RECOVERY_DELIVERIES, RatePolicy
from shared.settings import QuietHours
from shared.timers import Clock, Timer


@dataclass(frozen=True)
class DispatcherDeps:
    repository: DispatchStore
    timer: Timer
    publisher: Publisher
    gateway: Gateway
    clock: Clock
    rate_limit_per_minute: int
    max_attempts: int
    # How long a claim holds without its owner renewing it: longer than a webhook call, so a
    # live dispatcher is never taken over; renewed while waiting for a call place.
    lease: timedelta
    personalize_lead: timedelta
    quiet_hours: QuietHours | None
    default_zone: ZoneInfo
    margin: timedelta
    calls_in_flight: asyncio.Semaphore
    # A first call's start is taken this much ahead of its instant; then only the POST is left.
    call_lead: timedelta = timedelta(0)
    # the adaptive send rate: rate_limit_per_minute is its ceiling
    rate_floor: int = DEFAULT_MIN_PER_MINUTE
    recovery_deliveries: int = DEFAULT_RECOVERY_DELIVERIES
    resumable: ResumableClaims = field(default_factory=ResumableClaims)

    @property
    def rate_policy(self) -> RatePolicy:
        return RatePolicy(self.rate_limit_per_minute, self.rate_floor, self.recovery_deliveries)


@dataclass(frozen=True)
class PreparedSend:
    """A claimed occurrence that passed every check, with its recipient and text."""

    row: Followup
    phone: str
    text: str
    text_note: str | None  # set when the template went out because the text was not ready
    plan: NextOccurrence | None
    incoming: Incoming
