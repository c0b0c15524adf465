"""slurmrestd for the local stack: `relion-gateway stack up --with-rest`.

Enabling is sticky: the JWT key in the stack dir is the marker. Once it exists every `stack up`
keeps `AuthAltTypes=auth/jwt` in slurm.conf and slurmdbd.conf and keeps slurmrestd running, so a
plain `stack up` after a `--with-rest` one changes nothing (and restarts nothing). A stack that
never saw `--with-rest` gets neither the config lines nor the daemon.

slurmrestd refuses to run as root (and should not run as SlurmUser, which could mint tokens for
anyone); it is started as root with `-u slurmrest`, a system user created here, and drops to it
after binding 127.0.0.1:6820. With `SLURM_JWT=daemon` it authenticates to slurmctld with each
request's token instead of munge. Readiness: GET /slurm/v0.0.38/ping with a fresh token is 200.
"""
from __future__ import annotations

import grp
import logging
import os
import pwd
from pathlib import Path
from typing import Any

import requests

from gateway.process import run_command
from gateway.slurm.tokens import TokenProvider
from gateway.stack.daemons import Daemon
from gateway.stack.layout import StackPaths
from gateway.stack.packages import ensure_rest_packages
from gateway.stack.slurm_conf import SLURM_USER

log = logging.getLogger(__name__)

SLURMRESTD_BIN = "/usr/sbin/slurmrestd"
SLURMRESTD_HOST = "127.0.0.1"
SLURMRESTD_PORT = 6820
SLURMRESTD_URL = f"http://{SLURMRESTD_HOST}:{SLURMRESTD_PORT}"
API_VERSION = "v0.0.38"
SERVICE_USER = "slurmrest"
# Who the probe's token is for; the gateway on this stack runs as root too.
TOKEN_USER = "root"
JWT_KEY_BYTES = 32


def jwt_key_path(paths: StackPaths) -> Path:
    """Where the HS256 key lives; its existence means REST was enabled for this stack."""
    return paths.slurm_dir / "jwt_hs256.key"


def rest_enabled(paths: StackPaths) -> bool:
    return jwt_key_path(paths).exists()


def ensure_service_user(name: str = SERVICE_USER) -> bool:
    """Create the system user slurmrestd drops to; return True when it was created."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    run_command(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", name],
        timeout=30,
    )
    log.info("created system user %s", name)
    return True


def ensure_jwt_key(path: Path, owner: str = SLURM_USER) -> bool:
    """Create a 32-byte random key (owner slurm, mode 600) unless one exists; fix owner and mode."""
    uid = pwd.getpwnam(owner).pw_uid
    gid = grp.getgrnam(owner).gr_gid
    created = False
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(JWT_KEY_BYTES))
        os.chown(tmp, uid, gid)
        tmp.replace(path)
        created = True
        log.info("created JWT key %s", path)
    st = path.stat()
    if (st.st_uid, st.st_gid) != (uid, gid) or st.st_mode & 0o777 != 0o600:
        # slurmctld and slurmdbd read it after dropping to SlurmUser; nobody else may.
        os.chown(path, uid, gid)
        path.chmod(0o600)
    return created


def prepare(paths: StackPaths) -> list[str]:
    """Packages, service user and key for REST; return what was done (for the report)."""
    done = []
    installed = ensure_rest_packages()
    if installed:
        done.append(f"installed {' '.join(installed)}")
    if ensure_service_user():
        done.append(f"created user {SERVICE_USER}")
    if ensure_jwt_key(jwt_key_path(paths)):
        done.append(f"created JWT key {jwt_key_path(paths)}")
    return done


class RestProbe:
    """Ready when GET /slurm/<ver>/ping with a token answers 200; the token is reused."""

    def __init__(self, base_url: str = SLURMRESTD_URL, user: str = TOKEN_USER) -> None:
        self.base_url = base_url
        self.user = user
        # A short lifespan: this token only ever pings.
        self.tokens = TokenProvider(user, lifespan=600, timeout=10)
        self.session = requests.Session()

    def __call__(self, _since: float | None) -> bool:
        response = self.session.get(
            f"{self.base_url}/slurm/{API_VERSION}/ping",
            headers={"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": self.tokens.token()},
            timeout=3,
        )
        if response.status_code == 401:
            self.tokens.invalidate()
        return response.status_code == 200


def rest_daemons(paths: StackPaths, enabled: bool) -> list[Daemon]:
    """[slurmrestd] when REST is enabled, else []; it goes after slurmd (it needs slurmctld)."""
    if not enabled:
        return []
    return [
        Daemon(
            name="slurmrestd",
            argv=[SLURMRESTD_BIN, "-a", "rest_auth/jwt", "-s", f"openapi/{API_VERSION},openapi/db{API_VERSION}",
                  "-u", SERVICE_USER, f"{SLURMRESTD_HOST}:{SLURMRESTD_PORT}"],
            pid_file=paths.pid_file("slurmrestd"),
            log_file=paths.out_file("slurmrestd"),
            names=("slurmrestd",),
            probe=RestProbe(),
            env={"SLURM_JWT": "daemon"},
            ready_timeout=30.0,
        )
    ]


def rest_status(paths: StackPaths) -> dict[str, Any]:
    """What `stack status --json` shows under "slurmrestd"."""
    enabled = rest_enabled(paths)
    return {
        "enabled": enabled,
        "url": SLURMRESTD_URL if enabled else None,
        "api_version": API_VERSION,
        "user": TOKEN_USER,
        "jwt_key": str(jwt_key_path(paths)) if enabled else None,
    }
