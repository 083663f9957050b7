"""Retry and dead-letter policy in one place: what counts as transient, how long each kind of
retry pauses, and when trying again stops.

- A consumed message: a transient error (`TRANSIENT`) is retried in the handler after each of
  `RETRY_PAUSES`, then the message goes back to the broker, whose delivery limit stops a poison
  message; a `Rejected` one is dead-lettered at once with its rule (shared/consumer.py).
- A webhook call: a timeout, a lost connection, 408, 429 or 5xx is transient; it is retried
  after `backoff` (never sooner than Retry-After, capped at `MAX_RETRY_AFTER_SECONDS`) until
  the dispatcher's max attempts, then the follow-up ends failed and its timer message is
  dead-lettered with rule `failed` (services/dispatcher). A 429 also pauses every dispatcher.
- An LLM call: bounded attempts inside the personalizer's budget; on failure the template goes.
- Start-up: the broker and the database are waited for, the pause doubling up to a cap.
"""

from __future__ import annotations

import random
from datetime import timedelta

from shared.db import RETRYABLE_WRITE_ERRORS
from shared.errors import RetryLater

# ---- consumed messages --------------------------------------------------------------------

# A transient failure is retried here a few times before the message goes back to the broker,
# so a database blip does not spend the queue's delivery limit.
RETRY_PAUSES = (0.2, 0.5, 1.0, 2.0, 4.0)
TRANSIENT: tuple[type[BaseException], ...] = (RetryLater, *RETRYABLE_WRITE_ERRORS)

# ---- webhook calls ------------------------------------------------------------------------

RETRYABLE_STATUS = frozenset({408, 429})
MAX_RETRY_AFTER_SECONDS = 3600.0
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 300.0


def transient_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def backoff(attempt: int, retry_after: float | None, draw: float | None = None) -> timedelta:
    """Exponential with jitter (half fixed, half random: `draw` in [0, 1), a fresh one when
    None), never shorter than Retry-After."""
    if draw is None:
        draw = random.random()
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
    seconds = ceiling / 2 + draw * (ceiling / 2)
    return timedelta(seconds=max(seconds, retry_after or 0.0))


def throttle_pause(retry_after: float | None) -> timedelta:
    """How long a 429 pauses the fleet: its Retry-After, else the first backoff step."""
    return timedelta(seconds=retry_after or BACKOFF_BASE_SECONDS)


def gives_up(attempts: int, max_attempts: int) -> bool:
    """After this many attempts a transient refusal is final."""
    return attempts >= max_attempts


# ---- LLM calls ----------------------------------------------------------------------------

LLM_MAX_ATTEMPTS = 3
LLM_BACKOFF_SECONDS = 0.25

# ---- start-up -----------------------------------------------------------------------------

# How long a starting service waits for the broker and the database before it gives up.
STARTUP_PATIENCE_SECONDS = 60.0
STARTUP_FIRST_PAUSE_SECONDS = 0.5
STARTUP_MAX_PAUSE_SECONDS = 5.0
