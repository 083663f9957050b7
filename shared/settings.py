"""Typed configuration read from the environment (README: Configuration), built once by each
entry point."""

from __future__ import annotations

import re
from datetime import time
from enum import StrEnum
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.policies import (
    DEFAULT_DELIVERY_LIMIT,
    DEFAULT_DLQ_MAX_AGE_HOURS,
    DEFAULT_DLQ_MAX_LENGTH,
    QueueLimits,
)
from shared.send_rate import (
    DEFAULT_MIN_PER_MINUTE,
    DEFAULT_RECOVERY_DELIVERIES,
    DEFAULT_THROTTLE_CODES,
    DEFAULT_UNDELIVERABLE_CODES,
    RatePolicy,
)

# The OpenAI SDK's own endpoint, used when OPENAI_BASE_URL is unset.
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
_QUIET_HOURS = re.compile(r"^(?P<start>\d{2}:\d{2})-(?P<end>\d{2}:\d{2})$")
_PROVIDER_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def provider_codes(text: str) -> frozenset[str]:
    """A comma-separated list of provider error codes, such as `30001,30007`; may be empty."""
    codes = frozenset(code.strip() for code in text.split(",") if code.strip())
    bad = sorted(code for code in codes if not _PROVIDER_CODE.match(code))
    if bad:
        raise ValueError(f"not provider error codes: {', '.join(bad)}")
    return codes


class DelayBackend(StrEnum):
    AUTO = "auto"
    PLUGIN = "plugin"
    LEVELS = "levels"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class QuietHours:
    """A daily local-time window, such as 21:00-08:00, that may wrap past midnight."""

    def __init__(self, start: time, end: time) -> None:
        if start == end:
            raise ValueError("quiet hours start and end must differ")
        self.start = start
        self.end = end

    @classmethod
    def parse(cls, text: str) -> QuietHours | None:
        if text.strip().lower() == "off":
            return None
        match = _QUIET_HOURS.match(text.strip())
        if not match:
            raise ValueError(f"QUIET_HOURS must look like 21:00-08:00 or be 'off', not {text!r}")
        return cls(time.fromisoformat(match["start"]), time.fromisoformat(match["end"]))

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


