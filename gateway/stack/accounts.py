"""The unprivileged accounts the local stack's jobs run as, and what they must be able to run.

A root gateway runs each job as another account (sbatch --uid, [job] run_as), so a job cannot read
the gateway's store, its key or another account's workspace. On the local stack these are system
accounts with no login and no home; config/local.toml maps every user to ``rgjob``, and the
hostile-tenant suite maps its attacker to ``rgjob2``.
"""
from __future__ import annotations

import logging
import pwd
import stat
import sys
from pathlib import Path

from gateway.process import CommandError, run_command

log = logging.getLogger(__name__)

JOB_ACCOUNTS = ("rgjob", "rgjob2")


def ensure_job_accounts() -> list[str]:
    """Create the job accounts that are missing; return what was done."""
    done = []
    for name in JOB_ACCOUNTS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            run_command(
                ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                 "--shell", "/usr/sbin/nologin", name],
                timeout=30,
            )
            done.append(f"created job account {name}")
    return done


def _can_run_jobside(account: str, python: str) -> str:
    """'' if ``account`` can import the job side with ``python``, else why not."""
    try:
        run_command(["runuser", "-u", account, "--", python, "-I", "-c", "import gateway.jobside.program"], timeout=60)
    except CommandError as exc:
        return (exc.stderr or exc.stdout or exc.reason).strip().splitlines()[-1] if (exc.stderr or exc.stdout) else exc.reason
    return ""


def ensure_jobside_reachable(python: str = sys.executable) -> list[str]:
    """Let the job accounts run the job side: search (o+x, never read) on the directories above it.

    A pyenv interpreter under /root (mode 700) or a checkout in a mode-700 temporary directory is
    out of a job account's reach, and every job would fail at its first step.
    """
    import gateway

    account = JOB_ACCOUNTS[0]
    problem = _can_run_jobside(account, python)
    if not problem:
        return []
    done = []
    targets = {Path(python), Path(python).resolve(), Path(gateway.__file__).resolve().parent}
    for target in sorted(targets):
        for directory in reversed(target.parents):
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                directory.chmod(mode | stat.S_IXOTH)
                done.append(f"added o+x to {directory} so job accounts can run {python}")
    problem = _can_run_jobside(account, python)
    if problem:
        done.append(f"warning: job account {account} still cannot run the job side with {python}: {problem}")
    return done
