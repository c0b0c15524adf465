"""The Flask application factory: config layers, services in app.extensions, the API blueprint."""
from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any, Mapping

from apispec import BasePlugin
from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST
from flask_smorest import Api

from gateway import __version__
from gateway import auth
from gateway.audit import Auditor
from gateway.jobs.dirs import secure_state
from gateway.api.docs import RelativePaths, register_docs
from gateway.api.page import register_page
from gateway.api.errors import MAX_BODY_BYTES, RequestLimits, error_response
from gateway.config import build_config
from gateway.observability import CachedReadiness, instrumented, render_metrics
from gateway.storage.s3 import S3Storage
from gateway.jobs.poller import Poller
from gateway.jobs.service import JobService, build_service
from gateway.slurm.backend import SchedulerBackend
from gateway.slurm.factory import make_scheduler
from gateway.database import JobStore
from gateway.textrules import text_problem

log = logging.getLogger(__name__)

EXTENSION_KEY = "relion_gateway"
POLLER_KEY = "relion_gateway_poller"
AUDIT_KEY = "relion_gateway_audit"
READINESS_KEY = "relion_gateway_readiness"
DISPATCHER_KEY = "relion_gateway_dispatcher"
READ_THREADS = 8  # threads of a worker that long-polls and event streams never take


def _default_scheduler(config: Mapping[str, Any]) -> SchedulerBackend:
    # Time every Slurm command the CLI backend runs (metrics); other backends talk HTTP or C.
    if str(config["SLURM_BACKEND"]).lower() == "cli":
        return make_scheduler(config, runner=instrumented())
    return make_scheduler(config)


class _UnsupportedMediaTypeDoc(BasePlugin):  # type: ignore[misc]
    """Document the 415 of gateway/api/parser.py on every operation whose body that parser reads.

    Those bodies are schemas (a ``$ref``); bodies a view reads itself (signed job events) are not.
    """

    def operation_helper(self, path: str | None = None, operations: dict[str, Any] | None = None, **_: Any) -> None:
        for operation in (operations or {}).values():
            schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" in schema:
                operation.setdefault("responses", {}).setdefault(415, "UNSUPPORTED_MEDIA_TYPE")


def _push(app: Flask, config: Mapping[str, Any], service: JobService) -> None:
    """Webhooks, the event feed and the wait slots: the API's push side (gateway/api/push.py)."""
    from gateway.api.push import FEED_KEY, SLOTS_KEY, WEBHOOKS_KEY
    from gateway.database.events import EventStore
    from gateway.jobs.dispatch import Dispatcher
    from gateway.jobs.feed import EventFeed, WaitSlots
    from gateway.jobs.webhooks import WebhookService

    app.extensions[WEBHOOKS_KEY] = WebhookService(dict(config), service.store, service.callback_secret)
    app.extensions[FEED_KEY] = EventFeed(EventStore(service.store.engine))
    app.extensions[SLOTS_KEY] = WaitSlots(max_waiters(config))
    dispatcher = Dispatcher(dict(config), service.store, service.callback_secret)
    app.extensions[DISPATCHER_KEY] = dispatcher
    if config["POLLER_ENABLED"] and config["WEBHOOKS_ENABLED"] and service.callback_secret and not config.get("TESTING"):
        dispatcher.start()
        atexit.register(dispatcher.stop)


