"""Personalizer decisions: when a follow-up's lead time comes, skip it if its action item is
done, else prepare its text (the LLM's when asked and fit to send, else the template), store it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from zoneinfo import ZoneInfo

from services.personalizer.guard import check
from services.personalizer.llm import TextWriter
from services.personalizer.prompt import PromptInput, build_prompt
from services.personalizer.variants import VariantPlan
from shared.bus import Publisher
from shared.calendar import zone_for
from shared.consumer import Incoming
from shared.events import announce
from shared.logging import get_logger
from shared.metrics import MESSAGES, TEXT_SOURCE
from shared.pipeline import series_plan
from shared.schemas import Status, TimerKind, parse_timer
from shared.store import Context, Followup, FollowupStore
from shared.templates import TemplateContext, TemplateError, render
from shared.timers import Clock, Timer, wait_until_due
from shared.topology import PERSONALIZER_DUE

log = get_logger("followups.personalizer")

# The LLM gets at most this share of the time left before the send, and never more than
# LLM_MAX_BUDGET, so even a model that never answers leaves the template stored well ahead.
LLM_SHARE = 0.5
LLM_MAX_BUDGET = timedelta(seconds=20)
LLM_MIN_BUDGET = timedelta(milliseconds=200)


@dataclass(frozen=True)
class PersonalizerDeps:
    store: FollowupStore
    timer: Timer
    publisher: Publisher
    clock: Clock
    writer: TextWriter | None  # None: no OPENAI_API_KEY, AI is off
    variants: VariantPlan
    personalize_lead: timedelta
    dispatch_margin: timedelta
    default_zone: ZoneInfo


@dataclass(frozen=True)
class Text:
    text: str
    source: str  # 'ai' or 'template'
    fallback_reason: str | None
    model: str | None
    variant: str | None


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
        MESSAGES.labels("personalizer", "stale").inc()
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
    zone, _ = zone_for(context.contractor.get("timezone"), deps.default_zone)
    if row.skip_if_completed and (context.action_item or {}).get("status") == "completed":
        await _skip(row, zone, deps)
        return
    try:
        rendered = render(
            row.message_template,
            TemplateContext(context.contractor, context.action_item, context.event),
        )
    except TemplateError as exc:
        bound.warning("template cannot be rendered; the dispatcher will fail it", error=str(exc))
        return
    prepared = await _prepare(row, context, rendered, zone, deps)
    stored = await deps.store.store_text(
        row.id,
        row.version,
        text=prepared.text,
        source=prepared.source,
        fallback_reason=prepared.fallback_reason,
        model=prepared.model,
        variant=prepared.variant,
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
    row: Followup, context: Context, rendered: str, zone: ZoneInfo, deps: PersonalizerDeps
) -> Text:
    if not row.ai_should_personalize:
        return Text(rendered, "template", None, None, None)
    if deps.writer is None:
        return Text(rendered, "template", "ai_disabled", None, None)
    variant = deps.variants.assign(row.contractor_id, row.followup_type)
    budget = min(LLM_MAX_BUDGET, (row.scheduled_time - deps.clock()) * LLM_SHARE)
    if budget < LLM_MIN_BUDGET:
        return Text(rendered, "template", "no_time", None, variant.name)
    prompt = build_prompt(
        PromptInput(
            tone=row.message_tone,
            intent=rendered,
            contractor=context.contractor,
            action_item=context.action_item,
            event=context.event,
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
    ended, following = await deps.store.finish(
        row, Status.SKIPPED, stage="personalizer", reason=reason, next_occurrence=plan
    )
    if ended is None:
        return
    MESSAGES.labels("personalizer", "skipped").inc()
    log.info(
        "follow-up skipped", followup_id=row.id, contractor_id=row.contractor_id, reason=reason
    )
    await announce(
        deps.publisher,
        "followup.skipped",
        ended,
        deps.clock,
        reason=reason,
        next_occurrence_id=ended.next_occurrence_id,
    )
    if following is not None and following.status is Status.SCHEDULED:
        await announce(deps.publisher, "followup.scheduled", following, deps.clock)
