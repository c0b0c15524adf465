"""Run external commands as argv lists with a timeout; every failure is one error type.

Modelled on submitit's and Parsl's runners: never a shell, always a timeout, stdout and stderr
captured, and a single exception that carries the argv, the exit code and both outputs so that a
caller (or a log line) can say exactly what failed.
"""
from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class CommandError(Exception):
    """An external command failed, timed out or could not be started."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str = "",
        stderr: str = "",
        reason: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason or f"exit code {returncode}"
        detail = stderr.strip() or stdout.strip()
        super().__init__(f"{' '.join(self.argv)}: {self.reason}" + (f": {detail}" if detail else ""))


class Runner(Protocol):
    """What code that shells out needs; tests pass a fake with recorded output."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        merge_stderr: bool = False,
    ) -> str: ...


def run_command(
    argv: Sequence[str],
    *,
    timeout: float,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    merge_stderr: bool = False,
    run_as: tuple[int, int] | None = None,
) -> str:
    """Run argv, return its stdout (with stderr appended if ``merge_stderr``); raise CommandError
    on a non-zero exit, a timeout or a missing binary.

    ``run_as`` (uid, gid): run as that user and group with no supplementary groups (needs root)."""
    log.debug("run %s", argv)
    identity = {} if run_as is None else {"user": run_as[0], "group": run_as[1], "extra_groups": []}
    try:
        completed = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
            **identity,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, None, _text(exc.stdout), _text(exc.stderr), f"timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise CommandError(argv, None, "", str(exc), "could not be started") from exc
    if completed.returncode != 0:
        raise CommandError(argv, completed.returncode, completed.stdout, completed.stderr)
    return completed.stdout + (completed.stderr if merge_stderr else "")


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
