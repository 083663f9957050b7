"""The dispatcher's send protocol against the real database: one owner per claim, cancels and
reschedules that come during a call, "sent" recorded whatever the broker does, and the order in
which waiting follow-ups get places in the global send window."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest

from services.dispatcher import send_window, statements
from services.dispatcher.gateway import Gateway, GatewayResult, Outcome, SmsRequest
from services.dispatcher.handlers import DispatcherDeps, handle
from services.dispatcher.repository import DispatchRepository, GiveUp, Retry, Settlement
from services.dispatcher.sweep import SweepQueries, sweep_once
from shared.consumer import Incoming
from shared.db import CONNECTION_ERRORS
from shared.locks import SEND_WINDOW
from shared.rows import Reference
from shared.schemas import Status, TimerKind, TimerMessage
from shared.timers import LevelsTimer
from shared.topology import DISPATCHER_DUE
from tests.support.data import add_contractor, miscounted_seconds, send_window_waiter
from tests.support.migrations import installed_body, newest_definition

LEASE = timedelta(seconds=30)
MARGIN = timedelta(milliseconds=250)


class RecordingTimer(LevelsTimer):
    """Records every timer instead of publishing it; `failing` makes the broker refuse."""

    def __init__(self) -> None:
        super().__init__(publisher=None)  # type: ignore[arg-type]
        self.armed: list[tuple[str, dict, datetime]] = []
        self.failing = False

    async def arm(self, destination, message, fire_at, **_options) -> int:
        if self.failing:
            raise ConnectionError("broker refused the publish")
        self.armed.append((destination, json.loads(message), fire_at))
        return 0

    def for_row(self, followup_id: int) -> list[dict]:
        return [m for _, m, _ in self.armed if m["followup_id"] == followup_id]


class NullPublisher:
    async def publish(self, body, *, exchange, routing_key, headers=None, mandatory=True, **_):
        return None


class ScriptedGateway(Gateway):
    """Answers each call with the next outcome; `during_call` runs while the call is under way."""

    sent_by = "dispatcher"

    def __init__(self, *outcomes: GatewayResult) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[SmsRequest] = []
        self.during_call = None

    async def send(self, request: SmsRequest) -> GatewayResult:
        self.calls.append(request)
        if self.during_call is not None:
            await self.during_call()
        return self.outcomes.pop(0) if self.outcomes else GatewayResult(Outcome.SENT, "ok", 200)


def accepted() -> GatewayResult:
    return GatewayResult(Outcome.SENT, "ok", 200)


def unavailable() -> GatewayResult:
    return GatewayResult(Outcome.RETRY, "http_503", 503)


@pytest.fixture
def timer() -> RecordingTimer:
    return RecordingTimer()


@pytest.fixture
def repository(pool, store) -> DispatchRepository:
    return DispatchRepository(pool)


def make_deps(repository, timer, gateway, *, limit: int = 1000, concurrency: int = 5):
    return DispatcherDeps(
        repository=repository,
        timer=timer,
        publisher=NullPublisher(),
        gateway=gateway,
        clock=lambda: datetime.now(UTC),
        rate_limit_per_minute=limit,
        max_attempts=3,
        lease=LEASE,
        personalize_lead=timedelta(seconds=60),
        quiet_hours=None,
        default_zone=ZoneInfo("America/New_York"),
        margin=MARGIN,
        calls_in_flight=asyncio.Semaphore(concurrency),
    )


async def add_due(
    pool,
    contractor: int,
    *,
    due: datetime | None = None,
    priority: int = 0,
    recurring: bool = False,
    key: str,
) -> int:
    followup_id: int = await pool.fetchval(
        """INSERT INTO contractor_followup_schedules
               (contractor_id, scheduled_time, followup_type, message_template, idempotency_key,
                priority, is_recurring, recurrence_interval_days, series_id)
           VALUES ($1, $2, 'check_in', 'Hi {first_name}', $3, $4, $5,
                   CASE WHEN $5 THEN 7 END, NULL)
           RETURNING id""",
        contractor,
        due or datetime.now(UTC) - timedelta(milliseconds=10),
        f"key:{key}",
        priority,
        recurring,
    )
    if recurring:
        await pool.execute(
            "UPDATE contractor_followup_schedules SET series_id = id WHERE id = $1", followup_id
        )
    return followup_id


def timer_for(followup_id: int, version: int = 1) -> Incoming:
    message = TimerMessage(
        kind=TimerKind.DISPATCH,
        followup_id=followup_id,
        version=version,
        fire_at=datetime.now(UTC),
        attempt=1,
    )
    return Incoming(message.model_dump_json().encode(), DISPATCHER_DUE.name)


async def row(pool, followup_id: int):
    return await pool.fetchrow(
        "SELECT * FROM contractor_followup_schedules WHERE id = $1", followup_id
    )


async def transitions(pool, followup_id: int) -> list:
    return await pool.fetch(
        "SELECT * FROM followup_transitions WHERE followup_id = $1 ORDER BY id", followup_id
    )


def record_accepted(repository, claim, call_id: int, post_lateness: timedelta = timedelta(0)):
    """The gateway accepted the call: record it sent, nothing to follow."""
    return repository.mark_sent(
        claim,
        call_id=call_id,
        post_lateness=post_lateness,
        http_status=200,
        sent_by="dispatcher",
        note=None,
        text_fallback_reason=None,
        next_occurrence=None,
    )


# ---- one owner per claim ---------------------------------------------------------------------


async def test_a_claim_taken_over_leaves_its_old_owner_unable_to_change_anything(pool, repository):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="owner")
    first, _ = await repository.claim(followup_id, 1, timedelta(milliseconds=200), MARGIN)
    await asyncio.sleep(0.3)
    second, _ = await repository.claim(followup_id, 1, LEASE, MARGIN)
    assert first.claim_id != second.claim_id
    assert (await repository.start_call(first, limit_per_minute=100, lease=LEASE)).lost
    at = datetime.now(UTC) + timedelta(seconds=5)
    assert not await repository.release_for_retry(first, next_attempt_at=at, error="x")
    ended = await repository.end(
        first, Status.FAILED, reason="x", plan=None, claim_id=first.claim_id
    )
    assert (ended.row, ended.following) == (None, None)
    assert not await repository.renew(first, LEASE)
    slot = await repository.start_call(second, limit_per_minute=100, lease=LEASE)
    assert slot.call_id is not None
    sent = await record_accepted(repository, first, slot.call_id)
    assert sent.row is None, "only the current owner records the send"
    assert (await row(pool, followup_id))["status"] == "sending"


async def test_a_live_claim_is_taken_back_only_by_its_own_claim_id(pool, repository):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="resume")
    first, _ = await repository.claim(followup_id, 1, LEASE, MARGIN)
    assert await repository.claim(followup_id, 1, LEASE, MARGIN, resume=uuid4()) is None
    again, _ = await repository.claim(followup_id, 1, LEASE, MARGIN, resume=first.claim_id)
    assert again.claim_id != first.claim_id
    assert (again.attempts, again.send_key) == (first.attempts, first.send_key), (
        "no call was started: the same attempt, under the same Idempotency-Key"
    )
    assert (await repository.start_call(first, limit_per_minute=100, lease=LEASE)).lost
    assert (await transitions(pool, followup_id))[-1]["detail"] == {
        "attempt": 1,
        "takeover": True,
        "resumed": True,
    }
    await repository.start_call(again, limit_per_minute=100, lease=LEASE)
    called, _ = await repository.claim(followup_id, 1, LEASE, MARGIN, resume=again.claim_id)
    assert called.attempts == again.attempts + 1, "a call may have gone out: a new attempt"


async def test_claims_made_together_go_in_one_transaction_and_each_row_to_one_claimant(
    pool, repository
):
    contractor = await add_contractor(pool)
    ids = [await add_due(pool, contractor, key=f"together-{n}") for n in range(5)]
    stale = await add_due(pool, contractor, key="together-stale")
    asked = [*ids, ids[0], stale]
    versions = [1] * len(ids) + [1, 2]  # the stale timer names a version never stored
    answers = await asyncio.gather(
        *(
            repository.claim(followup_id, version, LEASE, MARGIN)
            for followup_id, version in zip(asked, versions, strict=True)
        )
    )
    claimed = [answer[0] for answer in answers[: len(ids)]]
    assert [row.id for row in claimed] == ids
    assert answers[len(ids) :] == [None, None], "the duplicate and the stale timer get nothing"
    assert len({row.claim_id for row in claimed}) == len(ids)
    assert all(answer[1] is not None for answer in answers[: len(ids)]), "with the contractor"
    started = {r["updated_at"] for r in [await row(pool, i) for i in ids]}
    assert len(started) == 1, "one statement: the same transaction's time on every row"
    for followup_id in ids:
        assert [(t["from_status"], t["to_status"]) for t in await transitions(pool, followup_id)][
            -1:
        ] == [("scheduled", "sending")]
    assert (await row(pool, stale))["status"] == "scheduled"


async def test_a_row_locked_elsewhere_does_not_hold_up_the_claims_batched_with_it(pool, repository):
    contractor = await add_contractor(pool)
    held, free = [await add_due(pool, contractor, key=f"locked-{n}") for n in range(2)]
    async with pool.acquire() as other:
        locking = other.transaction()
        await locking.start()
        await other.execute(
            "SELECT 1 FROM contractor_followup_schedules WHERE id = $1 FOR UPDATE", held
        )
        waiting = asyncio.create_task(repository.claim(held, 1, LEASE, MARGIN))
        claimed, _ = await asyncio.wait_for(repository.claim(free, 1, LEASE, MARGIN), 5)
        assert claimed.id == free
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the locked row is claimed alone, once its lock is let go"
        await locking.rollback()
    later, _ = await asyncio.wait_for(waiting, 5)
    assert later.id == held
    assert [t["to_status"] for t in await transitions(pool, held)][-1:] == ["sending"]


async def test_a_cancel_committed_while_a_claim_waits_for_company_wins(pool, store, repository):
    contractor = await add_contractor(pool)
    cancelled, other = [await add_due(pool, contractor, key=f"linger-{n}") for n in range(2)]
    waiting = asyncio.create_task(repository.claim(cancelled, 1, LEASE, MARGIN, linger=60))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await store.cancel(Reference(followup_id=cancelled), "customer called")
    # a claim that may not wait starts the batch, the waiting one in it
    claimed, _ = await asyncio.wait_for(repository.claim(other, 1, LEASE, MARGIN), 5)
    assert claimed.id == other
    assert await asyncio.wait_for(waiting, 5) is None
    assert (await row(pool, cancelled))["status"] == "cancelled"


async def test_claims_made_together_still_take_back_only_their_own_claims(pool, repository):
    contractor = await add_contractor(pool)
    held, live = [await add_due(pool, contractor, key=f"back-{n}") for n in range(2)]
    held_claim, _ = await repository.claim(held, 1, LEASE, MARGIN)
    await repository.claim(live, 1, LEASE, MARGIN)
    back, stolen = await asyncio.gather(
        repository.claim(held, 1, LEASE, MARGIN, resume=held_claim.claim_id),
        repository.claim(live, 1, LEASE, MARGIN, resume=held_claim.claim_id),
    )
    assert back is not None
    assert back[0].attempts == held_claim.attempts
    assert stolen is None, "a claim id names one row's claim only"


async def test_sends_recorded_together_are_each_recorded_only_by_their_own_claim(pool, repository):
    contractor = await add_contractor(pool)
    ids = [await add_due(pool, contractor, key=f"recorded-{n}") for n in range(3)]
    claims = [(await repository.claim(i, 1, LEASE, MARGIN))[0] for i in ids]
    slots = [await repository.start_call(c, limit_per_minute=100, lease=LEASE) for c in claims]
    await pool.execute(
        "UPDATE contractor_followup_schedules SET claim_id = gen_random_uuid() WHERE id = $1",
        ids[2],
    )
    outcomes = await asyncio.gather(
        *(
            record_accepted(repository, claim, slot.call_id)
            for claim, slot in zip(claims, slots, strict=True)
        )
    )
    assert [o.row.status if o.row else None for o in outcomes] == [Status.SENT, Status.SENT, None]
    assert [(await row(pool, i))["status"] for i in ids] == ["sent", "sent", "sending"]
    for followup_id in ids[:2]:
        assert (await transitions(pool, followup_id))[-1]["to_status"] == "sent"


async def _terminate_when_waiting_for_the_window(pool) -> None:
    while True:
        pid = await send_window_waiter(pool)
        if pid is not None:
            await pool.execute("SELECT pg_terminate_backend($1)", pid)
            return
        await asyncio.sleep(0.01)


async def test_a_connection_lost_while_starting_the_call_does_not_wait_out_the_lease(
    pool, repository, timer
):
    """The database ends the dispatcher's connection while the call's start waits for the send
    window. Run again, the delivery takes its own claim back and sends at once; before, it found
    the row held under a live lease and armed a wake for the lease's end."""
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="lost-start")
    gateway = ScriptedGateway()
    deps = make_deps(repository, timer, gateway)
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", *SEND_WINDOW)
        try:
            run = asyncio.create_task(handle(timer_for(followup_id), deps))
            await _terminate_when_waiting_for_the_window(pool)
            with pytest.raises(CONNECTION_ERRORS):
                await run
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1, $2)", *SEND_WINDOW)
    await handle(dataclasses.replace(timer_for(followup_id), redelivered=True), deps)
    assert len(gateway.calls) == 1
    assert (await row(pool, followup_id))["status"] == "sent"
    assert timer.for_row(followup_id) == [], "no wake armed for the lease's end"


