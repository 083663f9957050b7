"""The settings of the project's queues that may change in operation, as RabbitMQ policies
(README: Queue policies), and the management API client that applies them.

A queue's x-arguments say what it is and can't change without deleting it; a policy can be
changed at any time and the broker applies it to the existing queue. So:

- work queues keep only `x-queue-type`; their delivery limit and dead-letter target (and the
  at-least-once dead-lettering that needs `overflow: reject-publish`) are a policy each;
- the dead-letter queues keep only `x-queue-type`; a policy caps them by length and age, oldest
  dropped first, since they hold message bodies with personal data;
- the timer queues keep their TTL and dead-letter target as x-arguments: those are the timer
  (shared.topology.timer_queue_arguments). Under a policy an operator could shorten a TTL (for
  `message-ttl` the broker takes the lower of policy and argument), and timers would fire early.
  A policy of ours matches them all the same, holding only what they already have, so that no
  broader policy of the vhost (a `.*` with `max-length` or `message-ttl`) reaches them: RabbitMQ
  applies one policy per queue, the one of highest priority.

Operator policies are a second layer the broker merges over these (the lower number wins for
limits); the project sets none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from shared.topology import (
    DEAD_LETTER_EXCHANGE,
    TIMER_LEVEL_PREFIX,
    TIMER_POSITIONS,
    TIMER_RADIX,
    WORK_QUEUES,
    WorkQueue,
    timer_queues,
)

DEFAULT_DELIVERY_LIMIT = 5
# A week of dead letters, at most ten thousand a queue: time to look at a failure after a
# weekend, and no older personal data than that in the broker.
DEFAULT_DLQ_MAX_LENGTH = 10_000
DEFAULT_DLQ_MAX_AGE_HOURS = 168.0
# Above any policy an operator is likely to have for the whole vhost: ours match only our
# queues by their exact names.
PRIORITY = 100
POLICY_PREFIX = "followups."
MANAGEMENT_PORT = 15672
TIMEOUT_SECONDS = 10.0

# What earlier releases declared as x-arguments on the work queues and is in their policy now.
# A queue that still has them was declared by such a release (shared.topology tolerates it).
MOVED_WORK_ARGUMENTS = frozenset(
    {
        "x-delivery-limit",
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
        "x-dead-letter-strategy",
        "x-overflow",
    }
)


@dataclass(frozen=True)
class QueueLimits:
    """The values the policies carry; from the settings (DELIVERY_LIMIT, DLQ_MAX_LENGTH,
    DLQ_MAX_AGE_HOURS)."""

    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    dlq_max_length: int = DEFAULT_DLQ_MAX_LENGTH
    dlq_max_age_hours: float = DEFAULT_DLQ_MAX_AGE_HOURS

    @property
    def dlq_max_age_ms(self) -> int:
        return round(self.dlq_max_age_hours * 3_600_000)


@dataclass(frozen=True)
class Policy:
    name: str
    pattern: str
    definition: dict[str, Any]
    priority: int = PRIORITY
    apply_to: str = "queues"  # every release: 3.x has no `quorum_queues`

    def matches(self, queue: str) -> bool:
        return re.search(self.pattern, queue) is not None

    def body(self) -> dict[str, Any]:
        """As the management API and a definitions file spell it."""
        return {
            "pattern": self.pattern,
            "apply-to": self.apply_to,
            "definition": self.definition,
            "priority": self.priority,
        }


def _exactly(*names: str) -> str:
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def work_queue_policy(work: WorkQueue, limits: QueueLimits) -> Policy:
    return Policy(
        work.name,
        _exactly(work.name),
        {
            "delivery-limit": limits.delivery_limit,
            "dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "dead-letter-routing-key": work.dead_letter_queue,
            # At-least-once: a message leaves the queue only once its DLQ has it; the broker
            # allows it only with reject-publish.
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        },
    )


def dead_letter_policy(limits: QueueLimits) -> Policy:
    return Policy(
        f"{POLICY_PREFIX}dead-letters",
        _exactly(*(work.dead_letter_queue for work in WORK_QUEUES)),
        {
            "max-length": limits.dlq_max_length,
            "message-ttl": limits.dlq_max_age_ms,
            # A full DLQ drops its oldest letter, never refuses a new one: a refusal would hold
            # the message in its work queue (at-least-once) or fail the consumer's own copy.
            "overflow": "drop-head",
        },
    )


def timer_policy() -> Policy:
    digits = "".join(f"{digit:x}" for digit in range(1, TIMER_RADIX))
    return Policy(
        f"{POLICY_PREFIX}timers",
        f"^{re.escape(TIMER_LEVEL_PREFIX)}[0-{TIMER_POSITIONS - 1}]\\.[{digits}]$",
        {"overflow": "reject-publish"},
    )


def policies(limits: QueueLimits) -> list[Policy]:
    return [
        *(work_queue_policy(work, limits) for work in WORK_QUEUES),
        dead_letter_policy(limits),
        timer_policy(),
    ]


def policy_for(queue: str, limits: QueueLimits) -> Policy | None:
    return next((p for p in policies(limits) if p.matches(queue)), None)


def management_url(amqp_url: str, explicit: str | None = None) -> str:
    """RABBITMQ_MANAGEMENT_URL, else the AMQP URL's host and credentials on port 15672."""
    if explicit:
        return explicit.rstrip("/")
    parts = urlsplit(amqp_url)
    user = parts.username or "guest"
    password = parts.password or "guest"
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if parts.scheme == "amqps" else "http"
    return urlunsplit((scheme, f"{user}:{password}@{host}:{MANAGEMENT_PORT}", "", "", ""))


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names (`/` when its path is empty)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


