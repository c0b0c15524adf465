"""Signed job-to-gateway events: progress while RELION runs, metadata when the hook ends.

Each job gets a token derived from the gateway's secret and its id (HMAC), handed to the job in
its environment at sbatch time, never written into a script. The job signs each event body with
it; the gateway recomputes the token and checks the signature. A job never needs the gateway to
be reachable: a failed post is logged and the job carries on (the poller reads the same facts
from the job's log directory or from S3).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Gateway-Signature"
TOKEN_ENV = "RELION_GATEWAY_JOB_TOKEN"
MAX_EVENT_AGE_S = 600.0  # older events are refused (bounds replays)


def load_or_create_secret(configured: str, state_dir: str) -> bytes:
    """The configured secret, else one kept in <state_dir>/callback.key (mode 600), made once."""
    if configured:
        return configured.encode()
    path = Path(state_dir) / "callback.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def job_token(secret: bytes, job_id: str) -> str:
    return hmac.new(secret, job_id.encode(), hashlib.sha256).hexdigest()


def sign(token: str, body: bytes) -> str:
    return "sha256=" + hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: bytes, job_id: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(job_token(secret, job_id), body), signature or "")


def post_event(url: str, job_id: str, kind: str, data: dict[str, Any], *, token: str | None = None, timeout: float = 5.0) -> bool:
    """POST one signed event; return whether the gateway took it. Never raises."""
    token = token or os.environ.get(TOKEN_ENV)
    if not url or not token:
        return False
    body = json.dumps({"job_id": job_id, "type": kind, "sent_at": time.time(), "data": data}, sort_keys=True).encode()
    try:
        response = requests.post(
            f"{url.rstrip('/')}/jobs/{job_id}/events",
            data=body,
            headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(token, body)},
            timeout=timeout,
        )
    except requests.RequestException as exc:
        log.warning("could not report %s event to %s: %s", kind, url, exc)
        return False
    if response.status_code >= 300:
        log.warning("gateway refused %s event: %s %s", kind, response.status_code, response.text[:200])
        return False
    return True