async def test_the_lease_starts_again_when_the_call_really_starts(pool, repository):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="lease")
    claimed, _ = await repository.claim(followup_id, 1, timedelta(seconds=1), MARGIN)
    await asyncio.sleep(0.6)
    assert await repository.renew(claimed, timedelta(seconds=1))
    await asyncio.sleep(0.6)
    # Without the renewal the lease would have run out by now and the row be taken over.
    assert await repository.claim(followup_id, 1, LEASE, MARGIN) is None
    await repository.start_call(claimed, limit_per_minute=100, lease=LEASE)
    current = await row(pool, followup_id)
    assert current["lease_until"] - current["calling_since"] == LEASE


async def test_claimants_queued_behind_slow_calls_keep_their_claim(pool, repository, timer):
    """One call place, calls that take longer than a third of the lease: the queued follow-ups
    renew their lease while they wait, and a takeover attempt finds each still owned."""
    contractor = await add_contractor(pool)
    ids = [await add_due(pool, contractor, key=f"queued-{i}") for i in range(4)]
    gateway = ScriptedGateway()

    async def slow_call() -> None:
        await asyncio.sleep(0.5)

    gateway.during_call = slow_call
    deps = dataclasses.replace(
        make_deps(repository, timer, gateway, concurrency=1), lease=timedelta(seconds=0.9)
    )

    async def take_over_attempts() -> int:
        taken = 0
        for _ in range(10):
            await asyncio.sleep(0.2)
            for followup_id in ids:
                taken += await repository.claim(followup_id, 1, LEASE, MARGIN) is not None
        return taken

    *_, taken = await asyncio.gather(
        *(handle(timer_for(i), deps) for i in ids), take_over_attempts()
    )
    assert taken == 0
    assert len(gateway.calls) == 4
    rows = [await row(pool, i) for i in ids]
    assert {(r["status"], r["attempts"]) for r in rows} == {("sent", 1)}
    takeovers = await pool.fetchval(
        "SELECT count(*) FROM followup_transitions WHERE detail->>'takeover' = 'true'"
    )
    assert takeovers == 0


