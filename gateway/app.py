"""The Flask application factory: config layers, services in app.extensions, the API blueprint."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask
from flask_smorest import Api

from gateway import __version__
from gateway.callbacks import load_or_create_secret
from gateway.config import build_config
from gateway.storage.s3 import S3Storage, make_s3_client
from gateway.poller import Poller
from gateway.scripts.render import ScriptRenderer
from gateway.service import JobService
from gateway.slurm.backend import SchedulerBackend
from gateway.slurm.factory import make_scheduler
from gateway.store import JobStore, make_engine

log = logging.getLogger(__name__)

EXTENSION_KEY = "relion_gateway"
POLLER_KEY = "relion_gateway_poller"


def create_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    scheduler: SchedulerBackend | None = None,
    store: JobStore | None = None,
    storage: S3Storage | None = None,
) -> Flask:
    """Build an app; nothing is bound at import time, so each test gets a fresh one."""
    app = Flask(__name__)
    config = build_config(overrides)
    app.config.update(config)
    base = config["SERVER_BASE_PATH"].rstrip("/")
    app.config.update(
        API_TITLE="relion-gateway",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX=base,
        OPENAPI_JSON_PATH="openapi.json",
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    service = JobService(
        config=config,
        store=store or JobStore(make_engine(config["STORE_DATABASE_URL"])),
        scheduler=scheduler or make_scheduler(config),
        renderer=ScriptRenderer(config["PATHS_TEMPLATE_DIR"] or None),
        storage=storage if storage is not None else S3Storage(make_s3_client(config["S3_ENDPOINT_URL"], config["S3_REGION"])),
        callback_secret=load_or_create_secret(config["SERVER_CALLBACK_SECRET"], config["PATHS_STATE_DIR"]),
    )
    app.extensions[EXTENSION_KEY] = service
    poller = Poller(service, config)
    app.extensions[POLLER_KEY] = poller
    if config["POLLER_ENABLED"] and not config.get("TESTING"):
        poller.start()

    api = Api(app)
    from gateway.api.jobs import blp as jobs_blueprint
    from gateway.api.errors import register_error_handlers

    api.register_blueprint(jobs_blueprint, url_prefix=base)
    register_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app
