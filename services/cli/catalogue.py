"""The event catalogue (AsyncAPI 3.0), generated from the wire schemas in shared.schemas.

A documentation-only broker subscribes to each inbound command and publishes each lifecycle
event, typed with the pydantic models the services validate with; FastStream turns that into
the AsyncAPI document. No connection is made.
"""

from __future__ import annotations

import json
from typing import Any, Literal, cast, get_args

from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.specification import AsyncAPI
from pydantic import BaseModel, create_model

from shared.schemas import INBOUND, LifecycleEvent
from shared.topology import PUBLIC_EXCHANGE, SCHEDULER_INBOX

TITLE = "followups"
DESCRIPTION = (
    "Follow-up SMS delivered at their exact scheduled time. Other services publish commands on "
    f"the topic exchange `{PUBLIC_EXCHANGE}`; the system publishes lifecycle events on the same "
    "exchange. Messages are JSON, persistent; a command that fails validation is dead-lettered "
    "with a reason and never retried. Lifecycle events never carry a phone number or the message "
    "text."
)

_COMMANDS = {
    "followup.requested": "Schedule one follow-up.",
    "followup.cancel_requested": "Cancel a follow-up (by id or idempotency key); ends a series.",
    "followup.reschedule_requested": "Move a follow-up to a new time; only the new time fires.",
    "followup.response_received": (
        "A contractor's reply; an opt-out word cancels their pending follow-ups."
    ),
    "followup.delivery_reported": (
        "The SMS provider's report on one occurrence (by its send key); feeds the adaptive send"
        " rate."
    ),
}
_EVENTS = {
    "followup.scheduled": "A request was recorded and its timers armed.",
    "followup.sent": "The SMS webhook accepted the message.",
    "followup.skipped": "Not sent, on purpose (`reason`: action item done, opted out, ...).",
    "followup.cancelled": "Cancelled before it was sent.",
    "followup.failed": "Not sent after every attempt, or a permanent error (`reason`).",
    "followup.response_recorded": "A reply was recorded on the follow-up.",
    "followup.delivery_recorded": (
        "A delivery report was recorded (`delivery_status`, `error_code`)."
    ),
    "followup.send_rate_changed": (
        "The adaptive send rate changed (`limit_per_minute`, `cause`); the follow-up is the one"
        " whose report or 429 changed it."
    ),
}


def _camel(routing_key: str) -> str:
    return "".join(part.capitalize() for part in routing_key.replace("_", ".").split("."))


def _event_model(name: str) -> type[BaseModel]:
    # One model per event, so each message in the catalogue shows its own `event` value.
    model: type[BaseModel] = create_model(
        _camel(name), __base__=LifecycleEvent, event=(cast(Any, Literal[name]), ...)
    )
    return model


def _subscriber(model: type[BaseModel]) -> Any:
    async def handle(body: Any) -> None:
        """Documentation only: never called."""

    handle.__annotations__ = {"body": model, "return": None}
    return handle


def build_broker() -> RabbitBroker:
    broker = RabbitBroker("amqp://rabbitmq:5672/")
    exchange = RabbitExchange(PUBLIC_EXCHANGE, type=ExchangeType.TOPIC, durable=True)
    for routing_key, summary in _COMMANDS.items():
        queue = RabbitQueue(SCHEDULER_INBOX.name, routing_key=routing_key, declare=False)
        broker.subscriber(queue, exchange, title=routing_key, description=summary)(
            _subscriber(INBOUND[routing_key])
        )
    events = get_args(LifecycleEvent.model_fields["event"].annotation)
    for name in events:
        broker.publisher(
            routing_key=name,
            exchange=exchange,
            schema=_event_model(name),
            title=name,
            description=_EVENTS.get(name, ""),
        )
    return broker


def catalogue(version: str) -> dict[str, Any]:
    spec = AsyncAPI(
        build_broker(),
        title=TITLE,
        version=version,
        description=DESCRIPTION,
        schema_version="3.0.0",
    )
    document: dict[str, Any] = spec.to_specification().to_jsonable()
    _publish_side(document)
    _cross_field_rules(document)
    _examples(document)
    return document


# FastStream describes a subscriber by its queue and a publisher as mandatory, transient
# messages. A publisher reading the catalogue needs the other side: the exchange and routing key
# to publish to, and the properties the services really use.
_EXCHANGE_BINDING = {
    "amqp": {
        "bindingVersion": "0.3.0",
        "is": "routingKey",
        "exchange": {
            "name": PUBLIC_EXCHANGE,
            "type": "topic",
            "durable": True,
            "autoDelete": False,
            "vhost": "/",
        },
    }
}
_COMMAND_OPERATION = (
    "Publish on exchange `{exchange}` with routing key `{key}`: content type "
    "application/json, persistent (deliveryMode 2), on a channel with publisher confirms. "
    "`mandatory` is the publisher's choice: set, a command that no queue is bound for (topology "
    "not declared yet) comes back instead of being dropped; the project's CLI publishes without "
    "it. A command that fails validation is acked and a copy goes to queue `{dlq}` with headers "
    "`x-error-rule` and `x-error-reason`; it is never retried."
)
_EVENT_OPERATION = (
    "Published on exchange `{exchange}` with routing key `{key}`, persistent (deliveryMode 2), "
    "confirmed, and not mandatory: an event that no queue is bound for is dropped. Bind a queue "
    "of your own to this routing key to receive it."
)


