"""structlog set-up: JSON lines (console on a TTY), bound context, personal data scrubbed."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from shared.settings import LogFormat, Settings

# Keys whose values are personal or secret: never rendered, whatever the caller passes.
_REDACTED_KEYS = frozenset(
    {
        "phone",
        "message",
        "text",
        "message_text",
        "body",
        "hints",
        "ai_context_hints",
        "response_text",
        "api_key",
        "secret",
        "authorization",
        "prompt",
    }
)
_PHONE = re.compile(r"\+\d[\d ]{6,17}\d|\b\d{10,15}\b")
_CONTROL = re.compile(r"[\r\n\t\x00-\x1f\x7f]")


def mask_phone(phone: str | None) -> str:
    """Keep the last two digits so support can tell numbers apart without seeing them."""
    if not phone:
        return "-"
    digits = [c for c in phone if c.isdigit()]
    return "+" + "*" * max(len(digits) - 2, 0) + "".join(digits[-2:])


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _CONTROL.sub(" ", _PHONE.sub("[phone]", value))
    return value


def scrub_personal_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    for key in list(event_dict):
        if key.lower() in _REDACTED_KEYS:
            event_dict[key] = "[redacted]"
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def _flatten_faststream_extra(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    # FastStream logs with extra={...}; lift it into the event so it renders as fields.
    extra = event_dict.pop("extra", None)
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            event_dict.setdefault(str(key), value)
    return event_dict


def configure_logging(settings: Settings) -> None:
    fmt = settings.log_format or (LogFormat.CONSOLE if sys.stderr.isatty() else LogFormat.JSON)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt is LogFormat.CONSOLE
        else structlog.processors.JSONRenderer()
    )
    shared_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _flatten_faststream_extra,
    ]
    # Libraries (aio-pika, asyncpg, httpx) log through the standard library: same output.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared_chain, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                scrub_personal_data,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[settings.log_level]))
    structlog.configure(
        processors=[
            *shared_chain,
            structlog.processors.format_exc_info,
            scrub_personal_data,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[settings.log_level]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
