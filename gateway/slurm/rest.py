"""Scheduler backend that talks to slurmrestd (Slurm's REST API, openapi v0.0.38 of Slurm 22.05).

Split like the CLI backend: ``SlurmRestBackend`` does HTTP through a ``requests.Session`` passed in
(a fake in unit tests) and the module-level functions turn JSON into ``SlurmJobInfo`` objects by
field name. Authentication is slurmrestd's JWT pass-through: the ``X-SLURM-USER-NAME`` and
``X-SLURM-USER-TOKEN`` headers, with tokens minted by ``scontrol token`` (``TokenProvider``).

What slurmrestd 22.05.8 does, measured on the local stack (tests/fixtures/slurmrestd/ holds the
recorded answers):

- ``POST /slurm/v0.0.38/job/submit`` IGNORES the ``#SBATCH`` lines of ``script``: a script asking
  for ``--job-name``, ``--ntasks=2``, ``--partition=long`` ran as an unnamed 1-task job in the
  default partition. So ``job_description`` parses the directives into the ``job`` object (see
  ``SBATCH_OPTIONS`` for the mapping). ``job.environment`` is required (else HTTP 400 "environment
  must be set"); like sbatch's default ``--export=ALL`` we send the gateway's environment, plus
  what sbatch adds itself (SLURM_CPUS_PER_TASK, SLURM_SUBMIT_DIR, SLURM_SUBMIT_HOST).
- ``GET /slurm/v0.0.38/jobs`` has no id filter: it returns every job in slurmctld's memory. Its
  ``exit_code`` is a raw wait status (exit 3 -> 768, SIGKILL -> 9): ``decode_wait_status``.
  ``?update_time=T`` answers ``304 Not Modified`` (no body) when no job changed after T.
- ``GET /slurmdb/v0.0.38/jobs?step=<id>,<id>`` is the batch form for accounting (``step`` is
  sacct's ``-j`` list; ``/slurmdb/v0.0.38/job/<a>,<b>`` is a 400). One call, ~0.35 s here.
  Its exit codes are WRONG for normal exits: the 22.05 dumper writes ``{"status": "SUCCESS",
  "return_code": 0}`` for every WIFEXITED status (exit 3 included); only signals are right.
- Unknown job id: ``GET``/``DELETE /slurm/v0.0.38/job/<id>`` -> HTTP 500, error 2017.
- A bad or expired token is HTTP 500 with error -1 ("Unspecified error"), not 401; a missing one
  is 401. Errors say ``error_number`` in most answers but ``error_code`` in the submit answer.
- No test-only endpoint exists; ``test_only`` runs ``sbatch --test-only`` through the runner.

``status()`` costs one GET /slurm/<ver>/jobs, plus one GET /slurmdb/<ver>/jobs?step= only when
some ids are unknown to slurmctld and were not seen ending by this backend.

Exit codes we trust, in order: slurmctld's wait status (live jobs and jobs that ended less than
MinJobAge ago), the final record this backend remembered when it last saw the job in slurmctld,
then slurmdbd's record for signals and for COMPLETED (exit 0); a FAILED job known only to slurmdbd
gets ``exit_code=None`` (unknown) rather than the wrong 0.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shlex
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import requests

from gateway.process import CommandError, Runner, run_command
from gateway.slurm.backend import SchedulerError, SlurmJobInfo, test_only_error
from gateway.slurm.cli import is_transient
from gateway.slurm.states import SlurmState

log = logging.getLogger(__name__)

DEFAULT_API_VERSION = "v0.0.38"
DEFAULT_URL = "http://127.0.0.1:6820"

# Slurm error numbers that mean "try again later" (slurm_errno.h): communication with slurmctld
# or slurmdbd failed, or a socket timed out.
_TRANSIENT_ERRNOS = frozenset({1001, 1002, 1003, 1004, 1800, 1801, 1802, 1803, 5004, 7000})
_TRANSIENT_TEXT = re.compile(
    r"Unable to contact slurm controller|Socket timed out|temporarily unavailable|Connection refused"
    r"|Communication connection failure|Zero Bytes were transmitted",
    re.IGNORECASE,
)
_INVALID_JOB_ID = 2017  # ESLURM_INVALID_JOB_ID
_ALREADY_DONE = 2021  # ESLURM_ALREADY_DONE
_UNSPECIFIED = -1  # what 22.05 answers for a rejected (bad or expired) token
_NO_VAL = 0xFFFFFFFE  # Slurm's "not set" for uint32 fields


class SlurmRestError(SchedulerError):
    """slurmrestd refused or failed a request (or could not be reached)."""

    def __init__(
        self,
        message: str,
        *,
        method: str,
        url: str,
        status: int | None,
        errors: list[dict[str, Any]] | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message, argv=[method, url], stderr=_error_text(errors or []), transient=transient)
        self.method = method
        self.url = url
        self.status = status
        self.errors = errors or []

    def has_errno(self, *numbers: int) -> bool:
        return any(_errno(error) in numbers for error in self.errors)


def _errno(error: Mapping[str, Any]) -> int | None:
    # Most answers say "error_number"; the 22.05 job submit answer says "error_code".
    value = error.get("error_number", error.get("error_code"))
    return value if isinstance(value, int) else None


def _error_text(errors: Iterable[Mapping[str, Any]]) -> str:
    parts = []
    for error in errors:
        text = error.get("description") or error.get("error") or ""
        if error.get("description") and error.get("error") and error["error"] not in text:
            text = f"{error['error']}: {text}"
        if text:
            parts.append(str(text))
    return "; ".join(parts)


# --- tokens ---------------------------------------------------------------------------------------

_JWT_LINE = re.compile(r"^SLURM_JWT=(\S+)\s*$", re.MULTILINE)


def parse_scontrol_token(stdout: str) -> str:
    """`scontrol token` prints `SLURM_JWT=<token>`."""
    match = _JWT_LINE.search(stdout)
    if not match:
        raise SchedulerError(f"scontrol token printed no SLURM_JWT= line: {stdout.strip()[:200]!r}")
    return match.group(1)


class TokenProvider:
    """Mint slurmrestd JWTs with `scontrol token` and reuse one until it nears expiry.

    A new token is minted when less than ``refresh_fraction`` of the lifespan remains, so a
    request never goes out with a token about to expire (22.05 answers an expired token with an
    opaque HTTP 500). `scontrol token username=<u>` for a user other than the caller needs root or
    SlurmUser, and slurm.conf must list `AuthAltTypes=auth/jwt`.
    """

    def __init__(
        self,
        user: str,
        *,
        lifespan: int = 3600,
        runner: Runner = run_command,
        clock: Callable[[], float] = time.monotonic,
        refresh_fraction: float = 0.2,
        timeout: float = 30.0,
    ) -> None:
        if lifespan <= 0:
            raise ValueError("token lifespan must be positive")
        if not 0.0 <= refresh_fraction < 1.0:
            raise ValueError("refresh_fraction must be in [0, 1)")
        self.user = user
        self.lifespan = int(lifespan)
        self._run = runner
        self._clock = clock
        self._refresh_fraction = refresh_fraction
        self._timeout = timeout
        self._token: str | None = None
        self._expires = 0.0
        # The poller thread and request threads share one provider: mint once, not per thread.
        self._lock = threading.Lock()

    def token(self) -> str:
        """Return a token with at least ``refresh_fraction`` of its lifespan left."""
        with self._lock:
            now = self._clock()
            if self._token is None or self._expires - now < self.lifespan * self._refresh_fraction:
                self._token = self._mint()
                # Counted from before the call: slurmctld sets the token's exp during it.
                self._expires = now + self.lifespan
            return self._token

    def invalidate(self) -> None:
        """Forget the token (slurmrestd rejected it, e.g. after the JWT key changed)."""
        with self._lock:
            self._token = None

    def _mint(self) -> str:
        argv = ["scontrol", "token", f"username={self.user}", f"lifespan={self.lifespan}"]
        try:
            out = self._run(argv, timeout=self._timeout)
        except CommandError as exc:
            raise SchedulerError(
                f"scontrol token failed ({exc.reason}): {exc.stderr.strip() or exc.stdout.strip()}",
                argv=exc.argv,
                stderr=exc.stderr,
                transient=exc.returncode is None or bool(_TRANSIENT_TEXT.search(exc.stderr)),
            ) from exc
        log.debug("minted a slurmrestd token for %s (lifespan %d s)", self.user, self.lifespan)
        return parse_scontrol_token(out)


# --- JSON -> SlurmJobInfo -------------------------------------------------------------------------


def decode_wait_status(raw: int | None) -> tuple[int | None, int | None]:
    """Split a raw wait status (slurmctld's ``exit_code``) into (exit code, signal).

    Same shape as sacct's ``ExitCode`` "exit:signal": 768 -> (3, 0), 9 -> (0, 9), 0 -> (0, 0).
    """
    if raw is None or not isinstance(raw, int) or raw < 0 or raw >= _NO_VAL:
        return None, None
    signal = raw & 0x7F
    if signal == 0:
        return (raw >> 8) & 0xFF, 0
    if signal == 0x7F:  # stopped, not ended: no exit code yet
        return None, None
    return 0, signal


def format_time(epoch: Any) -> str:
    """Epoch seconds as sacct prints them (local time, ISO without zone); unset -> "Unknown"."""
    if not isinstance(epoch, int) or epoch <= 0 or epoch >= _NO_VAL:
        return "Unknown"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


def format_elapsed(seconds: Any) -> str:
    """Seconds as sacct's Elapsed: [D-]HH:MM:SS."""
    if not isinstance(seconds, int) or seconds < 0:
        return ""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


def parse_slurm_job(job: Mapping[str, Any]) -> SlurmJobInfo:
    """One job of ``GET /slurm/<ver>/jobs`` (slurmctld's view)."""
    raw_state = str(job.get("job_state") or "")
    state = SlurmState.parse(raw_state)
    exit_code = signal = None
    start = end = "Unknown"
    elapsed = ""
    if state.is_terminal:
        # Only a job that has ended has a meaningful wait status (a live one shows 0).
        exit_code, signal = decode_wait_status(job.get("exit_code"))
        start, end = format_time(job.get("start_time")), format_time(job.get("end_time"))
        if isinstance(job.get("start_time"), int) and isinstance(job.get("end_time"), int) and job["start_time"] > 0:
            elapsed = format_elapsed(max(0, job["end_time"] - job["start_time"]))
    elif state != SlurmState.PENDING:
        # A pending job's start_time is only the scheduler's estimate.
        start = format_time(job.get("start_time"))
    return SlurmJobInfo(
        job_id=str(job["job_id"]),
        state=state,
        raw_state=raw_state,
        reason=str(job.get("state_reason") or ""),
        exit_code=exit_code,
        signal=signal,
        name=str(job.get("name") or ""),
        comment=str(job.get("comment") or ""),
        start=start,
        end=end,
        elapsed=elapsed,
        # The CLI backend's names for the same two views: slurmctld's ("squeue"), accounting ("sacct").
        source="squeue",
    )


def parse_slurm_jobs(payload: Mapping[str, Any]) -> dict[str, SlurmJobInfo]:
    """Every job of a ``GET /slurm/<ver>/jobs`` answer, by id."""
    jobs = {}
    for job in payload.get("jobs") or []:
        try:
            info = parse_slurm_job(job)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping a slurmrestd job record: %s", exc)
            continue
        jobs[info.job_id] = info
    return jobs


def decode_db_exit_code(value: Any, state: SlurmState) -> tuple[int | None, int | None]:
    """slurmdbd's ``{"status", "return_code", "signal"}`` -> (exit code, signal), trusting only
    what 22.05 gets right: signals, and exit 0 for a COMPLETED job."""
    if not isinstance(value, Mapping):
        return None, None
    status = value.get("status")
    if status == "SIGNALED":
        signal = (value.get("signal") or {}).get("signal_id")
        return 0, signal if isinstance(signal, int) else None
    if status == "SUCCESS":
        # 22.05 writes SUCCESS/0 for every normal exit, whatever the code: only a COMPLETED job's
        # 0 is known to be true.
        return (0, 0) if state == SlurmState.COMPLETED else (None, None)
    if status == "ERROR" and isinstance(value.get("return_code"), int):
        return value["return_code"], 0
    return None, None


def parse_slurmdb_job(job: Mapping[str, Any]) -> SlurmJobInfo:
    """One job of ``GET /slurmdb/<ver>/jobs`` (the accounting database's view)."""
    state_block = job.get("state") or {}
    raw_state = str(state_block.get("current") or "")
    state = SlurmState.parse(raw_state)
    exit_code, signal = decode_db_exit_code(job.get("exit_code"), state)
    times = job.get("time") or {}
    comment = job.get("comment")
    if isinstance(comment, Mapping):
        comment = comment.get("job")
    return SlurmJobInfo(
        job_id=str(job["job_id"]),
        state=state,
        raw_state=raw_state,
        reason=str(state_block.get("reason") or ""),
        exit_code=exit_code,
        signal=signal,
        name=str(job.get("name") or ""),
        comment=str(comment or ""),
        start=format_time(times.get("start")),
        end=format_time(times.get("end")),
        elapsed=format_elapsed(times.get("elapsed")),
        source="sacct",
    )


def parse_slurmdb_jobs(payload: Mapping[str, Any]) -> dict[str, SlurmJobInfo]:
    """Every job of a ``GET /slurmdb/<ver>/jobs`` answer, by id.

    A requeued job has several records with one id (the query asks for duplicates); the one
    submitted last is the current one.
    """
    latest: dict[str, tuple[int, SlurmJobInfo]] = {}
    for job in payload.get("jobs") or []:
        try:
            info = parse_slurmdb_job(job)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping a slurmdbd job record: %s", exc)
            continue
        submitted = (job.get("time") or {}).get("submission")
        order = submitted if isinstance(submitted, int) else 0
        if info.job_id not in latest or order >= latest[info.job_id][0]:
            latest[info.job_id] = (order, info)
    return {job_id: info for job_id, (_, info) in latest.items()}


# --- #SBATCH lines -> job description -------------------------------------------------------------


def parse_time_limit(value: str) -> int:
    """A Slurm time spec (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`) in minutes, seconds rounded
    up as Slurm's time_str2mins does."""
    text = value.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise ValueError(f"not a Slurm time limit: {value!r}")
    days, first, second, third = match.groups()
    if days is not None:
        # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:
        seconds = int(first) * 60 + int(second)
    else:
        seconds = int(first) * 60
    return math.ceil(seconds / 60)


_MEMORY_UNITS = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_memory_mb(value: str) -> int:
    """A Slurm memory size (`1000`, `1000M`, `4G`, `512K`) in MB (no suffix means MB)."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", value.strip().upper())
    if not match:
        raise ValueError(f"not a Slurm memory size: {value!r}")
    return math.ceil(int(match.group(1)) * _MEMORY_UNITS[match.group(2) or "M"])


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1: {value!r}")
    return number


def _nodes(value: str) -> list[int]:
    low, _, high = value.partition("-")
    return [_positive_int(low), _positive_int(high or low)]


# sbatch option -> (job description key, converter). This is the mapping the REST backend applies
# because slurmrestd 22.05 ignores #SBATCH lines; an option missing here is refused (loudly),
# never dropped.
SBATCH_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "job-name": ("name", str),
    "comment": ("comment", str),
    "ntasks": ("tasks", _positive_int),
    "cpus-per-task": ("cpus_per_task", _positive_int),
    "mem-per-cpu": ("memory_per_cpu", parse_memory_mb),
    "mem": ("memory_per_node", parse_memory_mb),
    "time": ("time_limit", parse_time_limit),
    "partition": ("partition", str),
    "account": ("account", str),
    "qos": ("qos", str),
    "output": ("standard_output", str),
    "error": ("standard_error", str),
    "input": ("standard_input", str),
    "dependency": ("dependency", str),
    "chdir": ("current_working_directory", str),
    "nodes": ("nodes", _nodes),
    "ntasks-per-node": ("tasks_per_node", _positive_int),
    "constraint": ("constraints", str),
    "gres": ("gres", str),
    "gpus": ("gpus", str),
    "reservation": ("reservation", str),
    "nice": ("nice", int),
    "mail-type": ("mail_type", str),
    "mail-user": ("mail_user", str),
    "wckey": ("wckey", str),
    "licenses": ("licenses", str),
    "open-mode": ("open_mode", str),
}
# Flags without a value.
SBATCH_FLAGS: dict[str, tuple[str, Any]] = {
    "requeue": ("requeue", True),
    "no-requeue": ("requeue", False),
    "hold": ("hold", True),
    "exclusive": ("exclusive", "exclusive"),
    "oversubscribe": ("oversubscribe", True),
    "kill-on-invalid-dep=yes": ("kill_on_invalid_dependency", True),
    "kill-on-invalid-dep=no": ("kill_on_invalid_dependency", False),
}
SHORT_OPTIONS = {
    "J": "job-name", "n": "ntasks", "c": "cpus-per-task", "t": "time", "p": "partition", "A": "account",
    "q": "qos", "o": "output", "e": "error", "i": "input", "d": "dependency", "D": "chdir", "N": "nodes",
    "C": "constraint", "G": "gpus", "H": "hold",
}
# sbatch's own legacy spellings.
ALIASES = {"workdir": "chdir", "name": "job-name", "tasks": "ntasks", "mem_per_cpu": "mem-per-cpu"}


def sbatch_directives(script: str) -> list[str]:
    """The arguments of the script's #SBATCH lines, split as sbatch splits them (quotes honoured,
    a ` #` starts a comment); like sbatch, stop at the first line that is not a comment or blank."""
    args: list[str] = []
    for number, line in enumerate(script.splitlines(), start=1):
        if line.startswith("#SBATCH") and (len(line) == 7 or line[7].isspace()):
            try:
                args.extend(shlex.split(line[7:], comments=True))
            except ValueError as exc:
                raise SchedulerError(f"line {number}: cannot parse #SBATCH directive {line!r}: {exc}") from exc
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return args


def parse_sbatch_options(script: str) -> list[tuple[str, str | None]]:
    """The script's #SBATCH options as (long option name, value; None for a flag), in order.

    Raises SchedulerError for an option this module does not map (see SBATCH_OPTIONS).
    """
    return _normalise(sbatch_directives(script))


def _normalise(args: list[str]) -> list[tuple[str, str | None]]:
    """Turn --opt=value, --opt value, -o value, -ovalue into (long name, value or None for flags)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--"):
            body = arg[2:]
            if body in SBATCH_FLAGS:
                out.append((body, None))
                continue
            name, eq, value = body.partition("=")
            name = ALIASES.get(name, name)
            if name in ("export", "uid", "gid"):
                out.append((name, value if eq else (args[i] if i < len(args) else "")))
                i += 0 if eq else 1
                continue
            if name not in SBATCH_OPTIONS:
                raise SchedulerError(f"#SBATCH {arg}: option not supported by the REST backend")
            if not eq:
                if i >= len(args):
                    raise SchedulerError(f"#SBATCH {arg}: missing value")
                value = args[i]
                i += 1
            out.append((name, value))
        elif arg.startswith("-") and len(arg) >= 2 and arg[1] in SHORT_OPTIONS:
            name = SHORT_OPTIONS[arg[1]]
            if name == "hold":
                out.append(("hold", None))
                continue
            value = arg[2:].lstrip("=")
            if not value:
                if i >= len(args):
                    raise SchedulerError(f"#SBATCH {arg}: missing value")
                value = args[i]
                i += 1
            out.append((name, value))
        else:
            raise SchedulerError(f"#SBATCH {arg}: option not supported by the REST backend")
    return out


