"""Scheduler backend on pyslurm 25.11 (Slurm's C API), for sites running Slurm >= 25.11.

pyslurm must match the Slurm major release it was built against; 25.11 will not build against this
project's Slurm 22.05, so this backend is tested against a fake module that mirrors the real API
(tests/unit/test_slurm_pyslurm.py). The API used, from PySlurm/pyslurm (25.11.x branch):

- ``pyslurm.JobSubmitDescription(**attrs)`` and ``.submit() -> int``
  (pyslurm/core/job/submission.pyx; attribute names in submission.pxd). ``script`` is a path or
  the script text; we pass a path because pyslurm decides with ``Path(script).is_file()``, which
  raises ENAMETOOLONG for a long script text with a long line between two slashes.
- ``pyslurm.Jobs.load()`` -> a MultiClusterMap of ``pyslurm.Job`` (pyslurm/core/job/job.pyx,
  pyslurm/xcollections.pyx: ``.values()`` spans clusters). ``Job.state``, ``state_reason``,
  ``name``, ``comment``, ``exit_code`` / ``exit_code_signal`` (already decoded from the wait
  status), ``start_time`` / ``end_time`` (epoch or None), ``run_time`` (seconds).
- ``pyslurm.Job(job_id).cancel()``: SIGKILL through slurm_kill_job; pyslurm itself ignores
  ESLURM_ALREADY_DONE and ESLURM_INVALID_JOB_ID for it.
- ``pyslurm.db.Jobs.load(db_filter=pyslurm.db.JobFilter(ids=[...]))`` -> MultiClusterMap of
  ``pyslurm.db.Job`` (pyslurm/db/job.pyx, job.pxd): same attribute names, plus ``elapsed_time``.
- ``pyslurm.slurmctld.ping_primary()`` -> ``PingResponse.is_responding``
  (pyslurm/core/slurmctld/base.pyx).
- Errors: ``pyslurm.RPCError`` with ``.errno`` and ``.msg`` (pyslurm/core/error.pyx);
  JobSubmitDescription raises ValueError for inconsistent options.

pyslurm's own ``load_sbatch_options()`` is not used: it only reads script files, cuts values at
any ``#`` and does not undo shell quoting. The #SBATCH lines are read by the gateway's one #SBATCH
reader, shared with the REST backend (gateway.slurm.directives), and mapped to pyslurm's attribute
names.
"""
from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from gateway.process import Runner, run_command
from gateway.slurm.backend import TRANSIENT_ERRNOS, SchedulerError, SlurmJobInfo
from gateway.slurm.accounting import SacctAccounting, SlurmUsage
from gateway.slurm.cli import release_with_scontrol, sbatch_test_only
from gateway.slurm.directives import job_environment, map_directives
from gateway.slurm.states import SlurmState
from gateway.slurm.times import format_elapsed, format_time

log = logging.getLogger(__name__)



def _text(value: str) -> str:
    return value


def _int(value: str) -> int:
    return int(value)


# sbatch option -> (JobSubmitDescription attribute, converter); the same options as the #SBATCH
# reader's SBATCH_OPTIONS (gateway.slurm.directives). pyslurm parses sizes ("1000M") and time specs ("01:00:00") itself.
PYSLURM_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "job-name": ("name", _text),
    "comment": ("comment", _text),
    "ntasks": ("ntasks", _int),
    "cpus-per-task": ("cpus_per_task", _int),
    "mem-per-cpu": ("memory_per_cpu", _text),
    "mem": ("memory_per_node", _text),
    "time": ("time_limit", _text),
    "partition": ("partitions", _text),
    "account": ("account", _text),
    "qos": ("qos", _text),
    "output": ("standard_output", _text),
    "error": ("standard_error", _text),
    "input": ("standard_in", _text),
    "dependency": ("dependencies", _text),
    "chdir": ("working_directory", _text),
    "nodes": ("nodes", _text),
    "ntasks-per-node": ("ntasks_per_node", _int),
    "constraint": ("constraints", _text),
    "gres": ("gres_per_node", _text),
    "gpus": ("gpus", _text),
    "reservation": ("reservations", _text),
    "nice": ("nice", _int),
    "mail-type": ("mail_types", _text),
    "mail-user": ("mail_user", _text),
    "wckey": ("wckey", _text),
    "licenses": ("licenses", _text),
    "open-mode": ("log_files_open_mode", _text),
}
PYSLURM_FLAGS: dict[str, tuple[str, Any]] = {
    "requeue": ("is_requeueable", True),
    "no-requeue": ("is_requeueable", False),
    "hold": ("priority", 0),  # pyslurm: "sbatch's --hold is a priority of 0"
    "exclusive": ("resource_sharing", "exclusive"),
    "oversubscribe": ("resource_sharing", "yes"),
    "kill-on-invalid-dep=yes": ("kill_on_invalid_dependency", True),
    "kill-on-invalid-dep=no": ("kill_on_invalid_dependency", False),
}


