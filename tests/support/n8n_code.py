"""Runs the n8n workflow's code nodes (deploy/n8n/code/*.js) under the machine's node, as n8n's
Code node runs them (tests/support/n8n_code_node.js)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploy.n8n.workflow import CODE

RUNNER = Path(__file__).with_name("n8n_code_node.js")


class CodeNodeError(Exception):
    """The node threw: n8n ends the execution with this error (the webhook answers 500)."""


def item(json_data: dict[str, Any], raw_body: bytes | None = None) -> dict[str, Any]:
    """An n8n item; `raw_body` as the Webhook node's Raw Body option stores it."""
    made: dict[str, Any] = {"json": json_data}
    if raw_body is not None:
        made["binary"] = {
            "data": {"data": base64.b64encode(raw_body).decode(), "mimeType": "application/json"}
        }
    return made


def run_code_node(
    file: str,
    items: list[dict[str, Any]],
    env: dict[str, str],
    nodes: dict[str, list[dict[str, Any]]] | None = None,
    allow: tuple[str, ...] = ("crypto",),
) -> list[dict[str, Any]]:
    """The node's output items' json; `allow` is NODE_FUNCTION_ALLOW_BUILTIN."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("the n8n code nodes need node on PATH (Debian: apt-get install nodejs)")
    call = {"file": str(CODE / file), "items": items, "nodes": nodes or {}, "env": env}
    call["allow"] = list(allow)
    done = subprocess.run(
        [node, str(RUNNER)],
        input=json.dumps(call),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout)
    if "error" in result:
        raise CodeNodeError(result["error"])
    return [output["json"] for output in result["items"]]
