"""Where the local stack keeps its files: one directory, ``<state_dir>/stack``.

Everything the stack creates lives below it (pid files in ``run/``, daemon output in ``log/``, Slurm
state in ``slurm/``, the S3 server's data and venv, ``secrets.json``), so ``stack down`` plus removing
that directory returns the machine to a fresh state. Two exceptions are dictated by the packages:
Slurm's configs go to ``/etc/slurm`` (so ``squeue``/``sacct`` work in any shell without env) and
MariaDB keeps the Debian datadir ``/var/lib/mysql``.
"""
from __future__ import annotations

import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.config import DEFAULT_STATE_DIR

log = logging.getLogger(__name__)

STATE_DIR_ENV = "GATEWAY_PATHS_STATE_DIR"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
SLURMDBD_CONF = Path("/etc/slurm/slurmdbd.conf")
GRES_CONF = Path("/etc/slurm/gres.conf")


def resolve_state_dir(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the state dir: the argument, else $GATEWAY_PATHS_STATE_DIR, else DEFAULT_STATE_DIR."""
    if state_dir is None or str(state_dir) == "":
        state_dir = os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return Path(state_dir).expanduser().absolute()


def stack_dir(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return ``<state_dir>/stack``, the directory that holds everything of the local stack."""
    return resolve_state_dir(state_dir) / "stack"


@dataclass(frozen=True)
class StackPaths:
    """Every path of the stack, derived from the state dir."""

    state_dir: Path
    root: Path

    @classmethod
    def for_state_dir(cls, state_dir: str | os.PathLike[str] | None = None) -> StackPaths:
        resolved = resolve_state_dir(state_dir)
        return cls(state_dir=resolved, root=resolved / "stack")

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def slurm_run_dir(self) -> Path:
        """Slurm's own pid files; owned by slurm because slurmctld/slurmdbd write them after dropping root."""
        return self.run_dir / "slurm"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    @property
    def ctld_state_dir(self) -> Path:
        return self.slurm_dir / "ctld-state"

    @property
    def slurmd_spool_dir(self) -> Path:
        return self.slurm_dir / "d-spool"

    @property
    def s3_data_dir(self) -> Path:
        return self.root / "s3-data"

    @property
    def nanio_venv(self) -> Path:
        return self.root / "nanio-venv"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.json"

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "stack.lock"

    @property
    def gateway_pid_file(self) -> Path:
        return self.run_dir / "gateway.pid"

    @property
    def gateway_url_file(self) -> Path:
        return self.run_dir / "gateway.url"

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def out_file(self, name: str) -> Path:
        """Stdout/stderr of a daemon (startup errors land here even when it has its own log file)."""
        return self.log_dir / f"{name}.out"

    def make_base_dirs(self) -> None:
        """Create the root-owned directories (no package users needed yet)."""
        _allow_traverse(self.state_dir)
        for path, mode in (
            # Slurm's daemons run as user slurm and must reach files below the stack dir; jobs run
            # as unprivileged accounts and must not list it or read the S3 server's files.
            (self.root, 0o711),
            (self.run_dir, 0o755),
            (self.log_dir, 0o755),
            (self.slurm_dir, 0o755),
            (self.s3_data_dir, 0o700),  # nanio runs as root; on disk, every user's objects
        ):
            path.mkdir(parents=True, exist_ok=True)
            if path.stat().st_mode & 0o777 != mode:
                path.chmod(mode)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise ``up``/``down``: two concurrent ``up`` runs would both start every daemon."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _allow_traverse(state_dir: Path) -> None:
    # slurmctld and slurmdbd drop to user slurm and open their logs and state below the state
    # dir; a state dir made under umask 077 would make them die with "Permission denied".
    state_dir.mkdir(parents=True, exist_ok=True)
    mode = state_dir.stat().st_mode
    if not mode & stat.S_IXOTH:
        log.info("adding o+x to %s so the slurm user can reach the stack dir", state_dir)
        state_dir.chmod(mode | stat.S_IXOTH)
