"""Who a job runs as, and the directories and file modes that keep jobs out of what is not theirs.

A job processes a user's untrusted data, so the gateway's state (store, key, audit file) is for the
gateway's account only (files 0600), and each job account owns its own per-user workspace and log
directories (0700) under roots that others may traverse but not list (0711). A root gateway runs
jobs as another account with sbatch's ``--uid`` ([job] run_as, [job.run_as_users]); a gateway that
is not root runs them as itself, and then nothing on the file system separates a job from the
gateway's state: README, Security, says how a site sets this up.
"""
from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path
from typing import Any, Mapping

from gateway.errors import RequestError

log = logging.getLogger(__name__)

# Roots and the state directory: traversable by job accounts (they must reach their own
# directories below), not listable, so nobody learns other users' or jobs' names.
ROOT_MODE = 0o711
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
GATEWAY_CACHE_PART = "_gateway"


def job_account(config: Mapping[str, Any], user_id: str) -> str | None:
    """The Unix account ``user_id``'s jobs run as, or None for the gateway's own account."""
    table: Mapping[str, str] = config["JOB_RUN_AS_USERS"]
    pattern = str(table.get(user_id) or config["JOB_RUN_AS"] or "")
    if not pattern:
        return None
    account = pattern.replace("{user}", user_id)
    try:
        pwd.getpwnam(account)
    except KeyError:
        raise RequestError(
            "user_id", f"no Unix account {account!r} to run {user_id!r}'s jobs ([job] run_as / [job.run_as_users])"
        ) from None
    return account


def _owner(account: str | None) -> tuple[int, int] | None:
    if account is None:
        return None
    entry = pwd.getpwnam(account)
    return entry.pw_uid, entry.pw_gid


def _make(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)  # mkdir's mode is cut by the umask, and an existing one may be wider
    if owner is not None and (path.stat().st_uid, path.stat().st_gid) != owner:
        os.chown(path, *owner)


def make_job_dirs(root: Path, user_id: str, job_dir: Path, account: str | None) -> None:
    """``<root>`` (0711), ``<root>/<user>`` and ``job_dir`` below it (0700, the job account's)."""
    owner = _owner(account)
    _make(root, ROOT_MODE, None)
    _make(root / user_id, PRIVATE_DIR_MODE, owner)
    _make(job_dir, PRIVATE_DIR_MODE, owner)


def cache_root(config: Mapping[str, Any], account: str | None) -> Path | None:
    """The job account's part of the dataset cache, None without [job] cache_dir.

    One part per account, never shared: a job could chmod and rewrite a cached file its own
    account filled, so sharing across accounts would let one user's job change another's input
    (gateway/jobside/cache says more).
    """
    if not config["JOB_CACHE_DIR"]:
        return None
    # Jobs that run as the gateway's own account share its part ("_gateway": no account name).
    return Path(config["JOB_CACHE_DIR"]) / (account or GATEWAY_CACHE_PART)


def make_cache_dir(config: Mapping[str, Any], account: str | None) -> None:
    """``[job] cache_dir`` (0711) and the account's part below it (0700, the account's)."""
    root = cache_root(config, account)
    if root is not None:
        _make(root.parent, ROOT_MODE, None)
        _make(root, PRIVATE_DIR_MODE, _owner(account))


def write_job_file(path: Path, text: str, account: str | None) -> None:
    """A file the gateway writes for a job (job.json): the job account may read it, nobody else."""
    path.write_text(text)
    os.chmod(path, 0o640 if account else PRIVATE_FILE_MODE)
    owner = _owner(account)
    if owner is not None:
        os.chown(path, 0 if os.geteuid() == 0 else os.geteuid(), owner[1])


def secure_state(state_dir: Path, files: list[Path]) -> None:
    """The state directory 0711 (job roots may be below it), its files the gateway's only (0600)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if state_dir.stat().st_mode & 0o777 != ROOT_MODE and state_dir.stat().st_uid == os.geteuid():
        os.chmod(state_dir, ROOT_MODE)
    for path in files:
        if path.exists() and path.stat().st_mode & 0o077:
            os.chmod(path, PRIVATE_FILE_MODE)
