"""The dispatcher's handler carrying out its decisions, on a fake record that implements the
repository's Protocol with a constructor of its own, a fake gateway and a recording publisher
(no broker, no database)."""

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, time, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from services.dispatcher.gateway import Gateway, GatewayResult, Outcome, SmsRequest
from services.dispatcher.handlers import DispatcherDeps, handle
from services.dispatcher.ports import DispatchStore, GiveUp, Retry, Sent, Settled, Settlement
from services.dispatcher.send_window import CallSlot
from services.dispatcher.settle import RECORD_LINGER_SECONDS
from shared.consumer import Incoming
from shared.metrics import MESSAGES
from shared.occurrences import Ending
from shared.rows import Contractor, Followup, SendContext
from shared.schemas import Status, TimerKind, TimerMessage
from shared.settings import QuietHours
from shared.timers import LevelsTimer
from shared.topology import DEAD_LETTER_EXCHANGE, DISPATCHER_DUE, PUBLIC_EXCHANGE
from tests.support.data import followup_row

NOW = datetime(2026, 11, 28, 17, 0, tzinfo=UTC)  # noon in New York
CLAIM = UUID("00000000-0000-0000-0000-00000000c1a1")


def _row(**changes) -> Followup:
    defaults = {
        "scheduled_time": NOW,
        "followup_type": "w9_reminder",
        "message_template": "Hi {first_name}",
        "send_key": "00000000-0000-0000-0000-000000000009",
        "claim_id": CLAIM,
    }
    return followup_row(**{**defaults, **changes})


def _context(**contractor) -> SendContext:
    person = Contractor(1, "Ana", "Diaz", "Diaz Roofing", "+12125550100", None, False)
    return SendContext(dataclasses.replace(person, **contractor), None, None)


class FakeRecord(DispatchStore):
    """Hands out one claimed row and records what the handler asked of it."""

    def __init__(self, row: Followup, context: SendContext | None) -> None:
        super().__init__()
        self.row = row
        self.context = context
        self.calls: list[tuple[str, dict]] = []
        self.claim_lingers: list[float] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    async def claim(self, followup_id, version, lease, early, *, resume=None, linger=0.0):
        self.claim_lingers.append(linger)
        return self.row, self.context

    async def start_call(self, row, *, limit_per_minute, lease):
        return CallSlot(call_id=1, frees_at=None)

    async def release_for_retry(self, row, **kwargs):
        self.calls.append(("release_for_retry", kwargs))
        return True

    async def pause_gateway(self, until, reason, *, policy, followup_id):
        self.calls.append(("pause_gateway", {"until": until, "reason": reason}))

    async def end(self, row, status, *, reason, plan, claim_id=None):
        self.calls.append(("end", {"status": status, "reason": reason, "claim_id": claim_id}))
        return Ending(dataclasses.replace(row, status=status, status_reason=reason))

    async def mark_sent(self, row, **kwargs):
        self.calls.append(("mark_sent", kwargs))
        return Sent(dataclasses.replace(row, status=Status.SENT), None, None)

    async def settle_unsent(self, row, *, call_id, outcome, http_status, then):
        self.calls.append(("settle_unsent", {"then": then, "outcome": outcome}))
        if isinstance(then, Retry):
            return Settled(Settlement.RETRY, row)
        failed = dataclasses.replace(row, status=Status.FAILED, status_reason=then.reason)
        return Settled(Settlement.FAILED, failed)


class FakeGateway(Gateway):
    sent_by = "dispatcher"

    def __init__(self, result: GatewayResult) -> None:
        self.result = result
        self.requests: list[SmsRequest] = []

    async def send(self, request: SmsRequest) -> GatewayResult:
        self.requests.append(request)
        return self.result


# Not an exchange: where a fake record writes its commits among the publishes, in order.
RECORD_MARK = "(record)"


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes]] = []

    async def publish(
        self, body, *, exchange, routing_key, headers=None, priority=None, mandatory=True
    ):
        self.published.append((exchange, routing_key, body))

    def events(self) -> list[str]:
        return [key for exchange, key, _ in self.published if exchange == PUBLIC_EXCHANGE]

    def dead_letters(self) -> list[str]:
        return [key for exchange, key, _ in self.published if exchange == DEAD_LETTER_EXCHANGE]

    def timers(self) -> list[dict]:
        skip = (PUBLIC_EXCHANGE, DEAD_LETTER_EXCHANGE, RECORD_MARK)
        return [json.loads(body) for exchange, _, body in self.published if exchange not in skip]


