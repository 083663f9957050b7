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
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
