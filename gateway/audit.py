"""The audit trail: one JSON line per submit, cancel, archive retry, token change and refused login.

Lines go to the ``gateway.audit`` logger (so they reach wherever the gateway's logs go) and, when
``[audit] file`` is set, are appended to that file too. A line says who (the principal), what (the
action and its object), when (ISO 8601, UTC) and the outcome; it never holds a secret.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("gateway.audit")


class Actor(Protocol):
    """Who did something: an authenticated principal (gateway.auth.Principal)."""

    @property
    def user(self) -> str: ...

    @property
    def admin(self) -> bool: ...

    @property
    def via(self) -> str: ...

    @property
    def token_id(self) -> str | None: ...


def local_actor() -> dict[str, Any]:
    """The principal of a command run on the gateway host (CLI): the Unix user."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return {"principal": f"local:{name}", "admin": True, "via": "cli"}


def actor_fields(actor: Actor | None) -> dict[str, Any]:
    if actor is None:
        return local_actor()
    fields: dict[str, Any] = {"principal": actor.user, "admin": actor.admin, "via": actor.via}
    if actor.token_id:
        fields["token_id"] = actor.token_id
    return fields


class Auditor:
    """Write audit lines; one per gateway app (kept in app.extensions, and by the JobService)."""

    def __init__(self, path: str | os.PathLike[str] = "") -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, action: str, outcome: str, *, actor: Actor | None = None, **details: Any) -> dict[str, Any]:
        """Log one line: time, principal, action, outcome and ``details`` (job_id, token_id, status, ...)."""
        entry: dict[str, Any] = {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            **actor_fields(actor),
            "action": action,
            "outcome": outcome,
        }
        entry.update({k: v for k, v in details.items() if v is not None})
        line = json.dumps(entry, sort_keys=True, default=str)
        log.info(line)
        if self.path is not None:
            try:
                with self._lock, open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
            except OSError as exc:
                log.error("cannot append to the audit file %s: %s", self.path, exc)
        return entry
