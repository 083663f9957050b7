"""How well the follow-ups work: the SQL behind the effectiveness dashboard and `followups stats`.

Each query is written once, here, in the form Grafana's PostgreSQL data source runs it: the time
range is `$__timeFrom()` / `$__timeTo()` and the zone for contractors without a valid one is the
dashboard variable `${default_timezone}`. `deploy/grafana/effectiveness.json` is generated from
these texts (`make docs`); `bind` turns the same text into a parameterised query for asyncpg, so
the CLI and the tests run exactly what the dashboard runs.

Every figure counts the follow-ups *sent* in the range (`sent_at` from its start, before its end);
the rate changes count by when they happened. The queries read only the columns that
`deploy/grafana/readonly-role.sql` grants.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# The macros as the queries spell them; Grafana expands the first two to quoted timestamps.
TIME_FROM = "$__timeFrom()"
TIME_TO = "$__timeTo()"
DEFAULT_TIMEZONE = "'${default_timezone}'"

# The replies that opt a contractor out, as the scheduler reads them: the whole reply, trimmed of
# white space and then of '.' and '!', in any case. A unit test keeps this list equal to the
# scheduler's.
OPT_OUT_WORDS = ("CANCEL", "END", "QUIT", "STOP", "STOPALL", "UNSUBSCRIBE")

_FROM = f"{TIME_FROM}::timestamptz"
_TO = f"{TIME_TO}::timestamptz"
_SENT_IN_RANGE = f"f.status = 'sent' AND f.sent_at >= {_FROM} AND f.sent_at < {_TO}"
_WAIT = "extract(epoch FROM f.response_received_at - f.sent_at)::double precision"
# The contractor's zone as the dispatcher takes it: a name PostgreSQL knows, else the default.
_ZONE = (
    "CASE WHEN c.timezone IN (SELECT name FROM pg_timezone_names) THEN c.timezone"
    f" ELSE {DEFAULT_TIMEZONE}::text END"
)
_WORDS = ", ".join(f"'{word}'" for word in OPT_OUT_WORDS)
_OPTED_OUT = (
    f"upper(btrim(regexp_replace(f.response_text, '^\\s+|\\s+$', '', 'g'), '.!')) IN ({_WORDS})"
)


@dataclass(frozen=True)
class Query:
    """One panel's query: `name` keys it in `followups stats --json`; `columns` are the columns it
    returns, in order (a `group` column is headed `group_heading`); `time_series` queries return a
    `time` column, the others a table."""

    name: str
    title: str
    description: str
    sql: str
    columns: tuple[str, ...]
    group_heading: str = ""
    time_series: bool = False


def _responses(group: str, *, join_contractor: bool = False) -> str:
    join = "JOIN contractors AS c ON c.id = f.contractor_id" if join_contractor else ""
    return f"""SELECT {group} AS "group",
       count(*) AS sent,
       count(f.response_received_at) AS responded,
       count(f.response_received_at)::double precision / count(*) AS response_rate,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY {_WAIT})
           FILTER (WHERE f.response_received_at IS NOT NULL) AS median_response_seconds
FROM contractor_followup_schedules AS f {join}
WHERE {_SENT_IN_RANGE}
GROUP BY 1
ORDER BY 1"""


_RESPONSE_FIGURES = ("group", "sent", "responded", "response_rate", "median_response_seconds")
_RESPONSE_COLUMNS = (
    "sent, responded (a reply was recorded on it), response rate, and the median time from the"
    " send to the reply"
)

RESPONSES = Query(
    "responses",
    "Responses",
    f"Every follow-up sent in the range: {_RESPONSE_COLUMNS}.",
    _responses("'all'::text"),
    columns=_RESPONSE_FIGURES,
    group_heading="all",
)
BY_TYPE = Query(
    "responses_by_type",
    "Responses by follow-up type",
    f"Per followup_type: {_RESPONSE_COLUMNS}.",
    _responses("f.followup_type"),
    columns=_RESPONSE_FIGURES,
    group_heading="follow-up type",
)
BY_TONE = Query(
    "responses_by_tone",
    "Responses by tone",
    f"Per message_tone: {_RESPONSE_COLUMNS}.",
    _responses("f.message_tone"),
    columns=_RESPONSE_FIGURES,
    group_heading="tone",
)
BY_PROMPT_VARIANT = Query(
    "responses_by_prompt_variant",
    "Responses by prompt variant",
    f"Per A/B prompt variant ('(none)': none, e.g. the template): {_RESPONSE_COLUMNS}.",
    _responses("coalesce(f.prompt_variant, '(none)')"),
    columns=_RESPONSE_FIGURES,
    group_heading="prompt variant",
)
BY_TEXT_SOURCE = Query(
    "responses_by_text_source",
    "Responses: AI text vs template",
    f"Per text source, 'ai' or 'template' (a fallback counts as template): {_RESPONSE_COLUMNS}.",
    _responses("coalesce(f.text_source, '(none)')"),
    columns=_RESPONSE_FIGURES,
    group_heading="text source",
)
BY_LOCAL_HOUR = Query(
    "responses_by_local_hour",
    "Responses by local hour of the send",
    "Per hour of the send on the contractor's clock (their timezone, else the default one):"
    f" {_RESPONSE_COLUMNS}.",
    _responses(f"to_char(f.sent_at AT TIME ZONE {_ZONE}, 'HH24')", join_contractor=True),
    columns=_RESPONSE_FIGURES,
    group_heading="local hour",
)

DELIVERY = Query(
    "delivery",
    "Delivery",
    "Follow-ups sent in the range and what the SMS provider reported on them: reported, delivered,"
    " undelivered, failed; the delivery rate is delivered over reported (a send without a report"
    " yet is not counted in it).",
    f"""SELECT count(*) AS sent,
       count(f.delivery_status) AS reported,
       count(*) FILTER (WHERE f.delivery_status = 'delivered') AS delivered,
       count(*) FILTER (WHERE f.delivery_status = 'undelivered') AS undelivered,
       count(*) FILTER (WHERE f.delivery_status = 'failed') AS failed,
       (count(*) FILTER (WHERE f.delivery_status = 'delivered'))::double precision
           / nullif(count(f.delivery_status), 0) AS delivery_rate
