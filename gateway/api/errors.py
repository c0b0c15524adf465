"""Map domain exceptions to flask-smorest's one error shape: {code, status, message, errors}."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, current_app, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Response

from gateway.auth import Forbidden, Unauthenticated
from gateway.errors import RequestError
from gateway.ratelimit import LimitExceeded
from gateway.slurm.backend import SchedulerError
from gateway.service import EventRefused
from gateway.store import JobNotFound

log = logging.getLogger(__name__)


def error_response(code: int, status: str, message: str, errors: dict[str, Any] | None = None) -> tuple[Response, int]:
    body: dict[str, Any] = {"code": code, "status": status, "message": message}
    if errors:
        body["errors"] = errors
    return jsonify(body), code


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(RequestError)
    def _request_error(exc: RequestError) -> tuple[Response, int]:
        status = "Conflict" if exc.status == 409 else "Unprocessable Entity"
        return error_response(exc.status, status, f"{exc.field}: {exc.message}", {"json": {exc.field: [exc.message]}})

    @app.errorhandler(Unauthenticated)
    def _unauthenticated(exc: Unauthenticated) -> tuple[Response, int]:
        response, code = error_response(401, "Unauthorized", exc.message)
        response.headers["WWW-Authenticate"] = exc.challenge
        return response, code

    @app.errorhandler(Forbidden)
    def _forbidden(exc: Forbidden) -> tuple[Response, int]:
        return error_response(403, "Forbidden", exc.message, {"json": {exc.field: [exc.message]}} if exc.field != "admin" else None)

    @app.errorhandler(LimitExceeded)
    def _limit(exc: LimitExceeded) -> tuple[Response, int]:
        response, code = error_response(429, "Too Many Requests", exc.message, {"limits": {exc.limit: [exc.message]}})
        response.headers["Retry-After"] = str(exc.retry_after)
        return response, code

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> tuple[Response, int]:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        return error_response(413, "Request Entity Too Large", f"the request body is larger than the limit of {limit} bytes")

    @app.errorhandler(JobNotFound)
    def _not_found(exc: JobNotFound) -> tuple[Response, int]:
        what = str(exc.args[0])
        return error_response(404, "Not Found", what if " " in what else f"no job {what!r}")

    @app.errorhandler(EventRefused)
    def _event_refused(exc: EventRefused) -> tuple[Response, int]:
        return error_response(401, "Unauthorized", f"event refused: {exc}")

    @app.errorhandler(SchedulerError)
    def _scheduler_error(exc: SchedulerError) -> tuple[Response, int]:
        log.error("Slurm error: %s (argv %s)", exc.message, exc.argv)
        return error_response(503, "Service Unavailable", f"Slurm is not answering: {exc.message}")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        # flask-smorest puts validation messages in exc.data; keep its shape for every other HTTP error.
        data = getattr(exc, "data", {}) or {}
        errors = data.get("messages")
        message = exc.description or exc.name
        if errors:
            message = "; ".join(_flatten_messages(errors)) or message
        return error_response(exc.code or 500, exc.name, message, errors)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_response(500, "Internal Server Error", "internal error; see the gateway log")


def _flatten_messages(errors: Any, prefix: str = "") -> list[str]:
    """{'json': {'num_mpi': ['Must be ...']}} -> ['num_mpi: Must be ...']."""
    if isinstance(errors, dict):
        out: list[str] = []
        for key, value in errors.items():
            name = "" if key in ("json", "query", "_schema") and not prefix else f"{prefix}{key}"
            out.extend(_flatten_messages(value, f"{name}." if name else ""))
        return out
    if isinstance(errors, list):
        if all(isinstance(e, str) for e in errors):
            field = prefix.rstrip(".")
            return [f"{field}: {e}" if field else e for e in errors]
        return [m for e in errors for m in _flatten_messages(e, prefix)]
    return [f"{prefix.rstrip('.')}: {errors}"]