def export_environment(spec: str, base: Mapping[str, str]) -> dict[str, str]:
    """sbatch --export: ALL, NONE, or a list of NAME / NAME=value, optionally starting with ALL."""
    items = [item for item in spec.split(",") if item]
    if not items or items[0].upper() not in ("ALL", "NONE"):
        chosen: dict[str, str] = {}
    elif items.pop(0).upper() == "ALL":
        chosen = dict(base)
    else:
        chosen = {}
    for item in items:
        name, eq, value = item.partition("=")
        if eq:
            chosen[name] = value
        elif name in base:
            chosen[name] = base[name]
    # slurmrestd refuses an empty environment; a job always gets at least a PATH.
    chosen.setdefault("PATH", base.get("PATH", "/usr/bin:/bin"))
    return chosen


def job_description(
    script: str,
    *,
    environment: Mapping[str, str],
    cwd: str,
    after_any: str | None = None,
    submit_host: str | None = None,
) -> dict[str, Any]:
    """The ``job`` object of ``POST /slurm/<ver>/job/submit`` for a script with #SBATCH lines.

    Later directives override earlier ones, as with sbatch; ``after_any`` overrides the script's
    --dependency, as sbatch's command line does. ``cwd`` is the submit directory (and the job's
    working directory unless --chdir says otherwise).
    """
    job: dict[str, Any] = {}
    export = "ALL"
    for name, value in parse_sbatch_options(script):
        if name == "export":
            export = value or "ALL"
            continue
        if name in ("uid", "gid"):
            # Not job description fields: slurmrestd runs a job as the user whose token submits it
            # (submit_user), with that user's primary group.
            continue
        if value is None:
            key, flag_value = SBATCH_FLAGS[name]
            job[key] = flag_value
            continue
        key, convert = SBATCH_OPTIONS[name]
        try:
            job[key] = convert(value)
        except ValueError as exc:
            raise SchedulerError(f"#SBATCH --{name}={value}: {exc}") from exc
    if after_any:
        job["dependency"] = f"afterany:{after_any}"
    job.setdefault("current_working_directory", cwd)
    job["environment"] = job_environment(
        export, environment, cpus_per_task=job.get("cpus_per_task"), submit_dir=cwd, submit_host=submit_host
    )
    return job