class ManagementError(Exception):
    """The management API refused or could not be reached; the message says what to do."""


class Management:
    """The few calls of the RabbitMQ management HTTP API this project makes, for one vhost."""

    def __init__(self, url: str, vhost: str) -> None:
        parts = urlsplit(url)
        self.shown = redact(url)
        self.vhost = vhost
        netloc = parts.netloc.rsplit("@", 1)[-1]
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        auth = (unquote(parts.username or ""), unquote(parts.password or ""))
        self._client = httpx.AsyncClient(base_url=f"{base}/api", auth=auth, timeout=TIMEOUT_SECONDS)

    @classmethod
    def from_settings(cls, amqp_url: str, explicit: str | None = None) -> Management:
        return cls(management_url(amqp_url, explicit), vhost_of(amqp_url))

    async def __aenter__(self) -> Management:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.aclose()

    def _path(self, kind: str, name: str = "") -> str:
        path = f"/{kind}/{quote(self.vhost, safe='')}"
        return f"{path}/{quote(name, safe='')}" if name else path

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ManagementError(
                f"the management API at {self.shown} did not answer "
                f"({exc.__class__.__name__}); enable it (rabbitmq-plugins enable "
                "rabbitmq_management) or set RABBITMQ_MANAGEMENT_URL"
            ) from exc
        if response.status_code == 404 and method == "GET":
            return None
        if response.status_code in (401, 403):
            raise ManagementError(
                f"the management API at {self.shown} refused the user "
                f"({response.status_code}): it needs the `policymaker` tag (or `administrator`)"
                " and access to the vhost; set RABBITMQ_MANAGEMENT_URL"
            )
        if response.status_code >= 400:
            raise ManagementError(
                f"{method} {path} answered {response.status_code}: {response.text[:300]}"
            )
        return response.json() if response.content else None

    async def put_policy(self, policy: Policy) -> None:
        await self._call("PUT", self._path("policies", policy.name), policy.body())

    async def delete_policy(self, name: str) -> None:
        await self._call("DELETE", self._path("policies", name))

    async def policies(self) -> list[dict[str, Any]]:
        return list(await self._call("GET", self._path("policies")) or [])

    async def queue(self, name: str) -> dict[str, Any] | None:
        found = await self._call("GET", self._path("queues", name))
        return dict(found) if found is not None else None

    async def bindings(self, queue: str) -> list[dict[str, Any]]:
        found = await self._call("GET", f"{self._path('queues', queue)}/bindings")
        return list(found or [])


def _applies_to_queues(policy: Mapping[str, Any]) -> bool:
    return policy.get("apply-to") in ("queues", "all", "classic_queues", "quorum_queues")


def shadowing(
    ours: Iterable[Policy], existing: Iterable[Mapping[str, Any]], queues: Iterable[str]
) -> list[str]:
    """What keeps one of our policies off our queues: another policy of the vhost that matches
    them with a priority at least ours (RabbitMQ applies one per queue, the highest)."""
    ours = list(ours)
    names = {p.name for p in ours}
    others = [o for o in existing if o["name"] not in names and _applies_to_queues(o)]
    hits: dict[tuple[str, str], list[str]] = {}
    for queue in queues:
        mine = next((p for p in ours if p.matches(queue)), None)
        if mine is None:
            continue
        for other in others:
            try:
                hit = re.search(str(other["pattern"]), queue) is not None
            except re.error:
                continue
            if hit and int(other.get("priority", 0)) >= mine.priority:
                hits.setdefault((str(other["name"]), mine.name), []).append(queue)
    return [
        f"policy {other!r} matches {len(shadowed)} queue(s) of policy {mine!r} ({shadowed[0]}"
        f"{', ...' if len(shadowed) > 1 else ''}) at a priority at least {PRIORITY}, and the "
        f"broker may apply it instead: lower its priority or keep followups.* out of its pattern"
        for (other, mine), shadowed in hits.items()
    ]


def moved_arguments(arguments: Mapping[str, Any]) -> list[str]:
    """The x-arguments of a work queue declared by an earlier release that its policy holds
    now (they override the policy, or clash with it, until the queue is moved)."""
    return sorted(MOVED_WORK_ARGUMENTS & arguments.keys())


async def apply_policies(management: Management, limits: QueueLimits) -> list[str]:
    """Put every policy (idempotent: PUT replaces a policy of the same name in place) and
    return what could keep them from applying."""
    ours = policies(limits)
    for policy in ours:
        await management.put_policy(policy)
    queues = [name for work in WORK_QUEUES for name in (work.name, work.dead_letter_queue)]
    return shadowing(ours, await management.policies(), [*queues, *timer_queues()])
