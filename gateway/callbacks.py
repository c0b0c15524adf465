"""Signed job-to-gateway events: progress while RELION runs, metadata when the hook ends.

Each job gets a token derived from the gateway's secret and its id (HMAC), handed to the job in
its environment at sbatch time, never written into a script. The job signs each event body with
it; the gateway recomputes the token and checks the signature, the sender's role (main job or
archive hook, each with its own token and its own event types), the time, and that the same body
was not seen before. A failed progress or metadata post is logged and the job carries on (the
poller reads the same facts from the job's log directory or from S3); the same signed requests
also obtain the job's presigned S3 URLs (gateway/jobside/brokered.py).
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
# A sender's clock may run a little ahead of the gateway's (another node); beyond this an event
# dated in the future is refused, or a stolen body could be replayed for longer than MAX_EVENT_AGE_S.
MAX_CLOCK_SKEW_S = 30.0
# How long after a job has ended its tokens still work (a last progress report, a late metadata event).
TOKEN_GRACE_S = 300.0

# Each Slurm job of a gateway job gets its own token, good for what that job does and nothing else:
# the main job reports progress and reads its dataset; the archive hook reports metadata and writes
# under the job's output prefix. A token stolen from one cannot do the other's work.
ROLE_MAIN = "main"
ROLE_ARCHIVE = "archive"
ROLE_EVENTS = {ROLE_MAIN: frozenset({"progress"}), ROLE_ARCHIVE: frozenset({"metadata"})}
ROLE_STORAGE = {
    # "restore": a continued attempt's GET of the job's own archived output; "parent_output": a
    # chained job's GET of its parent's (gateway.jobs.signed).
    ROLE_MAIN: frozenset({"dataset", "restore", "parent_output"}),
    ROLE_ARCHIVE: frozenset({"head", "put", "multipart_start", "multipart_parts", "multipart_complete", "multipart_abort"}),
}


def load_or_create_secret(configured: str, state_dir: str) -> bytes:
    """The configured secret, else one kept in <state_dir>/callback.key (mode 600), made once."""
    if configured:
        return configured.encode()
    path = Path(state_dir) / "callback.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # gunicorn's workers boot at once on a fresh state dir: each writes a whole key to a file of
        # its own, and link() publishes one atomically. The losers (EEXIST) read the winner's, never
        # a half-written file; a worker that failed here stopped the whole server (seen in CI).
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
            try:
                os.link(draft, path)
            except FileExistsError:
                pass
        finally:
            draft.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def job_token(secret: bytes, job_id: str, role: str = ROLE_MAIN) -> str:
    """The token of one Slurm job (``role``) of a gateway job: an HMAC only the gateway can make."""
    message = job_id if role == ROLE_MAIN else f"{role}:{job_id}"
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def sign(token: str, body: bytes) -> str:
    return "sha256=" + hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def signing_role(secret: bytes, job_id: str, body: bytes, signature: str) -> str | None:
    """Which of the job's tokens signed ``body`` (a role), or None if none did."""
    found = None
    for role in ROLE_EVENTS:  # compare with every role's token, so the time says nothing about which
        if hmac.compare_digest(sign(job_token(secret, job_id, role), body), signature or ""):
            found = role
    return found


def verify(secret: bytes, job_id: str, body: bytes, signature: str) -> bool:
    return signing_role(secret, job_id, body, signature) is not None


def signed_body(job_id: str, fields: dict[str, Any]) -> bytes:
    """A job's request body: its id, when it was sent, and a nonce, so no two bodies are alike."""
    return json.dumps({"job_id": job_id, "sent_at": time.time(), "nonce": secrets.token_hex(16), **fields}, sort_keys=True).encode()


def post_event(url: str, job_id: str, kind: str, data: dict[str, Any], *, token: str | None = None, timeout: float = 5.0) -> bool:
    """POST one signed event; return whether the gateway took it. Never raises."""
    token = token or os.environ.get(TOKEN_ENV)
    if not url or not token:
        return False
    body = signed_body(job_id, {"type": kind, "data": data})
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
