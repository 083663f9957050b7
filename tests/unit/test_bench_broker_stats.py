"""Timer work from the broker's statistics: the node counters' answer and the per-queue sums."""

from __future__ import annotations

import pytest

from bench.broker_stats import NodeCounters, parse_node_counters, timer_work

TTL = {"x-message-ttl": 4096, "x-dead-letter-exchange": "followups.timers.p1"}


def queue(name: str, *, publish: int = 0, messages: int = 0, **extra: object) -> dict:
    found: dict = {"name": name, "messages": messages, "arguments": dict(TTL)}
    if publish:
        found["message_stats"] = {"publish": publish}
    found.update(extra)
    return found


def work(name: str, *, delivered: int, redelivered: int = 0, messages: int = 0, publish: int = 0):
    stats = {"deliver_get": delivered, "redeliver": redelivered, "publish": publish}
    return {"name": name, "messages": messages, "arguments": {}, "message_stats": stats}


def test_node_counters_are_read_from_the_tuple_rabbitmqctl_prints():
    assert parse_node_counters("{455,22}\n") == NodeCounters(455, 22)
    assert parse_node_counters(" { 1 , 2 } ") == NodeCounters(1, 2)
    with pytest.raises(ValueError, match="unexpected"):
        parse_node_counters("Error: unable to perform an operation")


def test_quorum_timer_queues_take_the_hops_from_the_node_counters():
    queues = [
        queue("followups.timers.p3.d2", publish=10),
        queue("followups.timers.p1.d7", publish=5, messages=2),
        work("followups.dispatcher.due", delivered=12, redelivered=1, publish=3),
        work("followups.personalizer.due", delivered=0),
        work("followups.scheduler.inbox", delivered=99),  # not a timer destination
        queue("other.queue", publish=1000),
    ]
    found = timer_work(queues, NodeCounters(100, 1000), NodeCounters(140, 1600), 550)
    assert found.timer_queues == 2
    assert found.timer_publishes == 10 + 5 + 3
    assert found.hops == 40
    assert not found.exact
    assert found.into_work_queues == (12 - 1) - 3
    assert found.timer_messages_left == 2
    assert found.other_vhost_publishes == 50
    assert found.total == 58
    assert found.per_followup(10) == 5.8
    assert found.per_followup(0) is None


def test_classic_timer_queues_count_their_own_entries_exactly():
    status = {"backing_queue_status": {"next_seq_id": 9}}
    queues = [
        queue("followups.timers.p3.d2", publish=4, **status),  # 5 dead-lettered in
        queue("followups.timers.p0.d1", **{"backing_queue_status": {"next_seq_id": 6}}),
        {"name": "followups.timers.orphans", "messages": 1, "arguments": {}},
        work("followups.personalizer.due", delivered=7, messages=1, publish=2),
    ]
    found = timer_work(queues, NodeCounters(0, 0), NodeCounters(999, 999), 0)
    assert found.exact
    assert found.timer_publishes == 4 + 2
    # 5 + 6 into the TTL queues, 1 into orphans, 8 - 2 into the work queue.
    assert found.hops == 5 + 6 + 1 + 6
    assert found.into_work_queues == 6


def test_without_node_counters_a_quorum_vhost_has_no_hop_count():
    found = timer_work([queue("followups.timers.p0.d1", publish=3)])
    assert found.hops is None
    assert found.total is None
    assert found.per_followup(3) is None


def test_the_plugin_counts_a_publish_into_its_exchange_and_a_delivery_out_of_it():
    # 15 timers through the delayed exchange, 5 texts asked for at once straight to the queue.
    queues = [work("followups.personalizer.due", delivered=20, publish=20)]
    exchange = {"message_stats": {"publish_in": 15, "publish_out": 15}}
    found = timer_work(queues, plugin_exchange=exchange)
    assert found.timer_queues == 0
    assert found.timer_publishes == 15 + 5
    assert found.hops == 15
    assert found.total == 35
    assert found.exact
