"""The queue policies match exactly the project's queues, and the management API is found from
the AMQP URL."""

from __future__ import annotations

import pytest

from shared.policies import (
    QueueLimits,
    management_url,
    moved_arguments,
    policies,
    policy_for,
    shadowing,
    vhost_of,
)
from shared.settings import Settings
from shared.topology import WORK_QUEUES, digit_queue, timer_queue_arguments, timer_queues


def test_each_project_queue_has_exactly_one_policy_and_no_other_queue_has_one():
    limits = QueueLimits()
    names = [
        *(w.name for w in WORK_QUEUES),
        *(w.dead_letter_queue for w in WORK_QUEUES),
        *timer_queues(),
    ]
    for name in names:
        assert len([p for p in policies(limits) if p.matches(name)]) == 1, name
    for other in (
        "followups.timers.orphans",
        "followups.timers.level.03",
        "followups.timers.digit.6.1",
        "followups.timers.digit.0.0",
        "followups.dispatcher.due.moving",
        "followups.scheduler.inbox.dlq.copy",
        "xfollowups.scheduler.inbox",
        "followups.scheduler.inboxes",
        "my.app.followup.events",
    ):
        assert policy_for(other, limits) is None, other


def test_policies_carry_the_settings():
    settings = Settings(delivery_limit=9, dlq_max_length=20, dlq_max_age_hours=0.5)
    limits = settings.queue_limits
    inbox = policy_for("followups.scheduler.inbox", limits)
    assert inbox is not None
    assert inbox.definition["delivery-limit"] == 9
    assert inbox.definition["dead-letter-routing-key"] == "followups.scheduler.inbox.dlq"
    dead = policy_for("followups.dispatcher.due.dlq", limits)
    assert dead is not None
    assert dead.definition == {"max-length": 20, "message-ttl": 1_800_000, "overflow": "drop-head"}


def test_the_timer_policy_holds_nothing_of_the_timer():
    timer = policy_for(digit_queue(3, 0xA), QueueLimits())
    assert timer is not None
    arguments = timer_queue_arguments(3, 0xA, "quorum")
    for key in timer.definition:
        assert arguments.get(f"x-{key}") == timer.definition[key]
    assert "message-ttl" not in timer.definition
    assert "dead-letter-exchange" not in timer.definition


def test_a_policy_that_would_take_our_queues_is_reported_once_per_pair():
    ours = policies(QueueLimits())
    existing = [
        {"name": "everything", "pattern": ".*", "apply-to": "all", "priority": 100},
        {"name": "lower", "pattern": ".*", "apply-to": "queues", "priority": 5},
        {"name": "exchanges", "pattern": ".*", "apply-to": "exchanges", "priority": 500},
        {"name": "broken", "pattern": "(", "apply-to": "queues", "priority": 500},
    ]
    found = shadowing(ours, existing, [*timer_queues(), "followups.scheduler.inbox"])
    assert len(found) == 2
    assert "matches 90 queue(s) of policy 'followups.timers'" in found[0]
    assert all("'everything'" in line for line in found)


@pytest.mark.parametrize(
    ("amqp", "explicit", "expected"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", None, "http://guest:guest@127.0.0.1:15672"),
        (
            "amqps://app:p%40ss@rabbit.internal/prod",
            None,
            "https://app:p%40ss@rabbit.internal:15672",
        ),
        ("amqp://[::1]:5672/", None, "http://guest:guest@[::1]:15672"),
        ("amqp://a:b@h/", "http://ops:x@mgmt:8080/", "http://ops:x@mgmt:8080"),
    ],
)
def test_the_management_url_defaults_from_the_amqp_url(amqp, explicit, expected):
    assert management_url(amqp, explicit) == expected


def test_the_vhost_comes_from_the_amqp_url():
    assert vhost_of("amqp://guest:guest@127.0.0.1:5672/") == "/"
    assert vhost_of("amqp://guest:guest@127.0.0.1:5672") == "/"
    assert vhost_of("amqp://h/%2Fprod") == "/prod"
    assert vhost_of("amqp://h/followups_t_1") == "followups_t_1"


def test_the_arguments_of_earlier_releases_are_recognised():
    old = {"x-queue-type": "quorum", "x-delivery-limit": 5, "x-dead-letter-exchange": "d"}
    assert moved_arguments(old) == ["x-dead-letter-exchange", "x-delivery-limit"]
    assert moved_arguments({"x-queue-type": "quorum"}) == []
