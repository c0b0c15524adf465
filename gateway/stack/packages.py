"""Install the Debian packages the stack needs, only when something is missing.

The check looks for the binaries (and the unversioned libpmix.so) rather than asking dpkg, so it
costs a few stat calls on every `stack up` and a machine that got the tools some other way is fine.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Callable

from gateway.process import CommandError, run_command

log = logging.getLogger(__name__)

PACKAGES = (
    "slurm-wlm",
    "slurmdbd",
    "munge",
    "mariadb-server",
    "libpmix-dev",
    "relion",
    "openmpi-bin",
    "pigz",
)

# binary -> the package that ships it (for the message; the install always names every package)
REQUIRED_BINARIES = {
    "munged": "munge",
    "mungekey": "munge",
    "munge": "munge",
    "unmunge": "munge",
    "mariadbd": "mariadb-server",
    "mariadb": "mariadb-server",
    "mariadb-admin": "mariadb-server",
    "slurmctld": "slurm-wlm",
    "slurmd": "slurm-wlm",
    "sbatch": "slurm-wlm",
    "sacct": "slurm-wlm",
    "scontrol": "slurm-wlm",
    "sinfo": "slurm-wlm",
    "squeue": "slurm-wlm",
    "slurmdbd": "slurmdbd",
    "relion_refine_mpi": "relion",
    "mpirun": "openmpi-bin",
    "pigz": "pigz",
}
# `srun --mpi=pmix` dlopens the unversioned libpmix.so, which only libpmix-dev ships.
PMIX_GLOB = "/usr/lib/*/libpmix.so"
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

APT_UPDATE_TIMEOUT_S = 600.0
APT_INSTALL_TIMEOUT_S = 3600.0


def missing_items(
    which: Callable[[str], str | None] | None = None,
    pmix_present: Callable[[], bool] | None = None,
) -> list[str]:
    """Return what is missing: binary names, plus 'libpmix.so'."""
    which = which or (lambda name: shutil.which(name, path=SEARCH_PATH))
    pmix_present = pmix_present or (lambda: bool(glob.glob(PMIX_GLOB)))
    missing = [name for name in REQUIRED_BINARIES if which(name) is None]
    if not pmix_present():
        missing.append("libpmix.so")
    return missing


def ensure_packages() -> list[str]:
    """Install the stack's packages if anything is missing; return what was missing."""
    missing = missing_items()
    if not missing:
        return []
    log.info("missing %s: installing %s", ", ".join(missing), " ".join(PACKAGES))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run_command(["apt-get", "update"], timeout=APT_UPDATE_TIMEOUT_S, env=env)
    run_command(
        ["apt-get", "install", "-y", *PACKAGES],
        timeout=APT_INSTALL_TIMEOUT_S,
        env=env,
    )
    still = missing_items()
    if still:
        raise RuntimeError(f"still missing after apt-get install: {', '.join(still)}")
    return missing


# `stack up --with-rest` only. slurmrestd's own plugins (rest_auth/jwt, openapi/v0.0.38) come with
# slurm-wlm-basic-plugins; the auth/jwt plugin that slurmctld and slurmdbd load is a separate package.
REST_PACKAGES = ("slurmrestd", "slurm-wlm-jwt-plugin")
REST_FILES = {
    "/usr/sbin/slurmrestd": "slurmrestd",
    "/usr/lib/*/slurm-wlm/auth_jwt.so": "slurm-wlm-jwt-plugin",
}


def missing_rest_items(exists: Callable[[str], bool] | None = None) -> list[str]:
    """Return the REST files (globs) that are not installed."""
    exists = exists or (lambda pattern: bool(glob.glob(pattern)))
    return [pattern for pattern in REST_FILES if not exists(pattern)]


def ensure_rest_packages() -> list[str]:
    """Install slurmrestd and the JWT plugin if missing; return the missing packages.

    Debian's slurmrestd postinst only enables a systemd unit; without systemd nothing starts.
    """
    missing = sorted({REST_FILES[pattern] for pattern in missing_rest_items()})
    if not missing:
        return []
    log.info("installing %s", " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run_command(["apt-get", "install", "-y", *missing], timeout=APT_INSTALL_TIMEOUT_S, env=env)
    except CommandError:
        # A stale package index: update once, then try again.
        run_command(["apt-get", "update"], timeout=APT_UPDATE_TIMEOUT_S, env=env)
        run_command(["apt-get", "install", "-y", *missing], timeout=APT_INSTALL_TIMEOUT_S, env=env)
    still = missing_rest_items()
    if still:
        raise RuntimeError(f"still missing after apt-get install: {', '.join(still)}")
    return missing
