"""Prometheus metrics of every service, on the default registry (served at /metrics).

Labels never carry personal data: no phone numbers, message text, hints or free-form errors.
"""

from __future__ import annotations

import re

from prometheus_client import Counter, Gauge, Histogram

from shared.topology import DEAD_LETTER_EXCHANGE

_TIMER_EXCHANGES = "followups.timers."
_DELAY_DIGITS = re.compile(r"^(?:[0-9a-f]\.)+")


def destination_label(exchange: str, routing_key: str) -> str:
    """A bounded metric label for where a message went or came from.

    Timer routing keys spell each delay, one word per digit: kept as they are, every delay
    would be a new time series. Only the destination queue at their end is kept.
    """
    if exchange.startswith(_TIMER_EXCHANGES):
        return f"followups.timers.{_DELAY_DIGITS.sub('', routing_key)}"
    if exchange == DEAD_LETTER_EXCHANGE:
        return f"{exchange}.{routing_key}"
    return f"{exchange or 'default'}.{routing_key}"


MESSAGES = Counter(
    "followups_messages_total",
    "Messages handled, by stage (scheduler, personalizer, dispatcher) and outcome",
    ["stage", "outcome"],
)
UNKNOWN_FIELDS = Counter(
    "followups_unknown_fields_total",
    "Inbound fields ignored because this version does not know them, by command and field name "
    "(a name outside [a-z_]{1,40}, or past the first 50 names, is counted as 'other')",
    ["command", "field"],
)
REJECTED = Counter(
    "followups_rejected_total",
    "Messages sent to a dead-letter queue, by queue and the rule that failed",
    ["queue", "rule"],
)
TIMERS_ARMED = Counter(
    "followups_timers_armed_total",
    "Timers armed, by backend and destination",
    ["backend", "destination"],
)
PUBLISHED = Counter(
    "followups_published_total",
    "Messages published and confirmed by the broker, by service and destination",
    ["service", "destination"],
)
SEND_LATENESS = Histogram(
    "followups_send_lateness_seconds",
    "Webhook POST start minus scheduled_time",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TIMER_LATENESS = Histogram(
    "followups_timer_lateness_seconds",
    "Send timer arrival minus its fire time; near DISPATCH_MARGIN_MS, sends start to be late",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SENDS = Counter(
    "followups_sends_total", "Webhook calls, by outcome (sent, retry, failed)", ["outcome"]
)
RATE_LIMIT_WAITS = Counter(
    "followups_rate_limit_waits_total", "Sends deferred because the global send window was full"
)
RETRIES = Counter("followups_retries_total", "Send attempts re-armed after a transient failure")
TEXT_SOURCE = Counter(
    "followups_text_total",
    "Texts prepared, by source (ai, template) and fallback reason",
    ["source", "reason"],
)
LLM_LATENCY = Histogram(
    "followups_llm_latency_seconds",
    "OpenAI call duration, by result",
    ["result"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60),
)
LLM_TOKENS = Counter("followups_llm_tokens_total", "Tokens used, by kind", ["kind"])
SWEEP_LAST_PASS = Gauge(
    "followups_sweep_last_pass_timestamp_seconds",
    "Unix time when this dispatcher's repair sweep last completed a pass (a standby's too)",
)
CLOCK_OFFSET = Gauge(
    "followups_clock_offset_seconds",
    "The database's clock minus this host's, at the measurement the service's clock runs on",
)
CLOCK_ERROR = Gauge(
    "followups_clock_error_seconds",
    "How far the true clock offset may lie from the measured one (half its round trip)",
)
DELIVERY_REPORTS = Counter(
    "followups_delivery_reports_total",
    "Delivery reports by status and outcome (recorded; not_sent: recorded on an occurrence that "
    "is not sent; stale: an equal or later report was already stored; duplicate)",
    ["status", "outcome"],
)
SEND_RATE = Gauge(
    "followups_send_rate_limit_per_minute",
    "The adaptive send rate: webhook calls allowed in any minute across the fleet, as this "
    "process last counted or changed it",
)