class Settings(BaseSettings):
    # A `.env` file in the working directory fills in what the environment leaves unset (a
    # laptop pointed at compose's broker and database); the environment always wins.
    model_config = SettingsConfigDict(
        extra="ignore", frozen=True, env_file=".env", env_file_encoding="utf-8"
    )

    database_url: str = "postgresql://127.0.0.1:5432/followups"
    # Connections per service process; queries are short, so a few serve many messages.
    db_pool_size: Annotated[int, Field(ge=2, le=100)] = 10
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    delay_backend: DelayBackend = DelayBackend.AUTO
    delay_queue_type: Annotated[str, Field(pattern="^(quorum|classic)$")] = "quorum"
    # Where `followups declare` applies the queue policies; unset: RABBITMQ_URL's host and
    # credentials on port 15672.
    rabbitmq_management_url: str | None = None
    # The queue policies (shared.policies): changed by `followups declare`, no queue deleted.
    delivery_limit: Annotated[int, Field(ge=1, le=1000)] = DEFAULT_DELIVERY_LIMIT
    dlq_max_length: Annotated[int, Field(ge=1, le=10_000_000)] = DEFAULT_DLQ_MAX_LENGTH
    dlq_max_age_hours: Annotated[float, Field(gt=0, le=8760)] = DEFAULT_DLQ_MAX_AGE_HOURS

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    prompt_variants: str = "standard"  # names with optional weights: "standard:2,question:1"
    personalize_lead_seconds: Annotated[float, Field(ge=0, le=86_400)] = 60
    # Model calls in flight per personalizer; a call waits on the model, not on this process.
    personalize_concurrency: Annotated[int, Field(ge=1, le=1000)] = 64

    n8n_outbound_webhook_url: AnyHttpUrl | None = None
    webhook_signing_secret: SecretStr | None = None
    webhook_allow_insecure: bool = False
    webhook_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10
    # The usual proxy variables (either case), for the webhook call (shared.outbound_proxy).
    https_proxy: SecretStr | None = None
    http_proxy: SecretStr | None = None
    no_proxy: str = ""

    # The ceiling of the adaptive send rate (shared.send_rate), which throttling signals halve.
    sms_rate_limit_per_minute: Annotated[int, Field(ge=1)] = 10
    sms_rate_min_per_minute: Annotated[int, Field(ge=1)] = DEFAULT_MIN_PER_MINUTE
    sms_rate_throttle_codes: str = ",".join(DEFAULT_THROTTLE_CODES)
    sms_rate_recovery_deliveries: Annotated[int, Field(ge=1, le=100_000)] = (
        DEFAULT_RECOVERY_DELIVERIES
    )
    # A delivery report with one of these codes stops sends to the contractor's phone.
    sms_undeliverable_codes: str = ",".join(DEFAULT_UNDELIVERABLE_CODES)
    dispatch_concurrency: Annotated[int, Field(ge=1, le=1000)] = 5
    dispatch_max_attempts: Annotated[int, Field(ge=1, le=50)] = 3
    # The send timer fires this much early; the dispatcher claims and prepares the send, then
    # waits in place for the exact instant. It covers the timer's own lateness, which on a busy
    # broker reached well past a quarter of a second.
    dispatch_margin_ms: Annotated[int, Field(ge=0, le=5000)] = 1000
    # A first call's start (its place in the send window, the record that it is under way) is
    # taken this much ahead of `scheduled_time`, so that at the instant only the POST is left.
    # A cancel that commits within it is too late, as one during the call is.
    dispatch_call_lead_ms: Annotated[int, Field(ge=0, le=1000)] = 50

    sweep_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 30
    sweep_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = 30
    # How often each service measures the database's clock, which every service keeps time by.
    clock_sync_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 10

    quiet_hours: str = "21:00-08:00"
    default_timezone: str = "America/New_York"

    log_level: str = "INFO"
    log_format: LogFormat | None = None

    # Added to the process's nice value at start. Where the services share a host's cores, the
    # scheduler and the personalizer (seconds of slack) at 5 let the dispatcher's timed sends
    # take a core first; `followups run all` starts them so.
    cpu_nice: Annotated[int, Field(ge=0, le=19)] = 0

    # Health, readiness and metrics endpoints; HTTP_PORT unset: the service's own default port.
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65535)] | None = None

    @field_validator("quiet_hours")
    @classmethod
    def _check_quiet_hours(cls, value: str) -> str:
        QuietHours.parse(value)
        return value

    @field_validator("sms_rate_throttle_codes", "sms_undeliverable_codes")
    @classmethod
    def _check_codes(cls, value: str) -> str:
        provider_codes(value)
        return value

    @model_validator(mode="after")
    def _check_rate_floor(self) -> Settings:
        if self.sms_rate_min_per_minute > self.sms_rate_limit_per_minute:
            raise ValueError(
                f"SMS_RATE_MIN_PER_MINUTE ({self.sms_rate_min_per_minute}) is above "
                f"SMS_RATE_LIMIT_PER_MINUTE ({self.sms_rate_limit_per_minute})"
            )
        return self

    @field_validator("default_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"DEFAULT_TIMEZONE {value!r} is not an IANA time zone") from exc
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"LOG_LEVEL {value!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return level

    @property
    def rate_policy(self) -> RatePolicy:
        return RatePolicy(
            ceiling=self.sms_rate_limit_per_minute,
            floor=self.sms_rate_min_per_minute,
            recovery_deliveries=self.sms_rate_recovery_deliveries,
        )

    @property
    def queue_limits(self) -> QueueLimits:
        return QueueLimits(self.delivery_limit, self.dlq_max_length, self.dlq_max_age_hours)

    @property
    def throttle_codes(self) -> frozenset[str]:
        return provider_codes(self.sms_rate_throttle_codes)

    @property
    def undeliverable_codes(self) -> frozenset[str]:
        return provider_codes(self.sms_undeliverable_codes)

    @property
    def quiet_window(self) -> QuietHours | None:
        return QuietHours.parse(self.quiet_hours)

    @property
    def default_zone(self) -> ZoneInfo:
        return ZoneInfo(self.default_timezone)