# ---- a cancel or reschedule during the call --------------------------------------------------


@pytest.mark.parametrize("recurring", [False, True])
async def test_a_cancel_during_a_failed_call_wins_over_the_retry(
    pool, store, repository, timer, recurring
):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="cancel-503", recurring=recurring)
    gateway = ScriptedGateway(unavailable())
    kept: list = []

    async def cancel_now() -> None:
        kept.extend(await store.cancel(Reference(followup_id=followup_id), "customer called"))

    gateway.during_call = cancel_now
    await handle(timer_for(followup_id), make_deps(repository, timer, gateway))
    assert [r.status for r in kept] == [Status.SENDING], "kept while the call was under way"
    assert len(gateway.calls) == 1
    ended = await row(pool, followup_id)
    assert ended["status"] == "cancelled"
    assert ended["status_reason"] == "customer called"
    assert ended["version"] == 2
    assert ended["next_occurrence_id"] is None
    assert timer.for_row(followup_id) == [], "no retry was armed"
    assert await pool.fetchval("SELECT count(*) FROM contractor_followup_schedules") == 1
    call = await pool.fetchrow("SELECT outcome, http_status FROM webhook_calls")
    assert (call["outcome"], call["http_status"]) == ("retry", 503)


async def test_a_reschedule_during_a_failed_call_moves_the_followup_instead_of_retrying(
    pool, store, repository, timer
):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="move-503")
    gateway = ScriptedGateway(unavailable())
    new_time = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)

    async def reschedule_now() -> None:
        kept = await store.reschedule(Reference(followup_id=followup_id), new_time)
        assert kept is not None
        # Still sending: the scheduler arms only a `scheduled` row, so nothing is armed now.
        assert kept.status is Status.SENDING

    gateway.during_call = reschedule_now
    await handle(timer_for(followup_id), make_deps(repository, timer, gateway))
    moved = await row(pool, followup_id)
    assert (moved["status"], moved["scheduled_time"], moved["version"]) == (
        "scheduled",
        new_time,
        2,
    )
    assert moved["reschedule_to"] is None
    armed = timer.for_row(followup_id)
    assert [(m["kind"], m["version"]) for m in armed] == [("dispatch", 2)], "only the new time"


