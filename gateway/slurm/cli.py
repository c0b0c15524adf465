"""Scheduler backend that drives Slurm's own commands (sbatch, squeue, sacct, scancel).

Split as ood_core splits its Slurm adapter: the ``Runner`` executes argv lists (replaced by a fake
with recorded output in unit tests) and the parse functions turn Slurm's machine-readable output
into ``SlurmJobInfo`` objects by field name, never by column position.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence

from gateway.process import CommandError, Runner, run_command
from gateway.slurm.accounting import SacctAccounting, SlurmUsage
from gateway.slurm.backend import FIELD_SEPARATOR, TRANSIENT_TEXT, SchedulerError, SlurmJobInfo, test_only_error
from gateway.slurm.states import SlurmState

log = logging.getLogger(__name__)

# squeue --format codes, by the field name we parse them as.
SQUEUE_FIELDS: dict[str, str] = {
    "job_id": "%i",
    "state": "%T",
    "reason": "%r",
    "name": "%j",
    "start": "%S",
    "comment": "%k",
}

# sacct --format names, by the field name we parse them as.
SACCT_FIELDS: dict[str, str] = {
    "job_id": "JobID",
    "state": "State",
    "exit_code": "ExitCode",
    "reason": "Reason",
    "name": "JobName",
    "start": "Start",
    "end": "End",
    "elapsed": "Elapsed",
    "comment": "Comment",
}


# stderr of Slurm commands when the controller (or its database) is briefly out of reach.


def is_transient(exc: CommandError) -> bool:
    return exc.returncode is None and "could not be started" not in exc.reason or bool(TRANSIENT_TEXT.search(exc.stderr))


def release_with_scontrol(run: Runner, timeout: float, job_id: str) -> None:
    """``scontrol release <id>``, one SchedulerError for every way it fails."""
    try:
        run(["scontrol", "release", str(job_id)], timeout=timeout)
    except CommandError as exc:
        raise SchedulerError(f"scontrol release {job_id} failed ({exc.reason}): {exc.stderr.strip()[:300]}", argv=exc.argv,
                             stderr=exc.stderr, transient=is_transient(exc)) from exc


def sbatch_test_only(run: Runner, script: str, timeout: float, *, backend: str = "") -> str:
    """Ask ``sbatch --test-only`` whether Slurm would take ``script`` (every backend asks it this way).

    sbatch prints its verdict on stderr and exits 0 when the job would be accepted; a refusal exits 1
    with Slurm's reason (SchedulerRefused), which is not the same as Slurm not answering. The REST
    and pyslurm backends (``backend``) need the Slurm client installed for it: say so if it is not.
    """
    try:
        out = run(["sbatch", "--test-only"], timeout=timeout, input=script, merge_stderr=True)
    except CommandError as exc:
        if backend and exc.returncode is None and "could not be started" in exc.reason:
            raise SchedulerError(f"sbatch --test-only is not available: the {backend} backend needs the Slurm client for it") from exc
        raise test_only_error(exc, transient=is_transient(exc)) from exc
    return str(out).strip()


def parse_sbatch_parsable(stdout: str) -> str:
    """`sbatch --parsable` prints `<jobid>` or `<jobid>;<cluster>`."""
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = line.split(";", 1)[0].strip()
    if not job_id.isdigit():
        raise SchedulerError(f"sbatch printed no job id: {stdout!r}")
    return job_id


def _rows(stdout: str, names: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        values = line.split(FIELD_SEPARATOR)
        if len(values) != len(names):
            log.warning("skipping a Slurm output line with %d fields, expected %d: %r", len(values), len(names), line)
            continue
        rows.append(dict(zip(names, (v.strip() for v in values))))
    return rows


def _job_info(row: Mapping[str, str], source: str) -> SlurmJobInfo:
    """One row of squeue's or sacct's fields, which SQUEUE_FIELDS and SACCT_FIELDS name alike
    (squeue prints no exit code, end or elapsed time)."""
    exit_code, signal = _parse_exit_code(row["exit_code"]) if "exit_code" in row else (None, None)
    return SlurmJobInfo(
        job_id=row["job_id"],
        state=SlurmState.parse(row["state"]),
        raw_state=row["state"],
        reason=row["reason"],
        exit_code=exit_code,
        signal=signal,
        name=row["name"],
        comment=row["comment"],
        start=row["start"],
        end=row.get("end", ""),
        elapsed=row.get("elapsed", ""),
        source=source,
    )


def parse_squeue(stdout: str) -> dict[str, SlurmJobInfo]:
    """Parse `squeue --noheader --format` output built from SQUEUE_FIELDS."""
    return {row["job_id"]: _job_info(row, "squeue") for row in _rows(stdout, list(SQUEUE_FIELDS))}


def _parse_exit_code(raw: str) -> tuple[int | None, int | None]:
    match = re.fullmatch(r"(\d+):(\d+)", raw)
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2))


def parse_sacct(stdout: str) -> dict[str, SlurmJobInfo]:
    """Parse `sacct -X -n -P --delimiter` output built from SACCT_FIELDS.

    A requeued job has several records with one id; the last one is the current one.
    """
    return {row["job_id"]: _job_info(row, "sacct") for row in _rows(stdout, list(SACCT_FIELDS))}


class SlurmCliBackend:
    """Talk to Slurm through its command-line tools."""

    def __init__(self, runner: Runner = run_command, *, timeout: float = 30.0) -> None:
        self._run = runner
        self._timeout = timeout

    def _call(self, argv: list[str], *, input: str | None = None, env: Mapping[str, str] | None = None) -> str:
        try:
            return self._run(argv, timeout=self._timeout, input=input, env=env)
        except CommandError as exc:
            raise SchedulerError(
                f"{argv[0]} failed ({exc.reason}): {exc.stderr.strip() or exc.stdout.strip()}",
                argv=exc.argv,
                stderr=exc.stderr,
                transient=is_transient(exc),
            ) from exc

    def submit(self, script: str, *, environment: Mapping[str, str] | None = None) -> str:
        # The script goes on stdin: nothing is written to disk, and the exact text is what we store.
        # sbatch's default --export=ALL hands its environment to the job.
        env = {**os.environ, **environment} if environment else None
        return parse_sbatch_parsable(self._call(["sbatch", "--parsable"], input=script, env=env))

    def test_only(self, script: str) -> str:
        return sbatch_test_only(self._run, script, self._timeout)

    def status(self, job_ids: Iterable[str]) -> dict[str, SlurmJobInfo]:
        ids = sorted({str(i) for i in job_ids if i}, key=int)
        if not ids:
            return {}
        found = self._squeue(ids)
        # squeue knows no exit code, and forgets jobs MinJobAge after they end: ask the
        # accounting database, in one call, for every job that has ended or left squeue.
        need_sacct = [i for i in ids if i not in found or found[i].state.is_terminal]
        if need_sacct:
            accounted = self._sacct(need_sacct)
            for i in need_sacct:
                info = accounted.get(i)
                if info is None:
                    continue
                if i not in found and not info.state.is_terminal:
                    # slurmctld lists every live job, so a job only accounting calls live is one
                    # slurmctld lost (SIGKILLed before saving it); slurmdbd keeps a stub for it,
                    # often named "allocation". Report it unknown rather than as a live stranger.
                    log.warning("Slurm job %s: sacct says %s (%r) but slurmctld does not know it", i, info.raw_state, info.name)
                    continue
                if i in found:
                    # A job cancelled before it ever started is named "allocation" by slurmdbd for
                    # a few seconds (measured: 2.5 s after scancel of a held job) while squeue still
                    # shows its real name; sacct adds the exit code, squeue keeps the identity, or
                    # the tracker would take the job for a stranger and skip a cycle.
                    info = dataclasses.replace(info, name=found[i].name or info.name, comment=found[i].comment or info.comment)
                found[i] = info
        return found

    def _squeue(self, ids: list[str]) -> dict[str, SlurmJobInfo]:
        argv = [
            "squeue",
            "--noheader",
            "--states=all",
            f"--jobs={','.join(ids)}",
            f"--format={FIELD_SEPARATOR.join(SQUEUE_FIELDS.values())}",
        ]
        try:
            return parse_squeue(self._run(argv, timeout=self._timeout))
        except CommandError as exc:
            # squeue exits 1 with "Invalid job id specified" when it knows none of the ids
            # (they left its memory after MinJobAge): not an error, sacct will know them.
            if "Invalid job id" in exc.stderr:
                return {}
            raise SchedulerError(
                f"squeue failed ({exc.reason}): {exc.stderr.strip()}", argv=exc.argv, stderr=exc.stderr, transient=is_transient(exc)
            ) from exc

    def _sacct(self, ids: list[str]) -> dict[str, SlurmJobInfo]:
        # -X: the allocation only, not its steps; -P with our delimiter; --format by name.
        # Not --json: in 22.05 it reports wrong exit codes (see shared notes).
        argv = [
            "sacct",
            "-X",
            "--noheader",
            "--parsable2",
            f"--delimiter={FIELD_SEPARATOR}",
            f"--jobs={','.join(ids)}",
            f"--format={','.join(SACCT_FIELDS.values())}",
        ]
        return parse_sacct(self._call(argv))

    def accounting(self, job_id: str) -> dict[str, str]:
        """CPU time and nodes of an ended job, for metadata.json's resources: the archive hook asks it
        for its main job from the compute node (gateway.jobside.program). What the job cost, for the
        gateway's records and reports, is usage() (gateway/slurm/accounting.py).

        Asked without -X on purpose: in 22.05 the -X allocation record reports TotalCPU 00:00:00;
        without -X the allocation row carries the sum of its steps.
        """
        fields = ["JobID", "TotalCPU", "CPUTime", "AllocCPUS", "NNodes", "NodeList", "MaxRSS"]
        out = self._call(
            ["sacct", "--noheader", "--parsable2", f"--delimiter={FIELD_SEPARATOR}", f"--jobs={job_id}", f"--format={','.join(fields)}"]
        )
        rows = [row for row in _rows(out, fields) if row["JobID"] == str(job_id)]
        if not rows:
            return {}
        row = rows[-1]
        return {
            "total_cpu": row["TotalCPU"],
            "cpu_time_allocated": row["CPUTime"],
            "alloc_cpus": row["AllocCPUS"],
            "nodes": row["NNodes"],
            "node_list": row["NodeList"],
        }

    def usage(self, job_ids: Iterable[str]) -> dict[str, SlurmUsage]:
        return SacctAccounting(self._run, self._timeout).usage(job_ids)

    def find_by_name(self, name: str, *, since: float) -> list[str]:
        # squeue first (cheap, in slurmctld memory); sacct for jobs that already left it.
        live = self._call(["squeue", "--noheader", "--states=all", f"--name={name}", "--format=%i"])
        ids = [line.strip() for line in live.splitlines() if line.strip()]
        if ids:
            return ids
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
        accounted = self._call(["sacct", "-X", "--noheader", "--parsable2", f"--name={name}", f"--starttime={start}", "--format=JobID"])
        return [line.strip() for line in accounted.splitlines() if line.strip()]

    def cancel(self, job_id: str) -> None:
        # scancel of an unknown or finished id exits 0 silently (22.05); that is what we want.
        self._call(["scancel", str(job_id)])

    def release(self, job_id: str) -> None:
        release_with_scontrol(self._run, self._timeout, job_id)

    def ping(self) -> bool:
        try:
            out = self._run(["scontrol", "ping"], timeout=self._timeout)
        except CommandError:
            return False
        return "is UP" in out
