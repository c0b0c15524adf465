"""The gateway's one #SBATCH reader, shared by the REST and pyslurm backends.

Neither slurmrestd 22.05 (its job/submit ignores the #SBATCH lines of ``script``) nor pyslurm (its
``load_sbatch_options()`` only reads files, cuts values at any ``#`` and does not undo shell
quoting) reads a script's directives the way sbatch does, so both backends read them here:
``parse_sbatch_options`` splits and normalises them (an option not in ``SBATCH_OPTIONS`` or
``SBATCH_FLAGS`` is refused, never dropped), ``map_directives`` maps them to a backend's field
names, and ``job_environment`` builds the environment sbatch would give the job. The CLI backend
needs none of this: sbatch reads its own directives.
"""
from __future__ import annotations

import math
import re
import shlex
import socket
from collections.abc import Callable, Mapping
from typing import Any

from gateway.slurm.backend import SchedulerError
from gateway.slurm.times import parse_time_limit

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


# sbatch option -> (slurmrestd job description key, converter). The options the reader knows (one
# missing here is refused, loudly, never dropped); pyslurm_backend.PYSLURM_OPTIONS maps the same
# names to pyslurm's attributes.
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


# Backend-neutral: the REST and pyslurm backends refuse the same options with the same words.
UNSUPPORTED = "option not supported by the gateway's #SBATCH reader (rest and pyslurm backends)"


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

    Raises SchedulerError for an option this module does not know (see SBATCH_OPTIONS).
    """
    return _normalise(sbatch_directives(script))


def _normalise(args: list[str]) -> list[tuple[str, str | None]]:
    """Turn --opt=value, --opt value, -o value, -ovalue into (long name, value or None for flags)."""
    out: list[tuple[str, str | None]] = []
    i = 0

    def next_value(arg: str) -> str:
        # The option's value is the next argument (`--opt value`, `-o value`).
        nonlocal i
        if i >= len(args):
            raise SchedulerError(f"#SBATCH {arg}: missing value")
        i += 1
        return args[i - 1]

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
                raise SchedulerError(f"#SBATCH {arg}: {UNSUPPORTED}")
            out.append((name, value if eq else next_value(arg)))
        elif arg.startswith("-") and len(arg) >= 2 and arg[1] in SHORT_OPTIONS:
            name = SHORT_OPTIONS[arg[1]]
            if name == "hold":
                out.append(("hold", None))
                continue
            out.append((name, arg[2:].lstrip("=") or next_value(arg)))
        else:
            raise SchedulerError(f"#SBATCH {arg}: {UNSUPPORTED}")
    return out


def map_directives(
    script: str,
    options: Mapping[str, tuple[str, Callable[[str], Any]]],
    flags: Mapping[str, tuple[str, Any]],
    *,
    run_as: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], str]:
    """A script's #SBATCH options as a backend's fields, and its --export spec (default "ALL").

    ``options``/``flags``: the backend's (field, converter) / (field, value) for each name of
    SBATCH_OPTIONS / SBATCH_FLAGS. ``run_as`` names the fields for --uid and --gid; without it they
    are no fields (slurmrestd runs a job as the user whose token submits it: ``submit_user``).
    Later directives override earlier ones, as with sbatch.
    """
    fields: dict[str, Any] = {}
    export = "ALL"
    for name, value in parse_sbatch_options(script):
        if name == "export":
            export = value or "ALL"
        elif name in ("uid", "gid"):
            if run_as is not None:
                fields[run_as[name]] = value
        elif value is None:
            key, flag_value = flags[name]
            fields[key] = flag_value
        else:
            key, convert = options[name]
            try:
                fields[key] = convert(value)
            except ValueError as exc:
                raise SchedulerError(f"#SBATCH --{name}={value}: {exc}") from exc
    return fields, export


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


def submit_user(script: str) -> str | None:
    """The user a script asks to run as (``#SBATCH --uid``), or None (the REST backend: the token's
    own user)."""
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
