"""Generated credentials of the local stack, kept in ``<stack>/secrets.json`` (mode 600).

They are generated once and reused on every later ``stack up``: the MariaDB password is already
stored in an existing database and the S3 keys are in users' shells (``eval`` of ``stack status``).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import string
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackSecrets:
    mariadb_slurm_password: str
    s3_access_key: str
    s3_secret_key: str


_ALNUM = string.ascii_letters + string.digits


def _token(length: int, alphabet: str = _ALNUM) -> str:
    # Letters and digits only: safe unquoted in slurmdbd.conf, in SQL literals and in `export K=V`,
    # and never starting with "-" (which command-line tools would read as an option).
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _generate() -> StackSecrets:
    return StackSecrets(
        mariadb_slurm_password=_token(32),
        s3_access_key="RG" + _token(18, string.ascii_uppercase + string.digits),
        s3_secret_key=_token(40),
    )


def load_secrets(path: Path) -> StackSecrets | None:
    """Return the stored secrets, or None when there are none (yet)."""
    try:
        data = json.loads(path.read_text())
        return StackSecrets(**{key: str(data[key]) for key in StackSecrets.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def load_or_create_secrets(path: Path) -> StackSecrets:
    """Return the stored secrets, generating and storing any that are missing."""
    stored = load_secrets(path)
    if stored is not None:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return stored
    fresh = _generate()
    # Keep whatever a partial/older file had (e.g. an S3 key pair users already exported).
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    values = asdict(fresh)
    if isinstance(old, dict):
        values.update({k: str(v) for k, v in old.items() if k in values and v})
    result = StackSecrets(**values)
    _write_private(path, json.dumps(asdict(result), indent=2) + "\n")
    log.info("wrote new stack credentials to %s", path)
    return result


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Created 600 from the start: never world-readable, not even between write and chmod.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