def _deps(record, gateway, publisher, *, quiet_hours=None) -> DispatcherDeps:
    return DispatcherDeps(
        repository=record,
        timer=LevelsTimer(publisher, lambda: NOW),
        publisher=publisher,
        gateway=gateway,
        clock=lambda: NOW,
        rate_limit_per_minute=100,
        max_attempts=3,
        lease=timedelta(seconds=30),
        personalize_lead=timedelta(seconds=60),
        quiet_hours=quiet_hours,
        default_zone=ZoneInfo("America/New_York"),
        margin=timedelta(milliseconds=250),
        calls_in_flight=asyncio.Semaphore(2),
    )


def _due(fire_at: datetime = NOW) -> Incoming:
    message = TimerMessage(kind=TimerKind.DISPATCH, followup_id=9, version=1, fire_at=fire_at)
    return Incoming(message.model_dump_json().encode(), DISPATCHER_DUE.name)


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


async def test_a_sent_follow_up_is_recorded_and_announced(publisher):
    record = FakeRecord(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(_due(), _deps(record, gateway, publisher))
    assert [r.message for r in gateway.requests] == ["Hi Ana"]
    assert record.names() == ["mark_sent"]
    assert publisher.events() == ["followup.sent"]


async def test_a_claim_with_its_margin_ahead_may_wait_for_company_and_a_late_one_may_not(
    publisher,
):
    record = FakeRecord(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(_due(), _deps(record, gateway, publisher))
    await handle(_due(NOW - timedelta(seconds=1)), _deps(record, gateway, publisher))
    # a tenth of the 250 ms margin, then nothing
    assert record.claim_lingers == [pytest.approx(0.025), 0.0]


async def test_a_send_is_recorded_after_waiting_a_little_for_company(publisher):
    record = FakeRecord(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(_due(), _deps(record, gateway, publisher))
    [(name, recorded)] = record.calls
    assert (name, recorded["linger"]) == ("mark_sent", RECORD_LINGER_SECONDS)


async def test_a_lost_database_connection_while_recording_the_call_runs_only_the_record_again(
    publisher,
):
    class Flaky(FakeRecord):
        async def mark_sent(self, row, **kwargs):
            if "mark_sent" not in self.names():
                self.calls.append(("mark_sent", kwargs))
                raise ConnectionResetError("connection to the database lost")
            return await super().mark_sent(row, **kwargs)

    record = Flaky(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(_due(), _deps(record, gateway, publisher))
    assert len(gateway.requests) == 1, "the call is not made again"
    assert record.names() == ["mark_sent", "mark_sent"]
    assert publisher.events() == ["followup.sent"]


async def test_an_event_that_fails_after_the_record_is_left_to_the_redelivery(publisher):
    """Run again, the committed write would find its claim gone and announce nothing; raised,
    the message runs again and its redelivered timer announces the send."""

    class Refusing(FakePublisher):
        async def publish(self, body, *, exchange, **kwargs):
            if exchange == PUBLIC_EXCHANGE:
                raise ConnectionResetError("connection to the broker lost")
            await super().publish(body, exchange=exchange, **kwargs)

    record = FakeRecord(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    with pytest.raises(ConnectionResetError):
        await handle(_due(), _deps(record, gateway, Refusing()))
    assert record.names() == ["mark_sent"]


class LosesConnectionOnce(FakeRecord):
    """The database connection goes down during the first start of the call; every claim asks
    to take back the claim named by `resume`."""

    def __init__(self, row: Followup, context: SendContext | None) -> None:
        super().__init__(row, context)
        self.resumes: list[UUID | None] = []

    async def claim(self, followup_id, version, lease, early, *, resume=None, linger=0.0):
        self.resumes.append(resume)
        return self.row, self.context

    async def start_call(self, row, *, limit_per_minute, lease):
        if len(self.resumes) == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
        return await super().start_call(row, limit_per_minute=limit_per_minute, lease=lease)


async def test_a_claim_let_go_by_a_lost_connection_is_taken_back_by_the_next_run(publisher):
    record = LosesConnectionOnce(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    deps = _deps(record, gateway, publisher)
    taken_back = MESSAGES.labels("dispatcher", "claim_taken_back")._value.get()
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await handle(_due(), deps)
    await handle(dataclasses.replace(_due(), redelivered=True), deps)
    assert record.resumes == [None, CLAIM]
    assert len(gateway.requests) == 1
    assert publisher.events() == ["followup.sent"]
    assert len(deps.resumable) == 0, "a claim is taken back once"
    assert MESSAGES.labels("dispatcher", "claim_taken_back")._value.get() == taken_back + 1


async def test_a_claim_whose_run_ended_is_not_kept_for_taking_back(publisher):
    record = LosesConnectionOnce(_row(), _context())
    record.resumes.append(None)  # the first start of the call succeeds
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    deps = _deps(record, gateway, publisher)
    await handle(_due(), deps)
    await handle(_due(), deps)
    assert record.resumes == [None, None, None]


async def test_the_call_place_is_free_again_while_the_outcome_is_recorded(publisher):
    places = asyncio.Semaphore(1)
    free_while_recording: list[bool] = []

    class Recording(FakeRecord):
        async def mark_sent(self, row, **kwargs):
            free_while_recording.append(not places.locked())
            return await super().mark_sent(row, **kwargs)

    record = Recording(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    deps = dataclasses.replace(_deps(record, gateway, publisher), calls_in_flight=places)
    await handle(_due(), deps)
    assert free_while_recording == [True]
    assert publisher.events() == ["followup.sent"]


async def test_the_call_is_started_its_lead_ahead_and_made_at_its_instant_never_before(publisher):
    loop = asyncio.get_running_loop()
    began = loop.time()

    def clock() -> datetime:
        return NOW + timedelta(seconds=loop.time() - began)

    due = NOW + timedelta(milliseconds=600)
    lead = timedelta(milliseconds=500)
    started: list[datetime] = []
    called: list[datetime] = []

    class Starting(FakeRecord):
        async def start_call(self, row, *, limit_per_minute, lease):
            started.append(clock())
            return await super().start_call(row, limit_per_minute=limit_per_minute, lease=lease)

    class Calling(FakeGateway):
        async def send(self, request: SmsRequest) -> GatewayResult:
            called.append(clock())
            return await super().send(request)

    record = Starting(_row(scheduled_time=due), _context())
    gateway = Calling(GatewayResult(Outcome.SENT, "http_200", 200))
    deps = dataclasses.replace(_deps(record, gateway, publisher), clock=clock, call_lead=lead)
    await handle(_due(due - deps.margin), deps)
    [start], [call] = started, called
    assert due - lead <= start < due
    assert call >= due
    [(name, recorded)] = record.calls
    assert name == "mark_sent"
    assert timedelta(0) <= recorded["post_lateness"] <= call - due, "the POST's own lateness"


async def test_an_opted_out_contractor_is_skipped_without_a_call(publisher):
    record = FakeRecord(_row(), _context(sms_opt_out=True))
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(_due(), _deps(record, gateway, publisher))
    assert gateway.requests == []
    assert record.calls == [
        ("end", {"status": Status.SKIPPED, "reason": "opted_out", "claim_id": CLAIM})
    ]
    assert publisher.events() == ["followup.skipped"]
    assert publisher.dead_letters() == []


async def test_quiet_hours_move_the_send_and_arm_its_timer(publisher):
    record = FakeRecord(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    all_day = QuietHours(time(0, 0), time(23, 59))
    await handle(_due(), _deps(record, gateway, publisher, quiet_hours=all_day))
    assert gateway.requests == []
    [(name, released)] = record.calls
    assert name == "release_for_retry"
    assert released["count_attempt"] is False
    assert released["deferred_reason"] == "quiet_hours 00:00-23:59 in America/New_York"
    assert [t["kind"] for t in publisher.timers()] == ["dispatch"]


class Ordered(FakeRecord):
    """Writes the release into the publisher's own record, so a test sees what came first."""

    def __init__(self, row, context, publisher, *, slot=None, released=True) -> None:
        super().__init__(row, context)
        self.publisher = publisher
        self.slot = slot or CallSlot(call_id=1, frees_at=None)
        self.released = released

    async def start_call(self, row, *, limit_per_minute, lease):
        return self.slot

    async def release_for_retry(self, row, **kwargs):
        await super().release_for_retry(row, **kwargs)
        self.publisher.published.append((RECORD_MARK, "release_for_retry", b"{}"))
        return self.released


def _order(publisher: FakePublisher) -> list[str]:
    return [
        "release" if exchange == RECORD_MARK else "arm"
        for exchange, _, _ in publisher.published
        if exchange != PUBLIC_EXCHANGE
    ]


async def test_a_full_send_window_releases_the_row_before_arming_its_wake(publisher):
    # A wake due at once is delivered within milliseconds: had it been armed first, it would
    # find the row still claimed and wait out the lease.
    full = CallSlot(call_id=None, frees_at=NOW)
    record = Ordered(_row(), _context(), publisher, slot=full)
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(_due(), _deps(record, gateway, publisher))
    assert gateway.requests == []
    assert _order(publisher) == ["release", "arm"]
    [(_, released)] = record.calls
    assert released["waiting"] is True
    assert released["next_attempt_at"] == NOW


async def test_quiet_hours_release_the_row_before_arming_its_wake(publisher):
    record = Ordered(_row(), _context(), publisher)
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    all_day = QuietHours(time(0, 0), time(23, 59))
    await handle(_due(), _deps(record, gateway, publisher, quiet_hours=all_day))
    assert _order(publisher) == ["release", "arm"]


async def test_no_wake_is_armed_for_a_row_lost_while_it_was_released(publisher):
    full = CallSlot(call_id=None, frees_at=NOW + timedelta(seconds=20))
    record = Ordered(_row(), _context(), publisher, slot=full, released=False)
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(_due(), _deps(record, gateway, publisher))
    assert _order(publisher) == ["release"]
    assert publisher.events() == []


class SettledFirst(FakeRecord):
    """Writes the settlement's commit into the publisher's own record; `moved_to` plays a
    reschedule kept during the call."""

    def __init__(self, row, context, publisher, *, moved_to=None) -> None:
        super().__init__(row, context)
        self.publisher = publisher
        self.moved_to = moved_to

    async def settle_unsent(self, row, **kwargs):
        settled = await super().settle_unsent(row, **kwargs)
        self.publisher.published.append((RECORD_MARK, "release_for_retry", b"{}"))
        if self.moved_to is None:
            return settled
        moved = dataclasses.replace(
            row, status=Status.SCHEDULED, version=row.version + 1, scheduled_time=self.moved_to
        )
        return Settled(Settlement.RESCHEDULED, moved)


async def test_a_retry_is_armed_once_the_row_is_released_for_it(publisher):
    # Armed before the commit, a timer due at once would find the row still claimed.
    record = SettledFirst(_row(), _context(), publisher)
    gateway = FakeGateway(GatewayResult(Outcome.RETRY, "http_503", 503))
    await handle(_due(), _deps(record, gateway, publisher))
    assert _order(publisher) == ["release", "arm"]
    assert [t["attempt"] for t in publisher.timers()] == [2]


async def test_a_reschedule_kept_during_a_failed_call_is_armed_once_the_move_is_committed(
    publisher,
):
    record = SettledFirst(_row(), _context(), publisher, moved_to=NOW)
    gateway = FakeGateway(GatewayResult(Outcome.RETRY, "http_503", 503))
    await handle(_due(), _deps(record, gateway, publisher))
    order = _order(publisher)
    assert order[0] == "release"
    assert set(order[1:]) == {"arm"}
    timers = publisher.timers()
    assert timers, "the new time has its timers"
    assert {t["version"] for t in timers} == {2}
    assert publisher.events() == ["followup.scheduled"]


async def test_a_429_pauses_the_fleet_and_retries(publisher):
    record = FakeRecord(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.RETRY, "http_429", 429, retry_after=5.0))
    await handle(_due(), _deps(record, gateway, publisher))
    assert record.names() == ["pause_gateway", "settle_unsent"]
    assert record.calls[0][1]["until"] == NOW + timedelta(seconds=5)
    assert isinstance(record.calls[1][1]["then"], Retry)
    assert [t["attempt"] for t in publisher.timers()] == [2]
    assert publisher.events() == []


async def test_a_permanent_refusal_fails_and_dead_letters_the_timer(publisher):
    record = FakeRecord(_row(), _context())
    gateway = FakeGateway(GatewayResult(Outcome.FAILED, "http_400", 400))
    await handle(_due(), _deps(record, gateway, publisher))
    then = record.calls[-1][1]["then"]
    assert isinstance(then, GiveUp)
    assert then.reason == "http_400"
    assert publisher.dead_letters() == [DISPATCHER_DUE.dead_letter_queue]
    assert publisher.events() == ["followup.failed"]


class AlreadySent(FakeRecord):
    """The row this timer was for is sent already: the claim finds nothing to take."""

    async def claim(self, followup_id, version, lease, early, *, resume=None, linger=0.0):
        return None

    async def get(self, followup_id):
        return self.row


def _redelivered(version: int = 1, kind: TimerKind = TimerKind.DISPATCH) -> Incoming:
    message = TimerMessage(kind=kind, followup_id=9, version=version, fire_at=NOW)
    return Incoming(message.model_dump_json().encode(), DISPATCHER_DUE.name, redelivered=True)


async def test_a_redelivered_timer_of_its_own_sent_follow_up_announces_it_again(publisher):
    record = AlreadySent(_row(status=Status.SENT, lateness_ms=3.5), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(_redelivered(), _deps(record, gateway, publisher))
    assert gateway.requests == []
    assert record.calls == []
    assert publisher.events() == ["followup.sent"]


@pytest.mark.parametrize(
    ("incoming", "row_version"),
    [
        pytest.param(_due(), 1, id="a first delivery: a duplicate timer"),
        pytest.param(_redelivered(version=1), 2, id="a timer of an earlier version"),
    ],
)
async def test_other_timers_of_a_sent_follow_up_are_dropped_silently(
    publisher, incoming, row_version
):
    record = AlreadySent(_row(status=Status.SENT, version=row_version), None)
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(incoming, _deps(record, gateway, publisher))
    assert gateway.requests == []
    assert publisher.events() == []


class Waiting(AlreadySent):
    """The row was released to wait for a later instant (its place in the send window)."""


@pytest.mark.parametrize(
    ("incoming", "armed"),
    [
        pytest.param(_redelivered(), True, id="redelivered: its wake may never have been armed"),
        pytest.param(_due(), False, id="a first delivery: a duplicate of the armed wake"),
    ],
)
async def test_a_timer_of_a_row_waiting_for_later_arms_its_wake_only_when_redelivered(
    publisher, incoming, armed
):
    later = NOW + timedelta(seconds=40)
    record = Waiting(_row(status=Status.SCHEDULED, next_attempt_at=later), _context())
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(incoming, _deps(record, gateway, publisher))
    assert gateway.requests == []
    timers = publisher.timers()
    if armed:
        [timer] = timers
        assert timer["kind"] == "dispatch"
        assert datetime.fromisoformat(timer["fire_at"]) == later
    else:
        assert timers == []


@pytest.mark.parametrize(
    ("incoming", "armed"),
    [
        pytest.param(_redelivered(version=1), True, id="redelivered: the move may be unarmed"),
        pytest.param(_due(), False, id="a first delivery: a stale timer"),
    ],
)
async def test_a_timer_of_an_earlier_version_arms_the_moved_row_only_when_redelivered(
    publisher, incoming, armed
):
    moved_to = NOW + timedelta(seconds=40)
    record = Waiting(_row(status=Status.SCHEDULED, version=2, scheduled_time=moved_to), None)
    gateway = FakeGateway(GatewayResult(Outcome.SENT, "http_200", 200))
    await handle(incoming, _deps(record, gateway, publisher))
    assert gateway.requests == []
    timers = publisher.timers()
    if armed:
        assert timers
        assert {t["version"] for t in timers} == {2}
        dispatch = [t for t in timers if t["kind"] in ("dispatch", "lead")]
        assert dispatch, "a send timer for the new time"
    else:
        assert timers == []
