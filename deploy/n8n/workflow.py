"""Writes followups-gateway.json, the n8n workflow, from the code nodes' JavaScript in code/ and
the SQL below (README beside this file). `make docs` runs it; a unit test fails when the
committed file is behind.

    python -m deploy.n8n.workflow --out deploy/n8n/followups-gateway.json
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKFLOW_FILE = HERE / "followups-gateway.json"
CODE = HERE / "code"
SCHEMA_FILE = HERE / "schema.sql"

NAME = "followups SMS gateway"
SMS_PATH = "followups-sms"
STATUS_PATH = "followups-sms-status"
PUBLIC_EXCHANGE = "followups"
DELIVERY_REPORTED = "followup.delivery_reported"
# How long a key is kept: far longer than the dispatcher retries one occurrence.
KEEP_KEYS = "30 days"

# Credentials are referenced by these ids and names; the secrets themselves live in n8n.
CREDENTIALS = {
    "twilioApi": {"id": "followupsTwilio1", "name": "Twilio (followups)"},
    "postgres": {"id": "followupsGateDb1", "name": "Gateway PostgreSQL"},
    "rabbitmq": {"id": "followupsRabbit1", "name": "RabbitMQ (followups)"},
}

# One statement on the primary key: of concurrent calls with one key exactly one inserts, and
# reads "claimed"; the others read the row's state, or nothing yet if the winner committed
# while the statement ran ("contended").
CLAIM_SQL = """\
WITH claimed AS (
    INSERT INTO followups_gateway_sends (idempotency_key, state)
    VALUES ($1, 'sending')
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING 'claimed'::text AS claim)
SELECT COALESCE(
    (SELECT claim FROM claimed),
    (SELECT state FROM followups_gateway_sends WHERE idempotency_key = $1),
    'contended') AS claim"""

MARK_SENT_SQL = """\
UPDATE followups_gateway_sends SET state = 'sent', message_sid = $2, settled_at = now()
WHERE idempotency_key = $1
RETURNING idempotency_key, message_sid"""

# "release" drops the claim (Twilio did not take the SMS, a retry may send); "unknown" keeps it.
SETTLE_SQL = """\
WITH released AS (
    DELETE FROM followups_gateway_sends
    WHERE idempotency_key = $1 AND state = 'sending' AND $2 = 'release')
