"""A stand-in for the n8n SMS webhook in docker compose: prints each call and answers 200.

Standard library only. Phone numbers are masked; nothing is sent anywhere.
Reply with another status to try the dispatcher's retries: SINK_STATUS=503.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def mask(phone: str) -> str:
    digits = [c for c in phone if c.isdigit()]
    return "+" + "*" * max(len(digits) - 2, 0) + "".join(digits[-2:])


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            call = {}
        status = int(os.environ.get("SINK_STATUS", "200"))
        line = {
            "sink": "NOT SENT",
            "status": status,
            "followup_id": call.get("followup_id"),
            "phone": mask(str(call.get("phone", ""))),
            "scheduled_time": call.get("scheduled_time"),
            "idempotency_key": self.headers.get("Idempotency-Key"),
            "signed": "webhook-signature" in self.headers,
            "message": call.get("message"),
        }
        print(json.dumps(line), flush=True)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format: str, *args: object) -> None:
        """Each call is printed once, by do_POST."""


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = ThreadingHTTPServer(("0.0.0.0", port), Sink)  # noqa: S104 (inside its container)
    print(f"webhook sink on :{port}; nothing is sent", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
