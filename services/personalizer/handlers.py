"""Personalizer decisions: when a follow-up's lead time comes, skip it if its action item is
done, else prepare its text (the LLM's when asked and fit to send, else the template), store it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from zoneinfo import ZoneInfo

from services.personalizer.guard import check
from services.personalizer.llm import TextWriter
from services.personalizer.prompt import PromptInput, build_prompt
from services.personalizer.repository import PersonalizerStore, PreparedText, Text
from services.personalizer.variants import VariantPlan
from shared.batching import linger_for
from shared.bus import Publisher
from shared.consumer import Incoming
from shared.logging import get_logger
from shared.metrics import MESSAGES, TEXT_SOURCE
from shared.occurrences import (
    action_item_done,
    contractor_zone,
    end_occurrence,
    is_stale,
    render_template,
)
from shared.pipeline import series_plan
from shared.rows import Followup, SendContext
from shared.schemas import Status, TimerKind, parse_timer
from shared.templates import TemplateError
from shared.timers import Clock, Timer, wait_until_due
from shared.topology import PERSONALIZER_DUE

log = get_logger("followups.personalizer")

# The LLM gets at most this share of the time left before the send, and never more than
# LLM_MAX_BUDGET, so even a model that never answers leaves the template stored well ahead.
LLM_SHARE = 0.5
LLM_MAX_BUDGET = timedelta(seconds=20)
LLM_MIN_BUDGET = timedelta(milliseconds=200)
# A read with seconds before the send may wait this long for others to join it; the text's
# write waits less, as its delivery is held meanwhile and the next timer waits for its place.
READ_LINGER_SECONDS = 0.2
STORE_LINGER_SECONDS = 0.05


@dataclass(frozen=True)
class PersonalizerDeps:
    store: PersonalizerStore
    timer: Timer
    publisher: Publisher
    clock: Clock
    writer: TextWriter | None  # None: no OPENAI_API_KEY, AI is off
    variants: VariantPlan
    personalize_lead: timedelta
    dispatch_margin: timedelta
    default_zone: ZoneInfo


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
    # The timer fires a lead ahead of the send (or sooner), and the text is wanted by then.
    spare = due.fire_at + deps.personalize_lead - deps.dispatch_margin - deps.clock()
    found = await deps.store.with_context(
        due.followup_id, linger=linger_for(spare, READ_LINGER_SECONDS)
    )
    row, context = found if found is not None else (None, None)
    if row is None or is_stale(row, due, Status.SCHEDULED):
        MESSAGES.labels("personalizer", "stale").inc()
        bound.info(
            "stale timer dropped",
            timer_version=due.version,
            row_version=row.version if row else None,
            status=row.status if row else "missing",
        )
        return
    if context is None:
        bound.warning("contractor missing; the dispatcher will fail this follow-up")
        return
    zone, _ = contractor_zone(context, deps.default_zone)
    if action_item_done(row, context):
        await _skip(row, zone, deps)
        return
    try:
        rendered = render_template(row, context)
    except TemplateError as exc:
        bound.warning("template cannot be rendered; the dispatcher will fail it", error=str(exc))
        return
    prepared = await _prepare(row, context, rendered, zone, deps)
    stored = await deps.store.store_text(
        PreparedText(row.id, row.version, prepared),
        linger=linger_for(
            row.scheduled_time - deps.dispatch_margin - deps.clock(), STORE_LINGER_SECONDS
        ),
    )
    TEXT_SOURCE.labels(prepared.source, prepared.fallback_reason or "none").inc()
    MESSAGES.labels("personalizer", "prepared" if stored else "discarded").inc()
    bound.info(
        "text prepared" if stored else "row moved on; text discarded",
        contractor_id=row.contractor_id,
        text_source=prepared.source,
        fallback_reason=prepared.fallback_reason,
        prompt_variant=prepared.variant,
    )


async def _prepare(
    row: Followup, context: SendContext, rendered: str, zone: ZoneInfo, deps: PersonalizerDeps
) -> Text:
    if not row.ai_should_personalize:
        return Text(rendered, "template", None, None, None)
    if deps.writer is None:
        return Text(rendered, "template", "ai_disabled", None, None)
    variant = deps.variants.assign(row.contractor_id, row.followup_type)
    budget = min(LLM_MAX_BUDGET, (row.scheduled_time - deps.clock()) * LLM_SHARE)
    if budget < LLM_MIN_BUDGET:
        return Text(rendered, "template", "no_time", None, variant.name)
    rows = context.template_context()
    prompt = build_prompt(
        PromptInput(
            tone=row.message_tone,
            intent=rendered,
            contractor=rows.contractor,
            action_item=rows.action_item,
            event=rows.event,
            hints=row.ai_context_hints,
            zone=zone,
        ),
        variant,
    )
    draft = await deps.writer.write(prompt, budget.total_seconds())
    if draft.text is None:
        reason = draft.failure or "empty"
    else:
        verdict = check(draft.text, rendered)
        if verdict.ok:
            return Text(verdict.text, "ai", None, draft.model, variant.name)
        reason = f"guard_{verdict.rule}"
    log.info(
        "LLM text not used; the template goes out",
        followup_id=row.id,
        reason=reason,
        attempts=draft.attempts,
        model=draft.model,
    )
    return Text(rendered, "template", reason, draft.model, variant.name)


async def _skip(row: Followup, zone: ZoneInfo, deps: PersonalizerDeps) -> None:
    """The action item is done: no reason to write (or send) this follow-up. The dispatcher checks
    again at send time, for an item completed after this point."""
    plan = series_plan(
        row, zone, deps.timer, deps.personalize_lead, deps.dispatch_margin, deps.clock()
    )
    reason = "action_item_completed"

    async def _skipped(ended: Followup) -> None:
        MESSAGES.labels("personalizer", "skipped").inc()
        log.info(
            "follow-up skipped", followup_id=row.id, contractor_id=row.contractor_id, reason=reason
        )

    await end_occurrence(
        deps.store,
        row,
        Status.SKIPPED,
        reason=reason,
        plan=plan,
        publisher=deps.publisher,
        clock=deps.clock,
        on_ended=_skipped,
    )