def max_waiters(config: Mapping[str, Any]) -> int:
    """Requests one process may hold waiting: [server] max_waiters, or all threads but eight (for reads)."""
    return int(config["SERVER_MAX_WAITERS"]) or max(1, int(config["SERVER_THREADS"]) - READ_THREADS)


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
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        # Bearer tokens for every operation but the public ones (gateway/auth.py).
        API_SPEC_OPTIONS={
            "components": {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "rg_<id>_<secret>"}}},
            "security": [{"bearerAuth": []}],
        },
    )
    auditor = Auditor(config["AUDIT_FILE"])
    app.extensions[AUDIT_KEY] = auditor
    service = build_service(config, scheduler=scheduler or _default_scheduler(config), store=store, storage=storage, auditor=auditor)
    app.extensions[EXTENSION_KEY] = service
    # The store, the key and the audit file are the gateway's alone: a job must not read them.
    state = Path(config["PATHS_STATE_DIR"])
    database = config["STORE_DATABASE_URL"].removeprefix("sqlite:///") if config["STORE_DATABASE_URL"].startswith("sqlite:///") else ""
    secure_state(state, [p for p in (state / "callback.key", Path(database) if database else None,
                                     Path(config["AUDIT_FILE"]) if config["AUDIT_FILE"] else None) if p is not None])
    auth.init_app(app, service.store, auditor)
    poller = Poller(service, config)
    app.extensions[POLLER_KEY] = poller
    if config["POLLER_ENABLED"] and not config.get("TESTING"):
        poller.start()
        # Hand the lease back on a clean exit so the next gateway polls at once, not after expiry.
        atexit.register(poller.stop)
    _push(app, config, service)

    register_docs(app, base)  # before Api(): flask-smorest reads the Swagger UI settings at init
    api = Api(app, spec_kwargs={"extra_plugins": [_UnsupportedMediaTypeDoc(), RelativePaths(base)]})
    from gateway.api.admin import blp as admin_blueprint
    from gateway.api.service_info import blp as service_blueprint
    from gateway.api.jobs import blp as jobs_blueprint
    from gateway.api.previews import blp as previews_blueprint
    from gateway.api.push import blp as push_blueprint
    from gateway.api.usage import blp as usage_blueprint
    from gateway.api.errors import register_error_handlers

    api.register_blueprint(jobs_blueprint, url_prefix=base)
    api.register_blueprint(previews_blueprint, url_prefix=base)
    api.register_blueprint(admin_blueprint, url_prefix=base)
    api.register_blueprint(service_blueprint, url_prefix=base)
    api.register_blueprint(push_blueprint, url_prefix=base)
    api.register_blueprint(usage_blueprint, url_prefix=base)
    register_page(app, base)  # the job page (gateway/api/ui/): public, outside the spec
    if app.config["SERVER_CORS_ORIGINS"]:
        from flask_cors import CORS

        # Only the API, only these origins; bearer tokens travel in a header, never in cookies.
        CORS(
            app,
            resources={f"{base}/*": {"origins": list(app.config["SERVER_CORS_ORIGINS"])}},
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "If-None-Match"],
            expose_headers=["ETag", "Location", "Retry-After"],
            supports_credentials=False,
            max_age=600,
        )
    register_error_handlers(app)

    @app.before_request
    def _plain_path_ids() -> tuple[Response, int] | None:
        # After authentication (registered later): an id in a path holding an invisible or
        # line-breaking character names no job; the 404 says which character, since it cannot be seen.
        for name, value in (request.view_args or {}).items():
            if isinstance(value, str) and (problem := text_problem(value)) is not None:
                message = f"{name} must not contain {problem}"
                return error_response(404, "Not Found", f"no job {value!r}: {message}", {"path": {name: [message]}})
        return None

    # Outermost: limits hold before routing and authentication, as a server's own would.
    app.wsgi_app = RequestLimits(app.wsgi_app, app.config["MAX_CONTENT_LENGTH"])  # type: ignore[method-assign]

    @app.get("/healthz")
    @auth.public
    def healthz() -> dict[str, str]:
        """The process is up (nothing else is checked)."""
        return {"status": "ok", "version": __version__}

    app.extensions[READINESS_KEY] = ready_checks = CachedReadiness(service)

    @app.get("/readyz")
    @auth.public
    def readyz() -> tuple[dict[str, Any], int]:
        """Ready when the store, Slurm and S3 all answer; 503 naming what does not.

        Public, so answered from a result up to READINESS_TTL_S old (``age_s``): probes without a
        token never cost a Slurm command or an S3 call each."""
        checks, age = ready_checks()
        ready = all(check["ok"] for check in checks.values())
        return {"ready": ready, "checks": checks, "age_s": round(age, 3)}, 200 if ready else 503

    def metrics() -> Response:
        """Prometheus metrics: jobs by state, submits, poll cycles, Slurm command latency and errors."""
        return Response(render_metrics(service.store.engine), mimetype=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", auth.public(metrics) if config["SERVER_METRICS_PUBLIC"] else auth.admin_required(metrics))
    return app
