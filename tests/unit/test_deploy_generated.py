"""Files generated from the code are committed; these tests fail when they fall behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

from services.cli.exports import asyncapi_text, definitions_text
from shared.policies import DEFAULT_DELIVERY_LIMIT
from shared.schemas import INBOUND
from shared.topology import WORK_QUEUES

ROOT = Path(__file__).resolve().parents[2]
STALE = "is out of date with the code: run `make docs` and commit it"


def test_asyncapi_catalogue_is_up_to_date():
    committed = (ROOT / "docs/asyncapi.json").read_text()
    assert committed == asyncapi_text(), f"docs/asyncapi.json {STALE}"


def test_catalogue_has_every_command_and_event():
    document = json.loads(asyncapi_text())
    channels = set(document["channels"])
    assert set(INBOUND) <= channels
    assert {"followup.scheduled", "followup.sent", "followup.failed"} <= channels
    schemas = document["components"]["schemas"]
    assert schemas["FollowupSent"]["properties"]["event"]["const"] == "followup.sent"
    assert "phone" not in schemas["FollowupSent"]["properties"]


def test_rabbitmq_definitions_are_up_to_date():
    committed = (ROOT / "deploy/rabbitmq/definitions.json").read_text()
    assert committed == definitions_text(), f"deploy/rabbitmq/definitions.json {STALE}"


def test_every_work_queue_has_a_dead_letter_queue_and_a_policy_in_the_definitions():
    definitions = json.loads(definitions_text())
    queues = {q["name"]: q["arguments"] for q in definitions["queues"]}
    policies = {p["name"]: p for p in definitions["policies"]}
    for work in WORK_QUEUES:
        assert queues[work.name] == {"x-queue-type": "quorum"}
        assert work.dead_letter_queue in queues
        definition = policies[work.name]["definition"]
        assert definition["dead-letter-routing-key"] == work.dead_letter_queue
        assert definition["delivery-limit"] == DEFAULT_DELIVERY_LIMIT
        assert re.search(policies["followups.dead-letters"]["pattern"], work.dead_letter_queue)
    assert all(name.startswith("followups.") for name in queues)
