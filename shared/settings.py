"""Typed configuration read from the environment (CONTRACT §5), built once by each entry point."""

from __future__ import annotations

import re
from datetime import time
from enum import StrEnum
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_QUIET_HOURS = re.compile(r"^(?P<start>\d{2}:\d{2})-(?P<end>\d{2}:\d{2})$")


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
    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    database_url: str = "postgresql://127.0.0.1:5432/followups"
    # Connections per service process; queries are short, so a few serve many messages.
    db_pool_size: Annotated[int, Field(ge=2, le=100)] = 10
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    delay_backend: DelayBackend = DelayBackend.AUTO
    delay_queue_type: Annotated[str, Field(pattern="^(quorum|classic)$")] = "quorum"

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

    sms_rate_limit_per_minute: Annotated[int, Field(ge=1)] = 10
    dispatch_concurrency: Annotated[int, Field(ge=1, le=1000)] = 5
    dispatch_max_attempts: Annotated[int, Field(ge=1, le=50)] = 3
    # The send timer fires this much early; the dispatcher claims and prepares the send, then
    # waits in place for the exact instant (covers the timer backend's own lateness).
    dispatch_margin_ms: Annotated[int, Field(ge=0, le=5000)] = 250

    sweep_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 30
    sweep_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = 30
    # How often each service measures the database's clock, which every service keeps time by.
    clock_sync_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 10

    quiet_hours: str = "21:00-08:00"
    default_timezone: str = "America/New_York"

    log_level: str = "INFO"
    log_format: LogFormat | None = None

    # Health, readiness and metrics endpoints; HTTP_PORT unset: the service's own default port.
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65535)] | None = None

    @field_validator("quiet_hours")
    @classmethod
    def _check_quiet_hours(cls, value: str) -> str:
        QuietHours.parse(value)
        return value

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
    def quiet_window(self) -> QuietHours | None:
        return QuietHours.parse(self.quiet_hours)

    @property
    def default_zone(self) -> ZoneInfo:
        return ZoneInfo(self.default_timezone)
