from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.schemas import TimerKind, TimerMessage
from shared.timers import (
    FIRE_AT_HEADER,
    LEVELS_MAX_DELAY_MS,
    LEVELS_MAX_UNITS,
    PLUGIN_MAX_DELAY_MS,
    WINDOW_HEADER,
    LevelsTimer,
    PluginTimer,
    Timer,
    levels_entry_exchange,
    levels_hops,
    levels_routing_key,
    levels_units,
    plugin_headers,
    remaining,
    sleep_until,
    to_epoch_ms,
    wait_until_due,
    wanted_ms,
)
from shared.topology import (
    LEGACY_TIMER_WORDS,
    TIMER_DELIVER_EXCHANGE,
    TIMER_PLUGIN_EXCHANGE,
    TIMER_POSITIONS,
    TIMER_QUANTUM_MS,
    TIMER_RADIX,
    deliver_pattern,
    digit_pattern,
    position_exchange,
    timer_queue_arguments,
    timer_queues,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DAY_MS = 86_400_000


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


def simulate_levels(units: int, destination: str) -> tuple[int, int, bool]:
    """Walk a message through the position exchanges as the broker would: the total TTL it
    spends in digit queues, how many it passes through, and whether it reaches the
    destination's binding."""
    key = levels_routing_key(units, destination)
    waited = hops = 0
    for position in range(TIMER_POSITIONS - 1, -1, -1):
        held = [d for d in range(1, TIMER_RADIX) if topic_match(digit_pattern(position, d), key)]
        passes = topic_match(digit_pattern(position, 0), key)
        assert len(held) + passes == 1, "each position either holds or passes a message"
        if held:
            [digit] = held
            waited += timer_queue_arguments(position, digit, "quorum")["x-message-ttl"]
            hops += 1
    return waited, hops, topic_match(deliver_pattern(destination), key)


@pytest.mark.parametrize("units", [0, 1, 15, 16, 77, 4096, 65_535, DAY_MS // 256, LEVELS_MAX_UNITS])
def test_levels_routing_adds_up_to_the_delay(units):
    waited, hops, delivered = simulate_levels(units, "followups.dispatcher.due")
    assert waited == units * TIMER_QUANTUM_MS
    assert hops == levels_hops(units)
    assert delivered


def test_routing_key_spells_the_delay_in_hex_most_significant_first():
    key = levels_routing_key(0x4D, "followups.x")
    words = key.split(".")
    assert words[:TIMER_POSITIONS] == ["0", "0", "0", "0", "4", "d"]
    assert key.endswith(".followups.x")
    assert levels_hops(0x4D) == 2


def test_routing_key_refuses_delays_outside_the_levels():
    with pytest.raises(ValueError, match="outside"):
        levels_routing_key(LEVELS_MAX_UNITS + 1, "q")
    with pytest.raises(ValueError, match="outside"):
        levels_routing_key(-1, "q")


def test_entry_exchange_is_the_highest_nonzero_digit():
    assert levels_entry_exchange(0) == TIMER_DELIVER_EXCHANGE
    assert levels_entry_exchange(1) == position_exchange(0)
    assert levels_entry_exchange(0x4D) == position_exchange(1)
    assert levels_entry_exchange(0x100000) == position_exchange(5)


def test_destination_binding_does_not_match_another_destination():
    key = levels_routing_key(10, "followups.personalizer.due")
    assert not topic_match(deliver_pattern("followups.dispatcher.due"), key)


def test_timers_of_the_binary_levels_still_reach_their_destination():
    legacy = ".".join(["0"] * LEGACY_TIMER_WORDS) + ".followups.dispatcher.due"
    pattern = deliver_pattern("followups.dispatcher.due", LEGACY_TIMER_WORDS)
    assert topic_match(pattern, legacy)
    assert not topic_match(deliver_pattern("followups.dispatcher.due"), legacy)


def test_fifteen_queues_a_position_each_with_a_fixed_ttl():
    names = timer_queues()
    assert len(names) == len(set(names)) == TIMER_POSITIONS * (TIMER_RADIX - 1)
    assert timer_queue_arguments(2, 10, "quorum")["x-message-ttl"] == 10 * 16**2 * 256


@given(st.integers(0, 200 * DAY_MS), st.integers(0, 10 * 60_000))
def test_levels_never_late_and_early_by_no_more_than_the_window_or_a_quantum(wanted, window):
    armed = levels_units(wanted, window) * TIMER_QUANTUM_MS
    if wanted > LEVELS_MAX_DELAY_MS:
        assert 0 < armed <= LEVELS_MAX_DELAY_MS  # past the horizon: armed again on arrival
        return
    assert armed <= wanted
    assert wanted - armed < max(window + 1, TIMER_QUANTUM_MS)


@given(st.integers(0, 40 * DAY_MS), st.integers(0, 10 * 60_000))
def test_a_wider_window_never_costs_more_hops(wanted, window):
    assert levels_hops(levels_units(wanted, window)) <= levels_hops(levels_units(wanted, 0))


def test_timer_work_for_the_common_delays():
    timer = LevelsTimer(RecordingPublisher(), clock=lambda: NOW)
    # A send timer 20 s ahead (less the 250 ms margin): one publish and two hops.
    assert timer.work(19_750, 0) == 3
    # A preparation due within its window is published at once: no hop.
    assert timer.work(10_000, 10_000) == 1
    # Past the horizon: one hop, then armed again.
    assert timer.work(60 * DAY_MS, 0) == 2
    assert PluginTimer(RecordingPublisher(), clock=lambda: NOW).work(30 * DAY_MS, 0) == 2


def test_wanted_delay_rounds_up_and_is_never_negative():
    assert wanted_ms(NOW + timedelta(microseconds=1500), NOW) == 2
    assert wanted_ms(NOW - timedelta(seconds=5), NOW) == 0


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
    fire_at = NOW + timedelta(milliseconds=19_750)
    armed = await timer.arm("followups.dispatcher.due", b"{}", fire_at)
    [sent] = publisher.published
    assert armed == 0x4D * TIMER_QUANTUM_MS
    assert sent["exchange"] == position_exchange(1)
    assert sent["routing_key"] == levels_routing_key(0x4D, "followups.dispatcher.due")
    assert sent["headers"] == {FIRE_AT_HEADER: to_epoch_ms(fire_at)}
    assert sent["mandatory"] is True


async def test_a_window_travels_with_the_timer():
    publisher = RecordingPublisher()
    timer = LevelsTimer(publisher, clock=lambda: NOW)
    await timer.arm("q", b"{}", NOW + timedelta(seconds=5), window=timedelta(seconds=10))
    [sent] = publisher.published
    assert sent["exchange"] == TIMER_DELIVER_EXCHANGE
    assert sent["headers"][WINDOW_HEADER] == 10_000


class FakeTimer(Timer):
    backend = None  # type: ignore[assignment]

    def __init__(self, clock):
        super().__init__(RecordingPublisher(), clock)
        self.armed: list[tuple[str, int, dict]] = []

    def delay_for(self, wanted, window):
        return min(wanted, 1000)

    def work(self, wanted, window):
        return 2

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


async def test_a_receiver_acts_at_once_inside_the_window():
    timer = FakeTimer(lambda: NOW)
    headers = {FIRE_AT_HEADER: to_epoch_ms(NOW + timedelta(seconds=30)), WINDOW_HEADER: 40_000}
    assert await wait_until_due(timer, "q", b"{}", headers, lambda: NOW) is True
    assert timer.armed == []


async def test_a_receiver_rearms_with_the_window_when_still_far():
    timer = FakeTimer(lambda: NOW)
    fire_at = NOW + timedelta(seconds=30)
    headers = {FIRE_AT_HEADER: to_epoch_ms(fire_at), WINDOW_HEADER: 10_000}
    assert await wait_until_due(timer, "q", b"{}", headers, lambda: NOW) is False
    [(_, delay, rearmed)] = timer.armed
    assert rearmed == headers
    assert delay == 1000