@pytest.mark.parametrize("recurring", [False, True])
async def test_a_cancel_during_an_accepted_call_is_recorded_as_too_late(
    pool, store, repository, timer, recurring
):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="cancel-200", recurring=recurring)
    gateway = ScriptedGateway(accepted())

    async def cancel_now() -> None:
        await store.cancel(Reference(followup_id=followup_id), "too slow")

    gateway.during_call = cancel_now
    await handle(timer_for(followup_id), make_deps(repository, timer, gateway))
    sent = await row(pool, followup_id)
    assert (sent["status"], sent["status_reason"]) == ("sent", "cancel_too_late")
    assert sent["cancel_reason"] == "too slow"
    assert sent["next_occurrence_id"] is None, "the cancel still ends the series"
    late = [t for t in await transitions(pool, followup_id) if t["detail"].get("too_late")]
    assert [t["detail"]["cancel_requested"] for t in late] == ["too slow"]


async def test_a_cancel_kept_for_a_dead_dispatcher_wins_at_the_takeover(pool, store, repository):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="dead")
    claimed, _ = await repository.claim(followup_id, 1, LEASE, MARGIN)
    await repository.start_call(claimed, limit_per_minute=100, lease=timedelta(milliseconds=100))
    await store.cancel(Reference(followup_id=followup_id), "customer called")
    await asyncio.sleep(0.2)
    timer, gateway = RecordingTimer(), ScriptedGateway()
    await handle(timer_for(followup_id), make_deps(repository, timer, gateway))
    assert gateway.calls == []
    assert (await row(pool, followup_id))["status"] == "cancelled"