def submit_user(script: str) -> str | None:
    """The user a script asks to run as (``#SBATCH --uid``), or None for the token's own user."""
    users = [value for name, value in parse_sbatch_options(script) if name == "uid" and value]
    return users[-1] if users else None


def job_environment(
    export: str,
    base: Mapping[str, str],
    *,
    cpus_per_task: int | None,
    submit_dir: str,
    submit_host: str | None = None,
) -> dict[str, str]:
    """The job's environment as sbatch would build it from ``base`` (its own environment).

    Adds the variables sbatch itself sets and slurmd does not (found by diffing `env` in a job
    submitted both ways): srun inside the job sizes its steps by SLURM_CPUS_PER_TASK.
    """
    env = export_environment(export, base)
    if cpus_per_task is not None:
        env["SLURM_CPUS_PER_TASK"] = str(cpus_per_task)
    env["SLURM_SUBMIT_DIR"] = submit_dir
    env["SLURM_SUBMIT_HOST"] = submit_host or socket.gethostname()
    return env


# --- the backend ----------------------------------------------------------------------------------


class SlurmRestBackend:
    """Talk to Slurm through slurmrestd (JWT auth)."""

    def __init__(
        self,
        base_url: str,
        user: str,
        token_provider: TokenProvider,
        session: requests.Session | None = None,
        api_version: str = DEFAULT_API_VERSION,
        timeout: float = 30.0,
        *,
        environment: Mapping[str, str] | None = None,
        cwd: str | None = None,
        runner: Runner = run_command,
        remember: int = 10000,
        use_update_time: bool = False,
        max_cache_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``environment``/``cwd``: what jobs get (default: this process's, as sbatch does).
        ``runner`` runs `sbatch --test-only`. ``remember``: how many final job records to keep.
        ``use_update_time``: send ``?update_time`` and reuse the last answer on 304, for at most
        ``max_cache_age`` seconds (see ``_live_jobs`` for why it is off by default)."""
        self.base_url = base_url.rstrip("/")
        self.user = user
        self.tokens = token_provider
        self.session = session or requests.Session()
        self.api_version = api_version
        self.timeout = timeout
        self._environment = environment
        self._cwd = cwd
        self._run = runner
        # Final records seen in slurmctld, kept after the job leaves its memory (MinJobAge):
        # their exit codes are right, slurmdbd's are not (22.05).
        self._final: OrderedDict[str, SlurmJobInfo] = OrderedDict()
        self._remember = remember
        # The last full /jobs answer, the slurmctld-clock time it is current from and when we got it.
        self._use_update_time = use_update_time
        self._max_cache_age = max_cache_age
        self._clock = clock
        self._live: dict[str, SlurmJobInfo] | None = None
        self._live_stamp = 0
        self._live_fetched = 0.0
        # The poller thread and request threads share the backend and its caches.
        self._lock = threading.Lock()
        # Tokens of the accounts jobs run as (#SBATCH --uid), minted like the backend's own.
        self._user_tokens: dict[str, TokenProvider] = {}

    # -- HTTP ---------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _tokens_for(self, user: str) -> TokenProvider:
        with self._lock:
            if user not in self._user_tokens:
                own = self.tokens
                self._user_tokens[user] = TokenProvider(user, lifespan=own.lifespan, runner=own._run, timeout=own._timeout)
            return self._user_tokens[user]

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (200,),
        as_user: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Send one request (as ``as_user``, default this backend's user); return (status, JSON).

        Every failure becomes one SlurmRestError.
        """
        url = self._url(path)
        user, tokens = (self.user, self.tokens) if as_user in (None, self.user) else (as_user, self._tokens_for(as_user))
        # GET and DELETE are safe to repeat once with a fresh token; a submit is not.
        attempts = 2 if method in ("GET", "DELETE") else 1
        for attempt in range(attempts):
            headers = {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": tokens.token()}
            try:
                response = self.session.request(
                    method, url, params=params, json=body, headers=headers, timeout=self.timeout
                )
            except requests.RequestException as exc:
                raise SlurmRestError(
                    f"slurmrestd {method} {url} failed: {exc}", method=method, url=url, status=None, transient=True
                ) from exc
            status = response.status_code
            payload = _json(response)
            errors = [dict(e) for e in payload.get("errors") or [] if isinstance(e, Mapping)]
            if status in ok:
                return status, payload
            rejected_token = status == 401 or (status == 500 and errors and all(_errno(e) == _UNSPECIFIED for e in errors))
            if rejected_token:
                # 401: no/unknown token; 22.05 answers an expired or bad one with 500 and error -1.
                tokens.invalidate()
                if attempt + 1 < attempts:
                    log.info("slurmrestd %s %s: HTTP %d, retrying with a fresh token", method, url, status)
                    continue
            detail = _error_text(errors) or (response.text or "").strip()[:300]
            transient = status in (502, 503, 504) or any(_errno(e) in _TRANSIENT_ERRNOS for e in errors) or bool(
                _TRANSIENT_TEXT.search(detail)
            )
            raise SlurmRestError(
                f"slurmrestd {method} {url}: HTTP {status}" + (f": {detail}" if detail else ""),
                method=method,
                url=url,
                status=status,
                errors=errors,
                transient=transient,
            )
        raise AssertionError("unreachable")

    # -- SchedulerBackend -------------------------------------------------------------------------

    def submit(
        self, script: str, *, environment: Mapping[str, str] | None = None, after_any: str | None = None
    ) -> str:
        """Submit with the script's #SBATCH options mapped into the job description.

        The job inherits this backend's environment (default: the gateway's, like sbatch's
        --export=ALL) plus ``environment``. ``after_any`` (not in the Protocol) overrides the
        script's --dependency with ``afterany:<id>``.
        """
        base = dict(os.environ) if self._environment is None else dict(self._environment)
        base.update(environment or {})
        job = job_description(script, environment=base, cwd=self._cwd or os.getcwd(), after_any=after_any)
        # A job runs as the user whose token submits it: --uid becomes a token minted for that user.
        _, payload = self._request(
            "POST", f"slurm/{self.api_version}/job/submit", body={"script": script, "job": job}, as_user=submit_user(script)
        )
        job_id = payload.get("job_id")
        if not isinstance(job_id, int):
            raise SchedulerError(f"slurmrestd accepted the job but returned no job id: {str(payload)[:300]}")
        message = payload.get("job_submit_user_msg")
        if message:
            log.info("job %s: job_submit says %s", job_id, message)
        return str(job_id)

    def status(self, job_ids: Iterable[str]) -> dict[str, SlurmJobInfo]:
        """One GET /slurm/<ver>/jobs for all; one GET /slurmdb/<ver>/jobs?step= for ids that
        slurmctld no longer knows and this backend did not see end."""
        ids = sorted({str(i) for i in job_ids if i}, key=int)
        if not ids:
            return {}
        live = self._live_jobs()
        found: dict[str, SlurmJobInfo] = {}
        for job_id in ids:
            info = live.get(job_id)
            if info is not None:
                found[job_id] = info
                if info.state.is_terminal:
                    self._keep_final(info)
            elif (remembered := self._remembered(job_id)) is not None:
                found[job_id] = remembered
        missing = [i for i in ids if i not in found]
        if missing:
            accounted = self._accounting(missing)
            found.update({i: accounted[i] for i in missing if i in accounted})
        return found

    def find_by_name(self, name: str, *, since: float) -> list[str]:
        ids = sorted((i for i, info in self._live_jobs().items() if info.name == name), key=int)
        if ids:
            return ids
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
        _, payload = self._request(
            "GET",
            f"slurmdb/{self.api_version}/jobs",
            params={"job_name": name, "submit_time": start, "skip_steps": "true"},
        )
        return sorted(parse_slurmdb_jobs(payload), key=int)

    def cancel(self, job_id: str) -> None:
        try:
            self._request("DELETE", f"slurm/{self.api_version}/job/{job_id}")
        except SlurmRestError as exc:
            # Unlike scancel (exit 0), slurmrestd answers 500 for an unknown or purged id.
            if exc.has_errno(_INVALID_JOB_ID, _ALREADY_DONE):
                log.info("cancel %s: Slurm no longer knows the job", job_id)
                return
            raise

    def test_only(self, script: str) -> str:
        # slurmrestd 22.05 has no test-only endpoint (job/submit always submits), so ask sbatch on
        # this host; without the Slurm client installed this is a clear SchedulerError.
        try:
            out = self._run(["sbatch", "--test-only"], timeout=self.timeout, input=script, merge_stderr=True)
        except CommandError as exc:
            if exc.returncode is None and "could not be started" in exc.reason:
                raise SchedulerError(
                    "sbatch --test-only is not available: the REST backend needs the Slurm client for it"
                ) from exc
            raise test_only_error(exc, transient=is_transient(exc)) from exc
        return out.strip()

    def ping(self) -> bool:
        try:
            _, payload = self._request("GET", f"slurm/{self.api_version}/ping")
        except SchedulerError as exc:
            log.info("slurmrestd ping failed: %s", exc.message)
            return False
        pings = payload.get("pings") or []
        return any(isinstance(p, Mapping) and p.get("ping") == "UP" for p in pings)

    # -- helpers ----------------------------------------------------------------------------------

    def _live_jobs(self) -> dict[str, SlurmJobInfo]:
        """All jobs slurmctld knows, from one GET (one RPC to slurmctld either way).

        With ``use_update_time`` the GET carries ``?update_time=<stamp>`` and a 304 reuses the last
        answer, which spares slurmctld packing every job. The stamp must be on slurmctld's clock
        (the answer has no Date header), so it is the newest past event in the last answer; a
        change in that same second but after our GET would hide behind a 304 until the next
        change, so a cached answer is never reused for longer than ``max_cache_age``.
        """
        with self._lock:
            cached = self._live
            params = None
            if (
                self._use_update_time
                and cached is not None
                and self._live_stamp > 0
                and self._clock() - self._live_fetched < self._max_cache_age
            ):
                params = {"update_time": self._live_stamp}
        status, payload = self._request("GET", f"slurm/{self.api_version}/jobs", params=params, ok=(200, 304))
        if status == 304 and cached is not None:
            return cached
        live = parse_slurm_jobs(payload)
        with self._lock:
            self._live = live
            self._live_stamp = _server_stamp(payload)
            self._live_fetched = self._clock()
        return live

    def _accounting(self, ids: list[str]) -> dict[str, SlurmJobInfo]:
        _, payload = self._request(
            "GET",
            f"slurmdb/{self.api_version}/jobs",
            params={"step": ",".join(ids), "skip_steps": "true"},
        )
        return parse_slurmdb_jobs(payload)

    def _keep_final(self, info: SlurmJobInfo) -> None:
        with self._lock:
            self._final[info.job_id] = info
            self._final.move_to_end(info.job_id)
            while len(self._final) > self._remember:
                self._final.popitem(last=False)

    def _remembered(self, job_id: str) -> SlurmJobInfo | None:
        with self._lock:
            return self._final.get(job_id)


def _json(response: requests.Response) -> dict[str, Any]:
    if response.status_code == 304 or not response.content:
        return {}
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _server_stamp(payload: Mapping[str, Any]) -> int:
    """The newest past event in a /jobs answer, on slurmctld's clock (the answer has no Date).

    ``update_time`` is compared with slurmctld's last job change, so a stamp from the gateway's
    clock could hide changes when the clocks differ. Only past events count: a pending job's
    start_time and a running job's end_time are estimates in the future. 0 disables update_time.
    """
    stamp = 0
    for job in payload.get("jobs") or []:
        if not isinstance(job, Mapping):
            continue
        state = SlurmState.parse(str(job.get("job_state") or ""))
        candidates = [job.get("submit_time")]
        if state != SlurmState.PENDING:
            candidates.append(job.get("start_time"))
        if state.is_terminal:
            candidates.append(job.get("end_time"))
        for value in candidates:
            if isinstance(value, int) and 0 < value < _NO_VAL:
                stamp = max(stamp, value)
    return stamp
