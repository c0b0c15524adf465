"""Map domain exceptions to flask-smorest's one error shape: {code, status, message, errors}.

This module owns that shape (``error_body``), also for what the HTTP layer refuses before Flask
sees a request: the request limits below are enforced by ``RequestLimits`` (a WSGI middleware)
and are stricter than the servers' own, so a client gets the same JSON from werkzeug's dev server
and from gunicorn, whose own error pages gateway/serve.py writes in this shape too (a backstop for
what is past even their limits, or not HTTP at all).
"""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from flask import Flask, current_app, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Response

from gateway.auth import Forbidden, Unauthenticated
from gateway.errors import RequestError
from gateway.errors import LimitExceeded
from gateway.slurm.backend import SchedulerError
from gateway.jobs.signed import EventRefused
from gateway.storage.s3 import StorageError
from gateway.database import JobNotFound

log = logging.getLogger(__name__)

# Request limits (README, Security). A request body: 1 MiB, with or without Content-Length.
MAX_BODY_BYTES = 1024 * 1024
# The request target (path and query): 414 beyond. Below gunicorn's ceiling for a whole request
# line (8190 bytes, method and version included), so gunicorn never refuses a URI the gateway takes.
MAX_URI_BYTES = 8000
# All header lines together ("Name: value\r\n"), and how many: 431 beyond. Below werkzeug's dev
# server (100 lines) and gunicorn's limits, which gateway/serve.py sets above these.
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_FIELDS = 64


# The fields every error body has (``errors`` only where there are field messages); the spec marks them required.
ERROR_REQUIRED = ("code", "status", "message")


def error_body(code: int, message: str, errors: dict[str, Any] | None = None, status: str | None = None) -> dict[str, Any]:
    """The one error shape; ``status`` defaults to the code's reason phrase."""
    body: dict[str, Any] = {"code": code, "status": status or _phrase(code), "message": message}
    if errors:
        body["errors"] = errors
    return body


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def error_response(code: int, status: str, message: str, errors: dict[str, Any] | None = None) -> tuple[Response, int]:
    return jsonify(error_body(code, message, errors, status)), code


def error_json(code: int, message: str, status: str | None = None) -> bytes:
    """The one shape as bytes, for what answers outside Flask (the middleware, the servers)."""
    return json.dumps(error_body(code, message, status=status), separators=(",", ":")).encode()


def _plain_error(start_response: Callable[..., Any], code: int, message: str) -> Iterable[bytes]:
    payload = error_json(code, message)
    start_response(f"{code} {_phrase(code)}", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


class RequestLimits:
    """WSGI middleware refusing, in the one error shape, what is over the request limits above.

    It runs before routing and authentication, as the server's own limits would. A body without
    Content-Length (chunked) is read here, up to one byte over the limit: werkzeug stops such a
    stream at ``MAX_CONTENT_LENGTH`` and hands the view the first 1 MiB as if it were the whole
    body, which reads as truncated JSON (a 400) instead of the 413 a Content-Length gets.
    """

    def __init__(self, app: Callable[..., Any], max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if uri is None:
            query = environ.get("QUERY_STRING", "")
            uri = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "") + (f"?{query}" if query else "")
        if len(uri.encode("latin-1", "replace")) > MAX_URI_BYTES:
            return _plain_error(start_response, 414, f"the request URI is longer than the limit of {MAX_URI_BYTES} bytes")
        headers = [(k, v) for k, v in environ.items() if k.startswith("HTTP_") or k in ("CONTENT_TYPE", "CONTENT_LENGTH")]
        if len(headers) > MAX_HEADER_FIELDS:
            return _plain_error(start_response, 431, f"the request has more than {MAX_HEADER_FIELDS} header fields")
        # "Name: value\r\n" per field, as on the wire (HTTP_ is the WSGI prefix, not the name).
        size = sum(len(k) - (5 if k.startswith("HTTP_") else 0) + len(str(v)) + 4 for k, v in headers)
        if size > MAX_HEADER_BYTES:
            return _plain_error(start_response, 431, f"the request headers are larger than the limit of {MAX_HEADER_BYTES} bytes")
        if environ.get("CONTENT_LENGTH") in (None, "") and environ.get("wsgi.input_terminated"):
            stream, body = environ["wsgi.input"], bytearray()
            while len(body) <= self.max_body_bytes:
                # A dechunking stream may return one chunk per read, fewer bytes than asked.
                part = stream.read(min(64 * 1024, self.max_body_bytes + 1 - len(body)))
                if not part:
                    break
                body.extend(part)
            if len(body) > self.max_body_bytes:
                return _plain_error(start_response, 413, f"the request body is larger than the limit of {self.max_body_bytes} bytes")
            environ["wsgi.input"] = io.BytesIO(bytes(body))
        return self.app(environ, start_response)  # type: ignore[no-any-return]


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(RequestError)
    def _request_error(exc: RequestError) -> tuple[Response, int]:
        status = HTTPStatus(exc.status).phrase
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

    @app.errorhandler(StorageError)
    def _storage_error(exc: StorageError) -> tuple[Response, int]:
        log.error("S3 error: %s", exc)
        response, status = error_response(503, "Service Unavailable", f"S3 is not answering: {exc}")
        response.headers["Retry-After"] = "10"
        return response, status

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
        response, code = error_response(exc.code or 500, exc.name, message, errors)
        # Keep what the exception says besides its HTML: Allow on a 405, WWW-Authenticate, ...
        for name, value in exc.get_headers():
            if name.lower() not in ("content-type", "content-length"):
                response.headers[name] = value
        return response, code

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