_RUN_AS = {"uid": "user_id", "gid": "group_id"}


def submit_attributes(
    script: str,
    *,
    environment: Mapping[str, str],
    cwd: str,
    after_any: str | None = None,
) -> dict[str, Any]:
    """JobSubmitDescription attributes for a script's #SBATCH lines (``script`` itself excluded)."""
    # sbatch --uid/--gid from a root gateway ([job] run_as): JobSubmitDescription's user and group.
    attrs, export = map_directives(script, PYSLURM_OPTIONS, PYSLURM_FLAGS, run_as=_RUN_AS)
    if after_any:
        attrs["dependencies"] = f"afterany:{after_any}"
    attrs.setdefault("working_directory", cwd)
    attrs["environment"] = job_environment(
        export, environment, cpus_per_task=attrs.get("cpus_per_task"), submit_dir=cwd
    )
    return attrs


def _epoch(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def job_info(job: Any, *, source: str) -> SlurmJobInfo:
    """A pyslurm.Job (source "squeue") or pyslurm.db.Job (source "sacct") as SlurmJobInfo."""
    raw_state = str(getattr(job, "state", "") or "")
    state = SlurmState.parse(raw_state)
    exit_code = signal = None
    if state.is_terminal:
        exit_code = getattr(job, "exit_code", None)
        signal = getattr(job, "exit_code_signal", None)
    start = _epoch(getattr(job, "start_time", None))
    end = _epoch(getattr(job, "end_time", None)) if state.is_terminal else None
    if source == "sacct":
        seconds = getattr(job, "elapsed_time", None)
    else:
        seconds = getattr(job, "run_time", None) if state.is_terminal else None
    return SlurmJobInfo(
        job_id=str(job.id),
        state=state,
        raw_state=raw_state,
        reason=str(getattr(job, "state_reason", "") or ""),
        exit_code=exit_code if isinstance(exit_code, int) else None,
        signal=signal if isinstance(signal, int) else None,
        name=str(getattr(job, "name", "") or ""),
        comment=str(getattr(job, "comment", "") or ""),
        # A pending job's start_time is the scheduler's estimate, as in squeue.
        start=format_time(start) if state != SlurmState.PENDING else "Unknown",
        end=format_time(end),
        elapsed=format_elapsed(seconds) if seconds is not None else "",
        source=source,
    )


class PyslurmBackend:
    """Talk to Slurm through pyslurm (no subprocesses except `sbatch --test-only`)."""

    def __init__(
        self,
        pyslurm_module: ModuleType | Any | None = None,
        *,
        environment: Mapping[str, str] | None = None,
        cwd: str | None = None,
        runner: Runner = run_command,
        timeout: float = 30.0,
    ) -> None:
        """``pyslurm_module``: the module (tests pass a fake); imported on first use otherwise."""
        self._module = pyslurm_module
        self._environment = environment
        self._cwd = cwd
        self._run = runner
        self._timeout = timeout

    def _pyslurm(self) -> Any:
        if self._module is None:
            try:
                module = importlib.import_module("pyslurm")
                # Subpackages are attributes only once imported.
                importlib.import_module("pyslurm.db")
                importlib.import_module("pyslurm.slurmctld")
            except ImportError as exc:
                raise SchedulerError(
                    "SLURM_BACKEND=pyslurm needs the pyslurm package built for this Slurm "
                    f"(pyslurm 25.11 for Slurm 25.11): {exc}"
                ) from exc
            self._module = module
        return self._module

    def _error(self, what: str, exc: BaseException) -> SchedulerError:
        """Translate a pyslurm failure once, here, with what we were doing."""
        errno = getattr(exc, "errno", None)
        message = getattr(exc, "msg", None) or str(exc)
        detail = f" (Slurm errno {errno})" if isinstance(errno, int) else ""
        return SchedulerError(
            f"pyslurm {what} failed: {message}{detail}",
            stderr=str(message),
            transient=isinstance(errno, int) and errno in TRANSIENT_ERRNOS,
        )

    # -- SchedulerBackend -------------------------------------------------------------------------

    def submit(
        self, script: str, *, environment: Mapping[str, str] | None = None, after_any: str | None = None
    ) -> str:
        """Submit; the job inherits this backend's environment (default: the gateway's) plus
        ``environment``. ``after_any`` (not in the Protocol) overrides the script's --dependency."""
        ps = self._pyslurm()
        base = dict(os.environ) if self._environment is None else dict(self._environment)
        base.update(environment or {})
        attrs = submit_attributes(script, environment=base, cwd=self._cwd or os.getcwd(), after_any=after_any)
        # The path, not the text: see the module docstring. pyslurm reads the file in submit().
        with tempfile.NamedTemporaryFile("w", prefix="relion-gateway-", suffix=".sbatch") as handle:
            handle.write(script)
            handle.flush()
            try:
                job_id = ps.JobSubmitDescription(script=handle.name, **attrs).submit()
            except ps.RPCError as exc:
                raise self._error("submit", exc) from exc
            except ValueError as exc:
                raise SchedulerError(f"pyslurm refused the job description: {exc}") from exc
        return str(job_id)

    def status(self, job_ids: Iterable[str]) -> dict[str, SlurmJobInfo]:
        """One Jobs.load() (slurmctld) for all; one db.Jobs.load() for ids it no longer knows."""
        ids = sorted({str(i) for i in job_ids if i}, key=int)
        if not ids:
            return {}
        ps = self._pyslurm()
        wanted = set(ids)
        try:
            live = ps.Jobs.load()
        except ps.RPCError as exc:
            raise self._error("Jobs.load", exc) from exc
        found = {str(job.id): job_info(job, source="squeue") for job in live.values() if str(job.id) in wanted}
        missing = [i for i in ids if i not in found]
        if missing:
            try:
                accounted = ps.db.Jobs.load(db_filter=ps.db.JobFilter(ids=[int(i) for i in missing]))
            except ps.RPCError as exc:
                raise self._error("db.Jobs.load", exc) from exc
            for job in accounted.values():
                if str(job.id) in wanted:
                    found[str(job.id)] = job_info(job, source="sacct")
        return found

    def find_by_name(self, name: str, *, since: float) -> list[str]:
        ps = self._pyslurm()
        try:
            live = [str(job.id) for job in ps.Jobs.load().values() if job.name == name]
            if live:
                return sorted(live, key=int)
            accounted = ps.db.Jobs.load(db_filter=ps.db.JobFilter(names=[name], start_time=int(since - 60)))
        except ps.RPCError as exc:
            raise self._error("find_by_name", exc) from exc
        return sorted({str(job.id) for job in accounted.values()}, key=int)

    def cancel(self, job_id: str) -> None:
        ps = self._pyslurm()
        try:
            # Job.cancel() already ignores "already done" and "invalid job id" (pyslurm job.pyx).
            ps.Job(int(job_id)).cancel()
        except ps.RPCError as exc:
            raise self._error(f"cancel of job {job_id}", exc) from exc

    def release(self, job_id: str) -> None:
        # A rare admin action (a held job after a failed launch): scontrol on this host, as test_only asks sbatch.
        release_with_scontrol(self._run, self._timeout, job_id)

    def usage(self, job_ids: Iterable[str]) -> dict[str, SlurmUsage]:
        # Accounting through sacct on this host, as test_only asks sbatch (see gateway/slurm/accounting.py).
        return SacctAccounting(self._run, self._timeout).usage(job_ids)

    def test_only(self, script: str) -> str:
        # pyslurm has no will_run/test-only call; ask sbatch, as the REST backend does (a refusal is
        # a SchedulerRefused, a 422, as with the other backends; it was a 503 here).
        return sbatch_test_only(self._run, script, self._timeout, backend="pyslurm")

    def ping(self) -> bool:
        try:
            ps = self._pyslurm()
        except SchedulerError as exc:
            log.info("pyslurm ping: %s", exc.message)
            return False
        try:
            return bool(ps.slurmctld.ping_primary().is_responding)
        except (ps.RPCError, AttributeError) as exc:  # AttributeError: a pyslurm before slurmctld.ping_primary
            log.info("pyslurm ping failed: %s", exc)
            return False


__all__ = ["PYSLURM_FLAGS", "PYSLURM_OPTIONS", "PyslurmBackend", "job_info", "submit_attributes"]
