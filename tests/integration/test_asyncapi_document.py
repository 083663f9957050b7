"""docs/asyncapi.json against the AsyncAPI 3.0 JSON schema (from the `@asyncapi/specs` npm
package, installed by the test), and every message's example against its own payload schema."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest

import shared.schemas
from services.cli.exports import asyncapi_text
from shared.schemas import INBOUND, LifecycleEvent
from shared.topology import PUBLIC_EXCHANGE
from tests.support.npm import npm_install

SPECS = "@asyncapi/specs@6.11.1"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(asyncapi_text())
    return value


@pytest.fixture(scope="module")
def asyncapi_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    modules = npm_install(tmp_path_factory.mktemp("npm"), SPECS)
    schema: dict[str, Any] = json.loads(
        (modules / "@asyncapi/specs/schemas/3.0.0-without-$id.json").read_text()
    )
    return schema


def _payload_validator(document: dict[str, Any], message: dict[str, Any]) -> Any:
    # The payload schema's $refs point into the document's components.
    root = {**document, **message["payload"]}
    return jsonschema.Draft7Validator(root)


def test_the_catalogue_is_a_valid_asyncapi_3_document(document, asyncapi_schema):
    jsonschema.Draft7Validator(asyncapi_schema).validate(document)


def test_a_broken_document_is_caught(document, asyncapi_schema):
    broken = copy.deepcopy(document)
    broken["operations"]["followup.requested"]["action"] = "publish"  # AsyncAPI 2 wording
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(asyncapi_schema).validate(broken)


def test_commands_name_the_exchange_and_routing_key_not_the_queue(document):
    for routing_key in INBOUND:
        channel = document["channels"][routing_key]
        amqp = channel["bindings"]["amqp"]
        assert amqp["is"] == "routingKey"
        assert amqp["exchange"]["name"] == PUBLIC_EXCHANGE
        assert amqp["exchange"]["type"] == "topic"
        assert "queue" not in amqp
        assert channel["address"] == routing_key


def test_every_operation_is_persistent_and_not_mandatory(document):
    for operation in document["operations"].values():
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2
        assert operation["bindings"]["amqp"]["mandatory"] is False


class _ExampleDay(datetime):
    """The day the examples are set on, so the models' time windows accept them for good."""

    @classmethod
    def now(cls, tz=None):
        return datetime(2027, 3, 1, 15, tzinfo=UTC)


def test_every_message_has_an_example_its_own_schema_accepts(document, monkeypatch):
    monkeypatch.setattr(shared.schemas, "datetime", _ExampleDay)
    messages = document["components"]["messages"]
    for name, message in messages.items():
        examples = message["examples"]
        assert examples, name
        for example in examples:
            _payload_validator(document, message).validate(example["payload"])
            routing_key = name.split(":")[0]
            if routing_key in INBOUND:
                # And the services' own validation.
                body = json.dumps(example["payload"]).encode()
                shared.schemas.parse_inbound(routing_key, body, "application/json")
            else:
                assert LifecycleEvent.model_validate(example["payload"]).event == routing_key


def _schema_of(document: dict[str, Any], routing_key: str) -> Any:
    return _payload_validator(
        document, document["components"]["messages"][f"{routing_key}:SubscribeMessage"]
    )


@pytest.mark.parametrize(
    ("routing_key", "body"),
    [
        ("followup.requested", {"skip_if_completed": True, "action_item_id": None}),
        ("followup.requested", {"skip_if_completed": True}),
        ("followup.requested", {"is_recurring": True}),
        ("followup.cancel_requested", {"followup_id": 3, "idempotency_key": "k"}),
        ("followup.cancel_requested", {}),
        ("followup.cancel_requested", {"followup_id": None, "idempotency_key": None}),
        ("followup.reschedule_requested", {"scheduled_time": "2027-03-02T09:00:00Z"}),
        ("followup.response_received", {"text": "hi"}),
    ],
)
def test_cross_field_rules_are_in_the_schemas(document, routing_key, body):
    base: dict[str, Any] = {
        "followup.requested": {
            "contractor_id": 1,
            "scheduled_time": "2027-03-02T09:00:00Z",
            "followup_type": "t",
            "message_template": "Hi",
        },
        "followup.reschedule_requested": {"scheduled_time": "2027-03-02T09:00:00Z"},
        "followup.response_received": {"text": "hi"},
    }.get(routing_key, {})
    validator = _schema_of(document, routing_key)
    assert not validator.is_valid({**base, **body})


@pytest.mark.parametrize(
    ("routing_key", "body"),
    [
        ("followup.requested", {"skip_if_completed": True, "action_item_id": 7}),
        ("followup.requested", {"skip_if_completed": False}),
        ("followup.cancel_requested", {"followup_id": 3}),
        ("followup.cancel_requested", {"followup_id": None, "idempotency_key": "k"}),
        ("followup.response_received", {"text": "hi", "phone": "+15555550123"}),
    ],
)
def test_what_the_rules_allow_the_schemas_allow(document, routing_key, body):
    base: dict[str, Any] = {
        "followup.requested": {
            "contractor_id": 1,
            "scheduled_time": "2027-03-02T09:00:00Z",
            "followup_type": "t",
            "message_template": "Hi",
        },
    }.get(routing_key, {})
    _schema_of(document, routing_key).validate({**base, **body})


def test_commands_allow_fields_this_version_does_not_know(document):
    schemas = document["components"]["schemas"]
    for model in INBOUND.values():
        assert schemas[model.__name__].get("additionalProperties", True) is not False