UPDATE followups_gateway_sends SET state = 'unknown', settled_at = now()
WHERE idempotency_key = $1 AND state = 'sending' AND $2 = 'unknown'"""

PRUNE_SQL = f"""\
DELETE FROM followups_gateway_sends WHERE claimed_at < now() - interval '{KEEP_KEYS}'"""

VERIFIED = "$('Verify signature').first().json"
REFUSAL = "$('Provider refusal').first().json"


def _id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"followups-gateway/{name}"))


def _node(
    name: str, kind: str, version: float, position: tuple[int, int], parameters: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": _id(name),
        "name": name,
        "type": kind,
        "typeVersion": version,
        "position": list(position),
        "parameters": parameters,
    }


def _code(name: str, file: str, position: tuple[int, int]) -> dict[str, Any]:
    source = (CODE / file).read_text()
    return _node(
        name,
        "n8n-nodes-base.code",
        2,
        position,
        {"mode": "runOnceForAllItems", "jsCode": source},
    )


def _webhook(name: str, path: str, position: tuple[int, int], raw: bool) -> dict[str, Any]:
    node = _node(
        name,
        "n8n-nodes-base.webhook",
        2,
        position,
        {
            "httpMethod": "POST",
            "path": path,
            "responseMode": "responseNode",
            "options": {"rawBody": True} if raw else {},
        },
    )
    node["webhookId"] = _id(f"webhook/{path}")
    return node


def _postgres(name: str, sql: str, values: str, position: tuple[int, int]) -> dict[str, Any]:
    options = {"queryReplacement": values} if values else {}
    node = _node(
        name,
        "n8n-nodes-base.postgres",
        2.6,
        position,
        {"operation": "executeQuery", "query": sql, "options": options},
    )
    node["credentials"] = {"postgres": CREDENTIALS["postgres"]}
    # An item always goes on, so the caller always gets an answer.
    node["alwaysOutputData"] = True
    return node


def _if(
    name: str, left: str, operator: dict[str, Any], right: Any, position: tuple[int, int]
) -> dict[str, Any]:
    return _node(
        name,
        "n8n-nodes-base.if",
        2.2,
        position,
        {
            "conditions": {
                "options": {
                    "caseSensitive": True,
                    "leftValue": "",
                    "typeValidation": "strict",
                    "version": 2,
                },
                "conditions": [
                    {
                        "id": _id(f"{name}/condition"),
                        "leftValue": left,
                        "rightValue": right,
                        "operator": operator,
                    }
                ],
                "combinator": "and",
            },
            "options": {},
        },
    )


def _respond(
    name: str,
    position: tuple[int, int],
    code: str | int,
    body: str | None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    options: dict[str, Any] = {"responseCode": code}
    if headers:
        options["responseHeaders"] = {
            "entries": [{"name": k, "value": v} for k, v in headers.items()]
        }
    parameters: dict[str, Any] = (
        {"respondWith": "json", "responseBody": body}
        if body is not None
        else {"respondWith": "noData"}
    )
    parameters["options"] = options
    return _node(name, "n8n-nodes-base.respondToWebhook", 1.5, position, parameters)


def _nodes() -> list[dict[str, Any]]:
    twilio = _node(
        "Send SMS",
        "n8n-nodes-base.twilio",
        1,
        (1540, 200),
        {
            "resource": "sms",
            "operation": "send",
            "from": "={{ $env.FOLLOWUPS_TWILIO_FROM }}",
            "to": "={{ $json.phone }}",
            "message": "={{ $json.message }}",
            "options": {"statusCallback": "={{ $json.status_callback }}"},
        },
    )
    twilio["credentials"] = {"twilioApi": CREDENTIALS["twilioApi"]}
    # Never "Retry On Fail" here: a retry after a timeout could send the SMS twice.
    twilio["onError"] = "continueErrorOutput"

    publish = _node(
        "Publish delivery report",
        "n8n-nodes-base.rabbitmq",
        1.1,
        (1100, 700),
        {
            "operation": "sendMessage",
            "mode": "exchange",
            "exchange": PUBLIC_EXCHANGE,
            "exchangeType": "topic",
            "routingKey": DELIVERY_REPORTED,
            "sendInputData": False,
            "message": "={{ JSON.stringify($json.report) }}",
            # Passed to amqplib's publish as they are: a persistent JSON message.
            "options": {
                "arguments": {
                    "argument": [
                        {"key": "contentType", "value": "application/json"},
                        {"key": "persistent", "value": "true"},
                    ]
                }
            },
        },
    )
    publish["credentials"] = {"rabbitmq": CREDENTIALS["rabbitmq"]}

    return [
        _webhook("SMS webhook", SMS_PATH, (0, 300), raw=True),
        _code("Verify signature", "verify_webhook.js", (220, 300)),
        _if(
            "Signed?",
            "={{ $json.accepted }}",
            {"type": "boolean", "operation": "true", "singleValue": True},
            "",
            (440, 300),
        ),
        _respond(
            "Refuse call", (660, 460), "={{ $json.status }}", "={{ JSON.stringify($json.answer) }}"
        ),
        _postgres(
            "Claim Idempotency-Key", CLAIM_SQL, f"={{{{ {VERIFIED}.idempotency_key }}}}", (660, 200)
        ),
        _code("Route claim", "route_claim.js", (880, 200)),
        _if(
            "First claim?",
            "={{ $json.action }}",
            {"type": "string", "operation": "equals"},
            "send",
            (1100, 200),
        ),
        _respond(
            "Answer repeated key",
            (1320, 400),
            "={{ $json.status }}",
            "={{ JSON.stringify($json.answer) }}",
            {"Retry-After": "={{ $json.retry_after || '' }}"},
        ),
        twilio,
        _postgres(
            "Mark sent",
            MARK_SENT_SQL,
            f"={{{{ {VERIFIED}.idempotency_key }}}},{{{{ $json.sid }}}}",
            (1760, 100),
        ),
        _respond(
            "Accepted",
            (1980, 100),
            200,
            "={{ JSON.stringify({ outcome: 'sent', message_sid: $json.message_sid }) }}",
        ),
        _code("Provider refusal", "provider_refusal.js", (1760, 320)),
        _postgres(
            "Settle claim",
            SETTLE_SQL,
            "={{ $json.idempotency_key }},{{ $json.settle }}",
            (1980, 320),
        ),
        _respond(
            "Answer refusal",
            (2200, 320),
            f"={{{{ {REFUSAL}.status }}}}",
            f"={{{{ JSON.stringify({REFUSAL}.answer) }}}}",
            {"Retry-After": f"={{{{ {REFUSAL}.retry_after }}}}"},
        ),
        _webhook("Twilio status callback", STATUS_PATH, (0, 700), raw=False),
        _code("Verify Twilio signature", "status_callback.js", (220, 700)),
        _node(
            "Route callback",
            "n8n-nodes-base.switch",
            3.2,
            (440, 700),
            {
                "mode": "expression",
                "numberOutputs": 3,
                "output": "={{ { refuse: 0, ignore: 1, publish: 2 }[$json.action] }}",
                "options": {},
            },
        ),
        _respond("Refuse callback", (880, 560), 403, None),
        publish,
        _respond("Acknowledge", (1320, 760), 204, None),
        _node(
            "Every day",
            "n8n-nodes-base.scheduleTrigger",
            1.2,
            (0, 1000),
            {"rule": {"interval": [{"field": "days", "triggerAtHour": 4}]}},
        ),
        _postgres("Forget old keys", PRUNE_SQL, "", (220, 1000)),
    ]


# (from, output index) -> to
_EDGES: list[tuple[str, int, str]] = [
    ("SMS webhook", 0, "Verify signature"),
    ("Verify signature", 0, "Signed?"),
    ("Signed?", 0, "Claim Idempotency-Key"),
    ("Signed?", 1, "Refuse call"),
    ("Claim Idempotency-Key", 0, "Route claim"),
    ("Route claim", 0, "First claim?"),
    ("First claim?", 0, "Send SMS"),
    ("First claim?", 1, "Answer repeated key"),
    ("Send SMS", 0, "Mark sent"),
    ("Send SMS", 1, "Provider refusal"),
    ("Mark sent", 0, "Accepted"),
    ("Provider refusal", 0, "Settle claim"),
    ("Settle claim", 0, "Answer refusal"),
    ("Twilio status callback", 0, "Verify Twilio signature"),
    ("Verify Twilio signature", 0, "Route callback"),
    ("Route callback", 0, "Refuse callback"),
    ("Route callback", 1, "Acknowledge"),
    ("Route callback", 2, "Publish delivery report"),
    ("Publish delivery report", 0, "Acknowledge"),
    ("Every day", 0, "Forget old keys"),
]


def _connections() -> dict[str, Any]:
    connections: dict[str, Any] = {}
    for source, output, target in _EDGES:
        outputs = connections.setdefault(source, {"main": []})["main"]
        while len(outputs) <= output:
            outputs.append([])
        outputs[output].append({"node": target, "type": "main", "index": 0})
    return connections


def workflow() -> dict[str, Any]:
    return {
        "id": "followupsGateway",
        "name": NAME,
        "active": False,
        "nodes": _nodes(),
        "connections": _connections(),
        "settings": {
            "executionOrder": "v1",
            # An execution holds the phone number and the text: keep only failed ones.
            "saveDataSuccessExecution": "none",
            "saveManualExecutions": False,
        },
        "pinData": {},
    }


def workflow_text() -> str:
    return json.dumps(workflow(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WORKFLOW_FILE)
    args = parser.parse_args()
    args.out.write_text(workflow_text())


if __name__ == "__main__":
    main()
