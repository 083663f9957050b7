"""deploy/n8n/followups-gateway.json: written from its sources, wired as its README says, and
holding no secret."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from deploy.n8n.workflow import (
    CODE,
    CREDENTIALS,
    DELIVERY_REPORTED,
    SMS_PATH,
    STATUS_PATH,
    WORKFLOW_FILE,
    workflow_text,
)
from shared.schemas import INBOUND
from shared.topology import PUBLIC_EXCHANGE

README = WORKFLOW_FILE.with_name("README.md")


@pytest.fixture(scope="module")
def flow() -> dict[str, Any]:
    return json.loads(WORKFLOW_FILE.read_text())


def nodes(flow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in flow["nodes"]}


def outputs(flow: dict[str, Any], name: str) -> list[list[str]]:
    """The nodes each output of `name` leads to, output by output."""
    return [
        [edge["node"] for edge in output]
        for output in flow["connections"].get(name, {"main": []})["main"]
    ]


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def test_the_committed_workflow_is_written_from_its_sources():
    assert WORKFLOW_FILE.read_text() == workflow_text(), (
        "deploy/n8n/followups-gateway.json is out of date with deploy/n8n/code and workflow.py: "
        "run `make docs` and commit it"
    )


def test_every_code_node_runs_one_file_of_code(flow):
    code_nodes = [n for n in flow["nodes"] if n["type"] == "n8n-nodes-base.code"]
    sources = {path.read_text() for path in CODE.glob("*.js")}
    assert {n["parameters"]["jsCode"] for n in code_nodes} == sources
    assert all(n["parameters"]["mode"] == "runOnceForAllItems" for n in code_nodes)


def test_the_webhooks_take_posts_and_answer_from_respond_nodes(flow):
    by_name = nodes(flow)
    sms, status = by_name["SMS webhook"], by_name["Twilio status callback"]
    assert (sms["parameters"]["path"], status["parameters"]["path"]) == (SMS_PATH, STATUS_PATH)
    for hook in (sms, status):
        assert hook["type"] == "n8n-nodes-base.webhook"
        assert hook["parameters"]["httpMethod"] == "POST"
        assert hook["parameters"]["responseMode"] == "responseNode"
        assert re.fullmatch(r"[0-9a-f-]{36}", hook["webhookId"])
    # The signature is over the bytes received.
    assert sms["parameters"]["options"] == {"rawBody": True}
    webhook_ids = [n["webhookId"] for n in flow["nodes"] if "webhookId" in n]
    assert len(set(webhook_ids)) == len(webhook_ids)


def test_the_sms_path_verifies_claims_sends_and_settles(flow):
    assert outputs(flow, "SMS webhook") == [["Verify signature"]]
    assert outputs(flow, "Verify signature") == [["Signed?"]]
    assert outputs(flow, "Signed?") == [["Claim Idempotency-Key"], ["Refuse call"]]
    assert outputs(flow, "Claim Idempotency-Key") == [["Route claim"]]
    assert outputs(flow, "Route claim") == [["First claim?"]]
    assert outputs(flow, "First claim?") == [["Send SMS"], ["Answer repeated key"]]
    # Output 0: Twilio took it; output 1: the node's error output.
    assert outputs(flow, "Send SMS") == [["Mark sent"], ["Provider refusal"]]
    assert outputs(flow, "Mark sent") == [["Accepted"]]
    assert outputs(flow, "Provider refusal") == [["Settle claim"]]
    assert outputs(flow, "Settle claim") == [["Answer refusal"]]


def test_the_callback_path_verifies_and_publishes_final_statuses(flow):
    assert outputs(flow, "Twilio status callback") == [["Verify Twilio signature"]]
    assert outputs(flow, "Verify Twilio signature") == [["Route callback"]]
    assert outputs(flow, "Route callback") == [
        ["Refuse callback"],
        ["Acknowledge"],
        ["Publish delivery report"],
    ]
    assert outputs(flow, "Publish delivery report") == [["Acknowledge"]]
    route = nodes(flow)["Route callback"]["parameters"]
    assert (route["mode"], route["numberOutputs"]) == ("expression", 3)
    assert nodes(flow)["Refuse callback"]["parameters"]["options"]["responseCode"] == 403


def test_every_path_from_a_webhook_ends_in_an_answer(flow):
    by_name = nodes(flow)
    for start in ("SMS webhook", "Twilio status callback"):
        pending, seen = [start], set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            following = [target for output in outputs(flow, name) for target in output]
            if not following:
                assert by_name[name]["type"] == "n8n-nodes-base.respondToWebhook", name
            pending.extend(following)


def test_the_twilio_node_sends_once_with_a_status_callback(flow):
    twilio = nodes(flow)["Send SMS"]
    assert twilio["type"] == "n8n-nodes-base.twilio"
    assert twilio["parameters"]["operation"] == "send"
    assert twilio["parameters"]["to"] == "={{ $json.phone }}"
    assert twilio["parameters"]["options"]["statusCallback"] == "={{ $json.status_callback }}"
    assert twilio["onError"] == "continueErrorOutput"
    # A retry inside n8n after a timeout could send the SMS twice.
    assert not any(node.get("retryOnFail") for node in flow["nodes"])


def test_the_report_goes_to_the_public_exchange_as_the_command(flow):
    publish = nodes(flow)["Publish delivery report"]
    parameters = publish["parameters"]
    assert publish["type"] == "n8n-nodes-base.rabbitmq"
    assert (parameters["mode"], parameters["exchangeType"]) == ("exchange", "topic")
    assert parameters["exchange"] == PUBLIC_EXCHANGE
    assert parameters["routingKey"] == DELIVERY_REPORTED
    assert DELIVERY_REPORTED in INBOUND
    assert parameters["sendInputData"] is False
    publish_options = {a["key"]: a["value"] for a in parameters["options"]["arguments"]["argument"]}
    assert publish_options == {"contentType": "application/json", "persistent": "true"}


def test_each_query_gets_as_many_values_as_it_has_placeholders(flow):
    for node in flow["nodes"]:
        if node["type"] != "n8n-nodes-base.postgres":
            continue
        query = node["parameters"]["query"]
        placeholders = {int(n) for n in re.findall(r"\$(\d+)", query)}
        values = node["parameters"]["options"].get("queryReplacement", "")
        given = len(re.findall(r"\{\{.*?\}\}", values))
        assert placeholders == set(range(1, given + 1)), node["name"]
        # The query text itself is never an expression: values go in as parameters only.
        assert "{{" not in query
        assert node["alwaysOutputData"] is True


def test_credentials_are_references_and_no_secret_is_in_the_file(flow):
    referenced = [n["credentials"] for n in flow["nodes"] if "credentials" in n]
    for credentials in referenced:
        for kind, reference in credentials.items():
            assert reference == CREDENTIALS[kind]
    text = WORKFLOW_FILE.read_text()
    assert not re.search(r"whsec_[A-Za-z0-9+/]{8,}", text)  # a signing secret
    assert not re.search(r"\bAC[0-9a-f]{32}\b", text)  # a Twilio Account SID
    assert not re.search(r"\b[0-9a-f]{32}\b", text)  # an Auth Token
    assert not re.search(r"amqps?://|postgres(ql)?://", text)
    for value in strings(flow):
        assert "password" not in value.lower(), value


def test_the_readme_names_every_environment_variable_and_credential(flow):
    readme = README.read_text()
    used = set(re.findall(r"\$env\.([A-Z0-9_]+)", WORKFLOW_FILE.read_text()))
    assert used == {
        "FOLLOWUPS_WEBHOOK_SECRET",
        "FOLLOWUPS_TWILIO_AUTH_TOKEN",
        "FOLLOWUPS_TWILIO_FROM",
        "FOLLOWUPS_STATUS_CALLBACK_URL",
    }
    for name in used | {"N8N_BLOCK_ENV_ACCESS_IN_NODE", "NODE_FUNCTION_ALLOW_BUILTIN"}:
        assert f"`{name}" in readme, name
    for reference in CREDENTIALS.values():
        assert reference["name"] in readme
    for node in flow["nodes"]:
        assert f"**{node['name']}**" in readme, node["name"]


def test_executions_that_succeed_are_not_kept(flow):
    # An execution holds the phone number and the text.
    assert flow["settings"]["saveDataSuccessExecution"] == "none"
    assert flow["settings"]["saveManualExecutions"] is False
    assert flow["active"] is False
