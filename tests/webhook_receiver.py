"""A webhook endpoint for tests: a real HTTP server on loopback that records what it is sent."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook as Verifier


class Receiver:
    """An HTTP endpoint on loopback that records what it is sent and answers with ``self.status``."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status = 204
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """Every body received, each checked against its Standard Webhooks signature (raises if one fails)."""
        verifier = Verifier(secret)
        return [verifier.verify(body.decode(), headers) for headers, body in list(self.received)]

    def by_event(self) -> dict[int, dict[str, Any]]:
        """One body per event (retries of a message collapse, as a receiver de-duplicating on webhook-id would)."""
        return {body["data"]["event_id"]: body for body in self.bodies()}