FROM contractor_followup_schedules AS f
WHERE {_SENT_IN_RANGE}""",
    columns=("sent", "reported", "delivered", "undelivered", "failed", "delivery_rate"),
)

ERROR_CODES = Query(
    "error_codes",
    "Error codes",
    "The provider's error codes on follow-ups reported undelivered or failed, and each one's share"
    " of those reports ('(none)': reported without a code).",
    f"""SELECT coalesce(f.delivery_error_code, '(none)') AS error_code,
       count(*) AS reports,
       count(*)::double precision / (sum(count(*)) OVER ())::double precision AS share
FROM contractor_followup_schedules AS f
WHERE {_SENT_IN_RANGE} AND f.delivery_status IN ('undelivered', 'failed')
GROUP BY 1
ORDER BY reports DESC, error_code""",
    columns=("error_code", "reports", "share"),
)

OPT_OUTS = Query(
    "opt_outs",
    "Opt-outs after a follow-up",
    "Per followup_type: follow-ups sent, those the contractor answered with an opt-out word (STOP,"
    " UNSUBSCRIBE, ...), and their share of the sends. A later reply replaces the recorded one, so"
    " a STOP followed by START on the same follow-up no longer counts.",
    f"""SELECT f.followup_type AS "group",
       count(*) AS sent,
       count(*) FILTER (WHERE {_OPTED_OUT}) AS opt_outs,
       (count(*) FILTER (WHERE {_OPTED_OUT}))::double precision / count(*) AS opt_out_rate
FROM contractor_followup_schedules AS f
WHERE {_SENT_IN_RANGE}
GROUP BY 1
ORDER BY 1""",
    columns=("group", "sent", "opt_outs", "opt_out_rate"),
    group_heading="follow-up type",
)


def _rate_at(moment: str) -> str:
    """The adaptive rate in force just before `moment`: the last change before it, else what the
    first change after it started from."""
    return f"""coalesce(
        (SELECT r.limit_per_minute FROM send_rate_changes AS r
         WHERE r.at < {moment} ORDER BY r.at DESC, r.id DESC LIMIT 1),
        (SELECT r.previous_limit FROM send_rate_changes AS r
         WHERE r.at >= {moment} ORDER BY r.at, r.id LIMIT 1))"""


SEND_RATE = Query(
    "send_rate",
    "Adaptive send rate",
    "The send limit per minute over the range: its value at the start, every change (halved on a"
    " throttling report or a 429, raised by one after a run of deliveries) and its value at the"
    " end. No point at all: it never changed, so it is the configured ceiling.",
    f"""SELECT points.time, points.limit_per_minute
FROM (
    SELECT {_FROM} AS time, 0 AS part, 0::bigint AS id, {_rate_at(_FROM)} AS limit_per_minute
    UNION ALL
    SELECT r.at, 1, r.id, r.limit_per_minute FROM send_rate_changes AS r
    WHERE r.at >= {_FROM} AND r.at < {_TO}
    UNION ALL
    SELECT least({_TO}, now()), 2, 0, {_rate_at(_TO)}
) AS points
WHERE points.limit_per_minute IS NOT NULL
ORDER BY points.time, points.part, points.id""",
    columns=("time", "limit_per_minute"),
    time_series=True,
)

QUERIES: tuple[Query, ...] = (
    RESPONSES,
    BY_TYPE,
    BY_TONE,
    BY_PROMPT_VARIANT,
    BY_TEXT_SOURCE,
    BY_LOCAL_HOUR,
    DELIVERY,
    ERROR_CODES,
    OPT_OUTS,
    SEND_RATE,
)

_MACRO = re.compile("|".join(re.escape(m) for m in (TIME_FROM, TIME_TO, DEFAULT_TIMEZONE)))


@dataclass(frozen=True)
class Window:
    """What a dashboard's time picker and variables give a query."""

    start: datetime
    end: datetime
    default_timezone: str


def bind(sql: str, window: Window) -> tuple[str, list[Any]]:
    """The query with each macro replaced by a positional parameter, and their values in order."""
    values = {
        TIME_FROM: window.start,
        TIME_TO: window.end,
        DEFAULT_TIMEZONE: window.default_timezone,
    }
    numbers: dict[str, int] = {}

    def parameter(match: re.Match[str]) -> str:
        macro = match.group(0)
        numbers.setdefault(macro, len(numbers) + 1)
        return f"${numbers[macro]}"

    bound = _MACRO.sub(parameter, sql)
    return bound, [values[macro] for macro in numbers]


async def run(pool: asyncpg.Pool, query: Query, window: Window) -> list[dict[str, Any]]:
    """One query's rows, as the dashboard's panel gets them."""
    sql, args = bind(query.sql, window)
    return [dict(record) for record in await pool.fetch(sql, *args)]


async def figures(
    pool: asyncpg.Pool, window: Window, queries: Sequence[Query] = QUERIES
) -> dict[str, list[dict[str, Any]]]:
    """Every query's rows, by name."""
    return {query.name: await run(pool, query, window) for query in queries}
