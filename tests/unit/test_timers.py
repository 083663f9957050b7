from datetime import UTC, datetime, timedelta

import pytest

from shared.schemas import TimerKind, TimerMessage
from shared.timers import (
    FIRE_AT_HEADER,
    LEVELS_MAX_DELAY_MS,
    PLUGIN_MAX_DELAY_MS,
    LevelsTimer,
    PluginTimer,
    Timer,
    delay_ms,
    levels_entry_exchange,
    levels_routing_key,
    plugin_headers,
    remaining,
    sleep_until,
    to_epoch_ms,
    wait_until_due,
)
from shared.topology import (
    TIMER_DELIVER_EXCHANGE,
    TIMER_LEVELS,
    TIMER_PLUGIN_EXCHANGE,
    deliver_pattern,
    level_name,
    level_pattern,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def topic_match(pattern: str, key: str) -> bool:
    """RabbitMQ topic matching: * is one word, # is zero or more words."""
    p, k = pattern.split("."), key.split(".")

    def go(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(k)
        if p[i] == "#":
            return any(go(i + 1, jj) for jj in range(j, len(k) + 1))
        if j == len(k):
            return False
        return (p[i] == "*" or p[i] == k[j]) and go(i + 1, j + 1)

    return go(0, 0)


def simulate_levels(delay: int, destination: str) -> tuple[int, bool]:
    """Walk a message through the level exchanges as the broker would: the total TTL it
    spends in level queues, and whether it reaches the destination's binding."""
    key = levels_routing_key(delay, destination)
    waited = 0
    for level in range(TIMER_LEVELS - 1, -1, -1):
        holds = topic_match(level_pattern(level, "1"), key)
        passes = topic_match(level_pattern(level, "0"), key)
        assert holds != passes, "each level either holds or passes a message, never both"
        if holds:
            waited += 2**level
    return waited, topic_match(deliver_pattern(destination), key)


@pytest.mark.parametrize("delay", [0, 1, 2, 3, 1000, 4999, 65_535, 86_400_000, LEVELS_MAX_DELAY_MS])
def test_levels_routing_adds_up_to_the_delay(delay):
    waited, delivered = simulate_levels(delay, "followups.dispatcher.due")
    assert waited == delay
    assert delivered


def test_routing_key_spells_the_delay_in_binary_most_significant_first():
    key = levels_routing_key(5, "followups.x")
    words = key.split(".")
    assert len(words) == TIMER_LEVELS + 2
    assert words[TIMER_LEVELS - 3 : TIMER_LEVELS] == ["1", "0", "1"]
    assert set(words[: TIMER_LEVELS - 3]) == {"0"}
    assert key.endswith(".followups.x")


def test_routing_key_refuses_delays_outside_the_levels():
    with pytest.raises(ValueError, match="outside"):
        levels_routing_key(LEVELS_MAX_DELAY_MS + 1, "q")
    with pytest.raises(ValueError, match="outside"):
        levels_routing_key(-1, "q")


def test_entry_exchange_is_the_highest_set_bit():
    assert levels_entry_exchange(0) == TIMER_DELIVER_EXCHANGE
    assert levels_entry_exchange(1) == level_name(0)
    assert levels_entry_exchange(1000) == level_name(9)


def test_destination_binding_does_not_match_another_destination():
    key = levels_routing_key(10, "followups.personalizer.due")
    assert not topic_match(deliver_pattern("followups.dispatcher.due"), key)


def test_delay_rounds_up_and_is_clamped_to_the_horizon():
    assert delay_ms(NOW + timedelta(microseconds=1500), NOW, 10_000) == 2
    assert delay_ms(NOW - timedelta(seconds=5), NOW, 10_000) == 0
    assert delay_ms(NOW + timedelta(days=400), NOW, PLUGIN_MAX_DELAY_MS) == PLUGIN_MAX_DELAY_MS


def test_plugin_headers_carry_x_delay_and_never_exceed_its_limit():
    assert plugin_headers(1500, {"a": 1}) == {"a": 1, "x-delay": 1500}
    with pytest.raises(ValueError, match="plugin"):
        plugin_headers(PLUGIN_MAX_DELAY_MS + 1, {})


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[dict] = []

    async def publish(
        self, body, *, exchange, routing_key, headers=None, priority=None, mandatory=True
    ):
        self.published.append(
            {
                "body": body,
                "exchange": exchange,
                "routing_key": routing_key,
                "headers": headers,
                "mandatory": mandatory,
            }
        )


async def test_plugin_timer_message_format():
    publisher = RecordingPublisher()
    timer = PluginTimer(publisher, clock=lambda: NOW)
    fire_at = NOW + timedelta(seconds=90)
    armed = await timer.arm("followups.dispatcher.due", b"{}", fire_at)
    [sent] = publisher.published
    assert armed == 90_000
    assert sent["exchange"] == TIMER_PLUGIN_EXCHANGE
    assert sent["routing_key"] == "followups.dispatcher.due"
    assert sent["headers"] == {"x-delay": 90_000, FIRE_AT_HEADER: to_epoch_ms(fire_at)}
    assert sent["mandatory"] is False


async def test_plugin_timer_never_hands_the_plugin_more_than_its_horizon():
    publisher = RecordingPublisher()
    timer = PluginTimer(publisher, clock=lambda: NOW)
    fire_at = NOW + timedelta(days=60)
    armed = await timer.arm("q", b"{}", fire_at)
    assert armed == PLUGIN_MAX_DELAY_MS
    assert publisher.published[0]["headers"][FIRE_AT_HEADER] == to_epoch_ms(fire_at)


async def test_levels_timer_message_format():
    publisher = RecordingPublisher()
    timer = LevelsTimer(publisher, clock=lambda: NOW)
    await timer.arm("followups.personalizer.due", b"{}", NOW + timedelta(milliseconds=6))
    [sent] = publisher.published
    assert sent["exchange"] == level_name(2)
    assert sent["routing_key"] == levels_routing_key(6, "followups.personalizer.due")
    assert sent["mandatory"] is True


class FakeTimer(Timer):
    backend = None  # type: ignore[assignment]
    horizon_ms = 1000

    def __init__(self, clock):
        super().__init__(RecordingPublisher(), clock)
        self.armed: list[tuple[str, int, dict]] = []

    async def _publish(self, destination, message, delay, headers):
        self.armed.append((destination, delay, headers))


async def test_a_timer_past_the_horizon_is_armed_again_when_it_fires():
    clock_now = [NOW]
    timer = FakeTimer(lambda: clock_now[0])
    body = (
        TimerMessage(
            kind=TimerKind.DISPATCH, followup_id=1, version=1, fire_at=NOW + timedelta(seconds=3.5)
        )
        .model_dump_json()
        .encode()
    )
    await timer.arm("q", body, NOW + timedelta(seconds=3.5))
    assert timer.armed[0][1] == 1000
    headers = timer.armed[0][2]

    clock_now[0] = NOW + timedelta(seconds=1)
    assert remaining(headers, clock_now[0]) == timedelta(seconds=2.5)
    assert await wait_until_due(timer, "q", body, headers, lambda: clock_now[0]) is False
    assert timer.armed[1][1] == 1000
    assert timer.armed[1][2][FIRE_AT_HEADER] == headers[FIRE_AT_HEADER]

    clock_now[0] = NOW + timedelta(seconds=3.5)
    assert await wait_until_due(timer, "q", body, headers, lambda: clock_now[0]) is True
    assert len(timer.armed) == 2


async def test_sleep_until_trusts_the_wall_clock_over_an_early_waking_loop():
    # The loop wakes "on time" by its own count, but the wall clock still says 1 ms to go,
    # then 0.2 ms: the wait goes on until the clock reaches the moment.
    readings = iter([NOW, NOW + timedelta(milliseconds=4), NOW + timedelta(microseconds=4_800)])
    last = [NOW]

    def clock() -> datetime:
        last[0] = next(readings, NOW + timedelta(milliseconds=5))
        return last[0]

    moment = NOW + timedelta(milliseconds=5)
    await sleep_until(moment, clock)
    assert last[0] >= moment
    assert next(readings, None) is None