def _publish_side(document: dict[str, Any]) -> None:
    for name, channel in document["channels"].items():
        channel["bindings"] = json.loads(json.dumps(_EXCHANGE_BINDING))
        operation = document["operations"][name]
        operation["bindings"]["amqp"].update(deliveryMode=2, mandatory=False)
        template = _COMMAND_OPERATION if name in _COMMANDS else _EVENT_OPERATION
        if name in _COMMANDS:
            channel["description"] += (
                f" The scheduler consumes it from queue `{SCHEDULER_INBOX.name}`."
            )
        operation["description"] = template.format(
            exchange=PUBLIC_EXCHANGE, key=name, dlq=SCHEDULER_INBOX.dead_letter_queue
        )


def _present(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """`field` is there and not null."""
    return {"required": [field], "properties": {field: {**schema}}}


# Rules the models check across fields, which the generated JSON schemas cannot show.
_BY_REFERENCE = {
    "description": "Names the follow-up by exactly one of `followup_id` or `idempotency_key`.",
    "oneOf": [
        _present("followup_id", {"type": "integer"}),
        _present("idempotency_key", {"type": "string"}),
    ],
}
_RULES: dict[str, dict[str, Any]] = {
    "followup.requested": {
        "description": (
            "`skip_if_completed: true` needs `action_item_id`; `is_recurring: true` needs "
            "`recurrence_interval_days`. Placeholders in `message_template` that come from an "
            "action item or an event need `action_item_id` or `event_id`."
        ),
        "allOf": [
            {
                "if": {
                    "required": ["skip_if_completed"],
                    "properties": {"skip_if_completed": {"const": True}},
                },
                "then": _present("action_item_id", {"type": "integer"}),
            },
            {
                "if": {
                    "required": ["is_recurring"],
                    "properties": {"is_recurring": {"const": True}},
                },
                "then": _present("recurrence_interval_days", {"type": "integer"}),
            },
        ],
    },
    "followup.cancel_requested": _BY_REFERENCE,
    "followup.reschedule_requested": _BY_REFERENCE,
    "followup.response_received": {
        "description": "Names the contractor by `contractor_id` or `phone` (E.164), or both.",
        "anyOf": [
            _present("contractor_id", {"type": "integer"}),
            _present("phone", {"type": "string"}),
        ],
    },
}


def _cross_field_rules(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for routing_key, rules in _RULES.items():
        if routing_key in INBOUND:
            schemas[INBOUND[routing_key].__name__].update(json.loads(json.dumps(rules)))


_COMMAND_EXAMPLES: dict[str, dict[str, Any]] = {
    "followup.requested": {
        "idempotency_key": "crm-visit-8812-reminder",
        "contractor_id": 42,
        "scheduled_time": "2027-03-01T09:00:00-05:00",
        "followup_type": "action_item_reminder",
        "message_template": "Hi {first_name}, a reminder about {action_item}.",
        "message_tone": "friendly",
        "action_item_id": 7,
        "event_id": None,
        "ai_should_personalize": True,
        "ai_context_hints": {"last_topic": "roof inspection"},
        "skip_if_completed": True,
        "is_recurring": True,
        "recurrence_interval_days": 7,
        "priority": 5,
        "requested_by": "ai_concierge",
    },
    "followup.cancel_requested": {
        "idempotency_key": "crm-visit-8812-reminder",
        "reason": "visit cancelled",
    },
    "followup.reschedule_requested": {
        "followup_id": 1234,
        "scheduled_time": "2027-03-02T09:00:00-05:00",
    },
    "followup.response_received": {
        "phone": "+15555550123",
        "text": "Thanks, see you Tuesday",
        "received_at": "2027-03-01T14:03:12Z",
    },
    "followup.delivery_reported": {
        "idempotency_key": "5f0b6c1e-2f36-4d8e-9a51-0c7d2b8f4e11",
        "status": "undelivered",
        "error_code": "30007",
        "provider": "twilio",
        "reported_at": "2027-03-01T14:00:04Z",
    },
}
_EVENT_DETAILS: dict[str, dict[str, Any]] = {
    "followup.scheduled": {"status": "scheduled"},
    "followup.sent": {"status": "sent", "attempts": 1, "lateness_ms": 12.4},
    "followup.skipped": {"status": "skipped", "reason": "action_item_completed"},
    "followup.cancelled": {"status": "cancelled", "reason": "visit cancelled"},
    "followup.failed": {"status": "failed", "reason": "http_400", "attempts": 1},
    "followup.response_recorded": {"status": "sent"},
    "followup.delivery_recorded": {
        "status": "sent",
        "delivery_status": "undelivered",
        "error_code": "30007",
    },
    "followup.send_rate_changed": {
        "status": "sent",
        "limit_per_minute": 5,
        "previous_limit_per_minute": 10,
        "cause": "error_code 30007",
    },
}


def _event_example(name: str) -> dict[str, Any]:
    return {
        "event": name,
        "followup_id": 1234,
        "contractor_id": 42,
        "followup_type": "action_item_reminder",
        "occurred_at": "2027-03-01T14:00:00.012000Z",
        "scheduled_time": "2027-03-01T14:00:00Z",
        "requested_by": "ai_concierge",
        **_EVENT_DETAILS.get(name, {"status": "scheduled"}),
    }


def _examples(document: dict[str, Any]) -> None:
    for message in document["components"]["messages"].values():
        name = message["title"].split(":")[0]
        payload = _COMMAND_EXAMPLES[name] if name in _COMMANDS else _event_example(name)
        message["examples"] = [{"name": name.replace(".", "_"), "payload": payload}]


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
