"""`relion-gateway serve`: the API under gunicorn (or Werkzeug's server with --dev)."""
from __future__ import annotations

import logging
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


@click.command("serve")
@click.option("--host", default=None, help="bind address (default: [server] host)")
@click.option("--port", type=int, default=None, help="port (default: [server] port, 9012)")
@click.option("--workers", type=int, default=2, show_default=True, help="gunicorn worker processes")
@click.option("--dev", is_flag=True, help="Werkzeug's single-process server instead of gunicorn")
def serve_command(host: str | None, port: int | None, workers: int, dev: bool) -> None:
    """Serve the REST API."""
    config = build_config()
    host = host or config["SERVER_HOST"]
    port = port or int(config["SERVER_PORT"])
    if dev:
        from gateway import create_app

        create_app().run(host=host, port=port, threaded=True)
        return
    _gunicorn_app(
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": 4,
            "timeout": 120,
            "accesslog": "-",
        }
    ).run()