async def test_a_cancel_racing_the_decision_after_a_failed_call_is_never_lost(
    pool, store, repository
):
    contractor = await add_contractor(pool)
    for attempt in range(20):
        followup_id = await add_due(pool, contractor, key=f"race-{attempt}")
        claimed, _ = await repository.claim(followup_id, 1, LEASE, MARGIN)
        slot = await repository.start_call(claimed, limit_per_minute=1000, lease=LEASE)
        at = datetime.now(UTC) + timedelta(seconds=30)
        settle = repository.settle_unsent(
            claimed,
            call_id=slot.call_id,
            outcome="retry",
            http_status=503,
            then=Retry(at, "http_503"),
        )
        settled, _ = await asyncio.gather(
            settle, store.cancel(Reference(followup_id=followup_id), "race")
        )
        assert settled.kind in (Settlement.RETRY, Settlement.CANCELLED)
        assert (await row(pool, followup_id))["status"] == "cancelled"


async def test_an_opt_out_during_a_call_is_kept_like_a_cancel(pool, store, repository):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="stop")
    claimed, _ = await repository.claim(followup_id, 1, LEASE, MARGIN)
    slot = await repository.start_call(claimed, limit_per_minute=1000, lease=LEASE)
    await store.record_response(
        contractor_id=contractor,
        phone_digits=None,
        followup_id=None,
        text="STOP",
        received_at=datetime.now(UTC),
        opt_out=True,
    )

    settled = await repository.settle_unsent(
        claimed,
        call_id=slot.call_id,
        outcome="retry",
        http_status=503,
        then=GiveUp("http_503", None),
    )
    assert settled.kind is Settlement.CANCELLED
    assert (await row(pool, followup_id))["status_reason"] == "opted_out"


# ---- "sent" never depends on the broker ------------------------------------------------------


async def test_sent_is_recorded_when_the_broker_refuses_the_next_occurrence_and_the_sweep_arms_it(
    pool, store, repository, timer
):
    contractor = await add_contractor(pool)
    followup_id = await add_due(pool, contractor, key="series", recurring=True)
    gateway = ScriptedGateway(accepted())

    async def broker_goes_down() -> None:
        timer.failing = True

    gateway.during_call = broker_goes_down
    deps = make_deps(repository, timer, gateway)
    await handle(timer_for(followup_id), deps)
    sent = await row(pool, followup_id)
    assert sent["status"] == "sent"
    assert len(gateway.calls) == 1
    following = await row(pool, sent["next_occurrence_id"])
    assert following["status"] == "scheduled"
    assert timer.armed == []
    # Its redelivery (the handler is run again) changes nothing and calls nobody.
    timer.failing = False
    await handle(timer_for(followup_id), deps)
    assert len(gateway.calls) == 1
    # A week later its timer is overdue: the repair sweep arms it.
    await pool.execute(
        "UPDATE contractor_followup_schedules SET scheduled_time = now() - interval '1 minute'"
        " WHERE id = $1",
        following["id"],
    )
    report = await sweep_once(
        SweepQueries(pool),
        timer,
        lambda: datetime.now(UTC),
        timedelta(seconds=1),
        timedelta(seconds=60),
    )
    assert report.dispatch_rearmed == 1
    assert [m["kind"] for m in timer.for_row(following["id"])] == ["dispatch"]


# ---- the order of places in the send window --------------------------------------------------


async def fill_window(pool, contractor: int, frees_in: list[float]) -> None:
    """Calls made earlier, so that their places free up `frees_in` seconds from now."""
    filler = await add_due(pool, contractor, key="filler", due=datetime.now(UTC))
    for seconds in frees_in:
        await pool.execute(
            """INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
               VALUES ($1, gen_random_uuid(), 1,
                       clock_timestamp() - $2::interval + $3::interval)""",
            filler,
            send_window.WINDOW,
            timedelta(seconds=seconds),
        )


