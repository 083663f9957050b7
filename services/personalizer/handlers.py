"""Personalizer decisions: when a follow-up's lead time comes, prepare and store its text."""

from __future__ import annotations

from dataclasses import dataclass

from shared.consumer import Incoming
from shared.logging import get_logger
from shared.schemas import Status, TimerKind, parse_timer
from shared.store import FollowupStore
from shared.templates import TemplateContext, TemplateError, render
from shared.timers import Clock, Timer, wait_until_due
from shared.topology import PERSONALIZER_DUE

log = get_logger("followups.personalizer")


@dataclass(frozen=True)
class PersonalizerDeps:
    store: FollowupStore
    timer: Timer
    clock: Clock


async def handle(incoming: Incoming, deps: PersonalizerDeps) -> None:
    due = parse_timer(incoming.body)
    if due.kind is not TimerKind.PERSONALIZE:
        log.warning("timer of another kind dropped", kind=due.kind, followup_id=due.followup_id)
        return
    if not await wait_until_due(
        deps.timer, PERSONALIZER_DUE.name, incoming.body, incoming.headers, deps.clock
    ):
        return
    bound = log.bind(followup_id=due.followup_id, stage="personalize")
    row = await deps.store.get(due.followup_id)
    if row is None or row.version != due.version or row.status is not Status.SCHEDULED:
        bound.info(
            "stale timer dropped",
            timer_version=due.version,
            row_version=row.version if row else None,
            status=row.status if row else "missing",
        )
        return
    context = await deps.store.context(row)
    if context is None:
        bound.warning("contractor missing; the dispatcher will fail this follow-up")
        return
    try:
        text = render(
            row.message_template,
            TemplateContext(context.contractor, context.action_item, context.event),
        )
    except TemplateError as exc:
        bound.warning("template cannot be rendered; the dispatcher will fail it", error=str(exc))
        return
    stored = await deps.store.store_text(
        row.id,
        row.version,
        text=text,
        source="template",
        fallback_reason=None,
        model=None,
        variant=None,
    )
    bound.info(
        "text prepared" if stored else "row moved on; text discarded",
        text_source="template",
        contractor_id=row.contractor_id,
    )
