"""`relion-gateway serve`: the API under gunicorn (or Werkzeug's server with --dev).

Every worker builds its own app (and poller thread); the poller lease in the store lets only one
of them poll, so the deployment polls once whatever the number of workers.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from gateway.config import build_config

log = logging.getLogger(__name__)


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

        create_app().run(host=host, port=port, threaded=True)
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
        }
    ).run()