async def test_each_waiting_followup_gets_its_own_place_in_priority_then_due_order(
    pool, repository
):
    contractor = await add_contractor(pool)
    limit = 3
    await fill_window(pool, contractor, [10, 20, 30])
    now = datetime.now(UTC)
    # (priority, seconds overdue): ranked 9; 5 due first; 5; 1; 0 due first; 0
    wanted = [(0, 1), (5, 2), (9, 0), (1, 0), (0, 3), (5, 5)]
    ids = {}
    for n, (priority, overdue) in enumerate(wanted):
        due = now - timedelta(seconds=overdue)
        ids[(priority, overdue)] = await add_due(
            pool, contractor, key=f"wait-{n}", priority=priority, due=due
        )
    claims = {k: (await repository.claim(i, 1, LEASE, MARGIN))[0] for k, i in ids.items()}
    # Ask in the worst order, lowest rank first: each later one jumps the queue.
    order = [(0, 1), (0, 3), (1, 0), (5, 2), (5, 5), (9, 0)]
    for key in order:
        slot = await repository.start_call(claims[key], limit_per_minute=limit, lease=LEASE)
        assert slot.call_id is None
    # Asked again, each now knows everyone waiting ahead of it: its own place, in rank order.
    places = {}
    for key in order:
        slot = await repository.start_call(claims[key], limit_per_minute=limit, lease=LEASE)
        places[key] = slot.frees_at
    ranked = sorted(places, key=lambda k: (-k[0], -k[1]))
    assert ranked == [(9, 0), (5, 5), (5, 2), (1, 0), (0, 3), (0, 1)]
    times = [places[k] for k in ranked]
    assert times == sorted(times)
    assert len(set(times)) == len(times), "one follow-up per place"
    window = send_window.WINDOW.total_seconds()
    offsets = [
        round((t - now).total_seconds() - window * (i // limit)) for i, t in enumerate(times)
    ]
    assert offsets == [10, 20, 30, 10, 20, 30], "every place, and each window's places again"


async def test_a_free_place_goes_to_the_waiter_ahead_that_is_due_now(pool, repository):
    contractor = await add_contractor(pool)
    await fill_window(pool, contractor, [20])  # limit 2: one free place now
    first = await add_due(pool, contractor, key="ahead", priority=9)
    behind = await add_due(pool, contractor, key="behind", priority=1)
    ahead_claim, _ = await repository.claim(first, 1, LEASE, MARGIN)
    behind_claim, _ = await repository.claim(behind, 1, LEASE, MARGIN)
    # The one ahead already waits for this instant (its place was given to it earlier).
    await pool.execute(
        "UPDATE contractor_followup_schedules SET waiting_since = now(), next_attempt_at = now()"
        " WHERE id = $1",
        first,
    )
    deferred = await repository.start_call(behind_claim, limit_per_minute=2, lease=LEASE)
    assert deferred.call_id is None
    taken = await repository.start_call(ahead_claim, limit_per_minute=2, lease=LEASE)
    assert taken.call_id is not None
    # A waiter whose time passed long ago is gone and does not hold the place up.
    await pool.execute(
        "UPDATE contractor_followup_schedules SET next_attempt_at = now() - interval '1 minute',"
        " calling_since = NULL, waiting_since = now(), status = 'scheduled' WHERE id = $1",
        first,
    )
    await pool.execute("DELETE FROM webhook_calls WHERE followup_id = $1", first)
    assert (await repository.start_call(behind_claim, limit_per_minute=2, lease=LEASE)).call_id


async def test_calls_started_together_take_their_places_in_the_windows_order(pool, repository):
    """Asked in the worst order within one batch, the places still go by priority, then due
    time, as they would to the same calls one after another."""
    contractor = await add_contractor(pool)
    now = datetime.now(UTC)
    ranked = [(9, 0), (5, 2), (5, 1), (0, 3)]  # (priority, seconds overdue), best first
    ids = {
        key: await add_due(
            pool, contractor, key=f"turn-{n}", priority=key[0], due=now - timedelta(seconds=key[1])
        )
        for n, key in enumerate(ranked)
    }
    claims = {key: (await repository.claim(i, 1, LEASE, MARGIN))[0] for key, i in ids.items()}
    asked = list(reversed(ranked))
    slots = await asyncio.gather(
        *(repository.start_call(claims[key], limit_per_minute=2, lease=LEASE) for key in asked)
    )
    got = dict(zip(asked, slots, strict=True))
    assert [got[key].call_id is not None for key in ranked] == [True, True, False, False]
    waits = [got[key].frees_at for key in ranked[2:]]
    assert waits == sorted(waits)
    assert len(set(waits)) == 2, "one follow-up per place"
    calls = await pool.fetch("SELECT followup_id FROM webhook_calls ORDER BY called_at, id")
    assert [c["followup_id"] for c in calls] == [ids[(9, 0)], ids[(5, 2)]]
    assert await miscounted_seconds(pool) == []


async def test_a_call_started_with_a_lost_claim_in_its_batch_is_not_held_up(pool, repository):
    contractor = await add_contractor(pool)
    lost, kept = [await add_due(pool, contractor, key=f"lost-{n}") for n in range(2)]
    lost_claim, _ = await repository.claim(lost, 1, LEASE, MARGIN)
    kept_claim, _ = await repository.claim(kept, 1, LEASE, MARGIN)
    await pool.execute(
        "UPDATE contractor_followup_schedules SET claim_id = gen_random_uuid() WHERE id = $1",
        lost,
    )
    lost_slot, kept_slot = await asyncio.gather(
        repository.start_call(lost_claim, limit_per_minute=100, lease=LEASE),
        repository.start_call(kept_claim, limit_per_minute=100, lease=LEASE),
    )
    assert (lost_slot.lost, kept_slot.lost) == (True, False)
    assert kept_slot.call_id is not None


async def test_the_per_second_counts_follow_every_call_written_moved_and_deleted(pool):
    contractor = await add_contractor(pool)
    filler = await add_due(pool, contractor, key="counted", due=datetime.now(UTC))
    await pool.execute(
        """INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
           SELECT $1, gen_random_uuid(), 1, clock_timestamp() - random() * interval '90 seconds'
           FROM generate_series(1, 3000)""",
        filler,
    )
    await pool.execute(
        "UPDATE webhook_calls SET called_at = called_at - random() * interval '30 seconds'"
        " WHERE id % 3 = 0"
    )
    await pool.execute("DELETE FROM webhook_calls WHERE id % 5 = 0")
    assert await miscounted_seconds(pool) == []


async def test_a_call_in_the_second_the_window_starts_in_holds_its_place_until_it_leaves(
    pool, repository
):
    """The second the window starts in is counted from the calls themselves, not its count."""
    contractor = await add_contractor(pool)
    await fill_window(pool, contractor, [0.4])  # frees 0.4 s from now: still in the window
    behind = await add_due(pool, contractor, key="edge")
    claim, _ = await repository.claim(behind, 1, LEASE, MARGIN)
    held = await repository.start_call(claim, limit_per_minute=1, lease=LEASE)
    assert held.call_id is None
    await asyncio.sleep(0.5)
    assert (await repository.start_call(claim, limit_per_minute=1, lease=LEASE)).call_id


# ---- a call's start taken ahead of its instant --------------------------------------------------


async def start_one_call(pool, repository, key: str, due: datetime | None = None):
    """A follow-up due at `due` (by default, already due), claimed and its call started: its
    id, the claim and the call's slot."""
    followup_id = await add_due(pool, await add_contractor(pool), key=key, due=due)
    claimed, _ = await repository.claim(followup_id, 1, LEASE, MARGIN)
    slot = await repository.start_call(claimed, limit_per_minute=100, lease=LEASE)
    assert slot.call_id is not None
    return followup_id, claimed, slot


async def test_a_start_taken_ahead_records_the_call_at_its_scheduled_time(pool, repository):
    due = datetime.now(UTC) + timedelta(milliseconds=200)
    followup_id, _, slot = await start_one_call(pool, repository, "ahead", due)
    started = await row(pool, followup_id)
    called_at = await pool.fetchval(
        "SELECT called_at FROM webhook_calls WHERE id = $1", slot.call_id
    )
    assert called_at == started["webhook_started_at"] == due
    assert started["lateness_ms"] == 0
    assert started["calling_since"] < due, "calling from the start on: a cancel is now too late"
    assert started["lease_until"] - started["calling_since"] == LEASE


async def test_a_start_taken_after_its_time_records_the_call_at_its_start(pool, repository):
    followup_id, _, slot = await start_one_call(pool, repository, "behind")
    started = await row(pool, followup_id)
    called_at = await pool.fetchval(
        "SELECT called_at FROM webhook_calls WHERE id = $1", slot.call_id
    )
    assert called_at == started["webhook_started_at"] == started["calling_since"]
    assert started["lateness_ms"] > 0


async def test_a_post_later_than_its_start_taken_ahead_records_the_posts_lateness(pool, repository):
    due = datetime.now(UTC) + timedelta(milliseconds=200)
    followup_id, claimed, slot = await start_one_call(pool, repository, "post-late", due)
    recorded = await record_accepted(repository, claimed, slot.call_id, timedelta(milliseconds=12))
    assert recorded.row.lateness_ms == pytest.approx(12.0)
    sent = await row(pool, followup_id)
    assert sent["lateness_ms"] == pytest.approx(12.0)
    assert sent["webhook_started_at"] == due, "the window's record stays at the instant"
    [*_, logged] = await transitions(pool, followup_id)
    assert logged["detail"]["lateness_ms"] == pytest.approx(12.0)


async def test_a_start_later_than_its_post_keeps_the_starts_lateness(pool, repository):
    followup_id, claimed, slot = await start_one_call(pool, repository, "start-late")
    started = (await row(pool, followup_id))["lateness_ms"]
    recorded = await record_accepted(repository, claimed, slot.call_id, timedelta(0))
    assert recorded.row.lateness_ms == started > 0


async def test_a_dispatcher_of_the_release_before_records_its_sends_as_it_did(pool, repository):
    """During a rolling update a dispatcher started before the POST's lateness was recorded
    calls the function without it."""
    followup_id, claimed, slot = await start_one_call(pool, repository, "older-release")
    started = (await row(pool, followup_id))["lateness_ms"]
    recorded = await pool.fetchval(
        "SELECT count(*) FROM followups_mark_sent($1, $2, $3, $4, $5, $6, $7)",
        [followup_id],
        ["dispatcher"],
        [None],
        [None],
        [200],
        [slot.call_id],
        [claimed.claim_id],
    )
    assert recorded == 1
    sent = await row(pool, followup_id)
    assert (sent["status"], sent["lateness_ms"]) == ("sent", started)


async def test_a_call_recorded_at_a_later_instant_holds_its_place_for_a_start_after_it(
    pool, repository
):
    """Starts taken ahead are recorded at their instants, which may come after the instant of a
    start taken later: the window counts those too, so no minute holds more than the limit."""
    contractor = await add_contractor(pool)
    ahead_due = datetime.now(UTC) + timedelta(milliseconds=200)
    ahead = await add_due(pool, contractor, key="later-instant", due=ahead_due)
    overdue = await add_due(pool, contractor, key="earlier-instant")
    ahead_claim, _ = await repository.claim(ahead, 1, LEASE, MARGIN)
    overdue_claim, _ = await repository.claim(overdue, 1, LEASE, MARGIN)
    assert (await repository.start_call(ahead_claim, limit_per_minute=1, lease=LEASE)).call_id
    held = await repository.start_call(overdue_claim, limit_per_minute=1, lease=LEASE)
    assert held.call_id is None
    assert held.frees_at == ahead_due + send_window.WINDOW


async def test_a_cancel_after_a_start_taken_ahead_is_too_late_and_the_call_waits_for_its_time(
    pool, store, repository, timer
):
    contractor = await add_contractor(pool)
    due = datetime.now(UTC) + timedelta(milliseconds=200)
    followup_id = await add_due(pool, contractor, key="cancel-ahead", due=due)
    received: list[datetime] = []

    class Cancelling(DispatchRepository):
        async def start_call(self, row, *, limit_per_minute, lease):
            slot = await super().start_call(row, limit_per_minute=limit_per_minute, lease=lease)
            await store.cancel(Reference(followup_id=followup_id), "after the start")
            return slot

    class Stamping(ScriptedGateway):
        async def send(self, request: SmsRequest) -> GatewayResult:
            received.append(await pool.fetchval("SELECT clock_timestamp()"))
            return await super().send(request)

    deps = dataclasses.replace(
        make_deps(Cancelling(pool), timer, Stamping()), call_lead=timedelta(milliseconds=150)
    )
    await handle(timer_for(followup_id), deps)
    sent = await row(pool, followup_id)
    assert (sent["status"], sent["status_reason"]) == ("sent", "cancel_too_late")
    assert sent["cancel_reason"] == "after the start"
    [call] = received
    assert call >= due, "started ahead, called at its time by the database's clock"


# ---- the window's function is the module's -----------------------------------------------------


def test_the_migration_installs_the_send_window_module_function():
    assert send_window.FUNCTION_SQL in newest_definition("followups_start_call")


async def test_the_database_runs_the_module_function(pool):
    body = send_window.FUNCTION_SQL.split("$$")[1]
    assert await installed_body(pool, "followups_start_call") == body


BATCH_FUNCTIONS = [
    ("followups_start_calls_in_turn", send_window.BATCH_FUNCTION_SQL),
    ("followups_claim", statements.CLAIM_FUNCTION_SQL),
    ("followups_mark_sent", statements.MARK_SENT_FUNCTION_SQL),
]


@pytest.mark.parametrize(("function", "text"), BATCH_FUNCTIONS)
def test_the_migration_installs_each_batch_function_of_the_modules(function, text):
    assert text in newest_definition(function)


@pytest.mark.parametrize(("function", "text"), BATCH_FUNCTIONS)
async def test_the_database_runs_each_batch_function_of_the_modules(pool, function, text):
    assert await installed_body(pool, function) == text.split("$$")[1]


async def test_the_batch_functions_keep_one_plan_for_any_batch(pool):
    """Planned for each call, a statement over arrays cost more than the claim itself."""
    settings = await pool.fetch(
        "SELECT proname, proconfig FROM pg_proc WHERE proname = ANY($1::text[])",
        ["followups_claim", "followups_mark_sent"],
    )
    assert {s["proname"]: s["proconfig"] for s in settings} == {
        "followups_claim": ["plan_cache_mode=force_generic_plan"],
        "followups_mark_sent": ["plan_cache_mode=force_generic_plan"],
    }
