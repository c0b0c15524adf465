"""`relion-gateway serve`: the API under gunicorn (or Werkzeug's server with --dev).

Every worker builds its own app (and poller thread); the poller lease in the store lets only one
of them poll, so the deployment polls once whatever the number of workers.

Both servers answer what they refuse themselves (a request line or headers past their limits,
a malformed request) in the gateway's one JSON error shape instead of their HTML pages. Their
limits are set above the gateway's own (gateway/api/errors.py: URI, headers, body), which the
gateway enforces first, so the numbers a client meets are the same under either server.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from gateway.api.errors import MAX_HEADER_BYTES, MAX_HEADER_FIELDS, error_json
from gateway.config import build_config

log = logging.getLogger(__name__)

# gunicorn's ceiling for a request line (it clamps anything higher to this; 0 would mean no limit
# at all with its pure-Python parser). The gateway's URI limit plus a method and the version fits
# (MAX_URI_BYTES is chosen for that; tests/unit/test_http_limits.py checks it).
GUNICORN_REQUEST_LINE = 8190
# Above the gateway's header limits, so a request within gunicorn's reaches the gateway's 431.
GUNICORN_FIELD_SIZE = 2 * MAX_HEADER_BYTES
GUNICORN_FIELDS = 2 * MAX_HEADER_FIELDS


def _write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error, in the one error shape (gunicorn has no hook for its error page)."""
    from gunicorn import util

    body = error_json(status_int, str(mesg) or reason, status=reason)
    head = f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    util.write_nonblock(sock, head.encode("latin-1") + body)


def _json_error_pages() -> None:
    # Workers are forked from this process after this, and call util.write_error for every request
    # they refuse before it reaches the app (414, 431, 400 on a malformed request line, ...).
    from gunicorn import util

    util.write_error = _write_json_error


def _dev_request_handler() -> Any:
    from werkzeug.serving import WSGIRequestHandler

    class JSONErrorRequestHandler(WSGIRequestHandler):
        """Werkzeug's handler with http.server's own refusals (414, 431, 400) in the one error shape."""

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            reason = self.responses.get(code, ("Error", ""))[0]
            body = error_json(code, message or reason, status=reason)
            self.log_error("code %d, message %s", code, message)
            self.send_response(code, reason)
            self.send_header("Connection", "close")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return JSONErrorRequestHandler


def _gunicorn_app(options: dict[str, Any]) -> Any:
    from gunicorn.app.base import BaseApplication

    class GatewayApplication(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from gateway import create_app

            return create_app()

    return GatewayApplication()


def _child_exit(server: Any, worker: Any) -> None:
    # prometheus_client's multiprocess mode: forget a dead worker's live gauges.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _json_logs(config: dict[str, Any]) -> None:
    if config["SERVER_JSON_LOGS"]:
        from gateway.observability import configure_json_logging

        configure_json_logging()


@click.command("serve")
@click.option("--host", default=None, help="bind address (default: [server] host)")
@click.option("--port", type=int, default=None, help="port (default: [server] port, 9012)")
@click.option("--workers", type=int, default=None, help="gunicorn worker processes (default: [server] workers)")
@click.option("--dev", is_flag=True, help="Werkzeug's single-process server instead of gunicorn")
def serve_command(host: str | None, port: int | None, workers: int | None, dev: bool) -> None:
    """Serve the REST API."""
    config = build_config()
    host = host or config["SERVER_HOST"]
    port = port or int(config["SERVER_PORT"])
    if dev:
        _json_logs(config)
        from gateway import create_app

        create_app().run(host=host, port=port, threaded=True, request_handler=_dev_request_handler())
        return
    # Metrics from every worker, summed at scrape time; the directory must be empty at start.
    metrics_dir = Path(config["PATHS_STATE_DIR"]) / f"metrics-{port}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    # Must be set before gateway.observability is imported anywhere (it fixes the value store then).
    if "gateway.observability" in sys.modules:
        raise click.ClickException("internal: metrics were created before multiprocess mode was chosen")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    _json_logs(config)
    _json_error_pages()
    _gunicorn_app(
        {
            "bind": f"{host}:{port}",
            "workers": workers or int(config["SERVER_WORKERS"]),
            "threads": int(config["SERVER_THREADS"]),
            "worker_class": "gthread",
            "timeout": int(config["SERVER_TIMEOUT"]),
            "graceful_timeout": 30,
            "accesslog": "-" if config["SERVER_ACCESS_LOG"] else None,
            "child_exit": _child_exit,
            "limit_request_line": GUNICORN_REQUEST_LINE,
            "limit_request_field_size": GUNICORN_FIELD_SIZE,
            "limit_request_fields": GUNICORN_FIELDS,
        }
    ).run()
