"""The CLI without a broker or database: help texts, argument parsing, dead-letter reading."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import typer
from typer.testing import CliRunner

from services.cli.checks import redact
from services.cli.common import parse_duration, parse_moment
from services.cli.deadletters import DeadLetter, resolve_queue, revalidate
from services.cli.main import app
from services.cli.runtime import child_environment
from shared.topology import DISPATCHER_DUE, SCHEDULER_INBOX

runner = CliRunner()
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for info in group.registered_commands:
        assert info.callback is not None
        found.append((*prefix, info.name or info.callback.__name__.replace("_", "-")))
    for sub in group.registered_groups:
        assert sub.typer_instance is not None
        assert sub.name is not None
        found.append((*prefix, sub.name))
        found.extend(_commands(sub.typer_instance, (*prefix, sub.name)))
    return found


def test_contract_commands_exist():
    names = {" ".join(c) for c in _commands(app)}
    assert names >= {
        "migrate",
        "run",
        "schedule",
        "cancel",
        "reschedule",
        "list",
        "show",
        "stats",
        "dlq list",
        "dlq replay",
        "dlq purge",
        "doctor",
        "topology export",
        "docs asyncapi",
    }


@pytest.mark.parametrize("command", _commands(app), ids=" ".join)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10), ("5m", 300), ("2h", 7200), ("1d", 86400), ("-30m", -1800)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["10", "ten seconds", "5 m", "1w"])
def test_bad_durations_say_what_to_write(text):
    with pytest.raises(typer.BadParameter, match="500ms"):
        parse_duration(text)


def test_moments_relative_absolute_and_now():
    assert parse_moment("now", NOW) == NOW
    assert parse_moment("2h", NOW) == NOW + timedelta(hours=2)
    assert parse_moment("-7d", NOW) == NOW - timedelta(days=7)
    assert parse_moment("2026-12-01T09:00:00-05:00", NOW) == datetime(2026, 12, 1, 14, tzinfo=UTC)
    with pytest.raises(typer.BadParameter, match="offset"):
        parse_moment("2026-12-01T09:00:00", NOW)


def test_cancel_needs_exactly_one_reference():
    both = runner.invoke(app, ["cancel", "42", "--key", "k"])
    neither = runner.invoke(app, ["cancel"])
    assert both.exit_code == neither.exit_code == 2
    assert "exactly one" in both.output


def test_reschedule_validates_before_publishing():
    result = runner.invoke(app, ["reschedule", "42", "--at", "2026-12-01T09:00:00"])
    assert result.exit_code == 2
    assert "schema" in result.output


def test_run_all_refuses_one_fixed_port():
    result = runner.invoke(app, ["run", "all"], env={"HTTP_PORT": "8080"})
    assert result.exit_code == 2
    assert "HTTP_PORT" in result.output


def test_run_all_lets_the_services_with_slack_yield_to_the_dispatcher():
    environ = {"DATABASE_URL": "postgresql://db/followups"}
    assert child_environment("scheduler", environ)["CPU_NICE"] == "5"
    assert child_environment("personalizer", environ)["CPU_NICE"] == "5"
    assert "CPU_NICE" not in child_environment("dispatcher", environ)
    assert child_environment("dispatcher", environ)["DATABASE_URL"] == environ["DATABASE_URL"]
    # The operator's own setting wins, 0 included.
    assert child_environment("scheduler", {"CPU_NICE": "0"})["CPU_NICE"] == "0"


@pytest.mark.parametrize(
    "name", ["scheduler", "followups.scheduler.inbox", "followups.scheduler.inbox.dlq"]
)
def test_queue_names_resolve(name):
    assert resolve_queue(name) is SCHEDULER_INBOX


def test_unknown_queue_lists_the_known_ones():
    with pytest.raises(LookupError, match=r"followups\.dispatcher\.due\.dlq"):
        resolve_queue("mailer")


def _letter(headers, routing_key="followups.scheduler.inbox.dlq", body=b"{}"):
    return DeadLetter(body, headers, routing_key, "m-1", "application/json")


def test_rejected_letter_reads_our_headers():
    letter = _letter(
        {
            "x-error-rule": "schema",
            "x-error-reason": "contractor_id: missing",
            "x-original-routing-key": "followup.requested",
            "x-trace": "kept",
        }
    )
    assert letter.original_routing_key == "followup.requested"
    assert letter.reason == "schema: contractor_id: missing"
    assert letter.replay_headers() == {"x-trace": "kept"}


def test_poison_letter_reads_the_brokers_death_record():
    death = {
        "reason": "delivery_limit",
        "queue": "followups.scheduler.inbox",
        "routing-keys": ["followup.cancel_requested"],
        "count": 1,
    }
    letter = _letter({"x-death": [death], "x-first-death-reason": "delivery_limit"})
    assert letter.original_routing_key == "followup.cancel_requested"
    assert letter.reason == "delivery_limit in followups.scheduler.inbox"
    assert letter.replay_headers() == {}


def test_revalidation_uses_the_schema_of_each_queue():
    command = _letter(
        {"x-original-routing-key": "followup.cancel_requested"}, body=b'{"followup_id": 7}'
    )
    assert revalidate(SCHEDULER_INBOX, command) is None
    assert revalidate(
        SCHEDULER_INBOX, _letter({"x-original-routing-key": "followup.x"})
    ).startswith("unknown_routing_key")
    timer = _letter({}, body=b'{"kind": "dispatch", "followup_id": 1}')
    assert revalidate(DISPATCHER_DUE, timer).startswith("timer_schema")


def test_urls_are_printed_without_passwords():
    assert redact("amqp://app:s3cret@rabbit:5672/prod") == "amqp://app:***@rabbit:5672/prod"
    assert redact("postgresql://127.0.0.1/followups") == "postgresql://127.0.0.1/followups"
