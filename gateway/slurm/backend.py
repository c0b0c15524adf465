"""The scheduler interface the gateway needs, and the job record a backend returns."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gateway.process import CommandError
from gateway.slurm.states import SlurmState


# What every backend reads as "Slurm did not answer, try again later", one definition for all:
# Slurm error numbers (slurm_errno.h: communication with slurmctld or slurmdbd failed, a socket
# timed out) and the texts sbatch, squeue and slurmrestd print for the same conditions.
TRANSIENT_ERRNOS = frozenset({1001, 1002, 1003, 1004, 1800, 1801, 1802, 1803, 5004, 7000})
TRANSIENT_TEXT = re.compile(
    r"Unable to contact slurm controller|Socket timed out|temporarily unavailable|Slurm temporarily unable"
    r"|Connection refused|Transport endpoint|Zero Bytes were transmitted|Communication connection failure",
    re.IGNORECASE,
)


# squeue's reason for a batch job whose launch failed (a node or the controller went away as it
# started): Slurm requeues it and holds it, so it would wait forever without an admin's release.
LAUNCH_FAILED_HELD = "launch failed requeued held"

# Between the fields of squeue's and sacct's parsable output: a control character no job name,
# comment or state carries (a "|" could be in a job name).
FIELD_SEPARATOR = "\x1f"

if TYPE_CHECKING:  # accounting.py imports this module
    from gateway.slurm.accounting import SlurmUsage


class SchedulerError(Exception):
    """Slurm refused or failed a request; ``message`` is fit to show a user."""

    def __init__(self, message: str, *, argv: list[str] | None = None, stderr: str = "", transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.argv = argv or []
        self.stderr = stderr
        # True when trying again later may succeed (controller unreachable, a timeout); a
        # refusal of the job itself (bad partition, too many CPUs) is not transient.
        self.transient = transient


class SchedulerRefused(SchedulerError):
    """Slurm answered, and its answer is no (a partition limit, an invalid option): retrying the
    same script cannot help, so this is the caller's error (a 4xx), not Slurm being away (a 503).
    ``reason`` is Slurm's own text, e.g. "allocation failure: More processors requested than permitted".
    """

    def __init__(self, message: str, *, reason: str, argv: list[str] | None = None, stderr: str = "") -> None:
        super().__init__(message, argv=argv, stderr=stderr, transient=False)
        self.reason = reason


def test_only_error(exc: CommandError, *, transient: bool) -> SchedulerError:
    """What a failed ``sbatch --test-only`` means: Slurm did not answer (a timeout, no sbatch, the
    controller out of reach) or it answered no (any other non-zero exit, with its reason on stderr)."""
    text = " ".join(line.strip() for line in (exc.stderr.strip() or exc.stdout.strip()).splitlines() if line.strip())
    if exc.returncode is None or transient:
        return SchedulerError(f"sbatch --test-only failed ({exc.reason}): {text}", argv=exc.argv, stderr=exc.stderr, transient=transient)
    # Slurm 22.05 prints e.g. "allocation failure: Requested time limit is invalid ..." and exits 1.
    return SchedulerRefused(f"sbatch --test-only refused the script: {text}", reason=text, argv=exc.argv, stderr=exc.stderr)


@dataclass(frozen=True)
class SlurmJobInfo:
    """What Slurm says about one job, parsed by field name from squeue or sacct."""

    job_id: str
    state: SlurmState
    raw_state: str  # exactly what Slurm printed, e.g. "CANCELLED by 0"
    reason: str = ""  # e.g. "Resources", "Dependency", "None"
    exit_code: int | None = None
    signal: int | None = None
    name: str = ""
    comment: str = ""
    start: str = ""
    end: str = ""
    elapsed: str = ""
    source: str = ""  # "squeue" or "sacct"

    def describe(self) -> str:
        """Slurm's view in one phrase, e.g. 'PENDING (Resources)'."""
        if self.reason and self.reason not in ("None", "(null)"):
            return f"{self.raw_state} ({self.reason})"
        return self.raw_state


class SchedulerBackend(Protocol):
    """The whole of what the gateway asks of a scheduler."""

    def submit(self, script: str, *, environment: Mapping[str, str] | None = None) -> str:
        """Submit a batch script; return the Slurm job id.

        ``environment`` is added to what the job inherits (per-job secrets travel this way, never
        in the script).
        """
        ...

    def status(self, job_ids: Iterable[str]) -> dict[str, SlurmJobInfo]:
        """Return what Slurm knows of these jobs, in as few calls as possible; unknown ids are absent."""
        ...

    def cancel(self, job_id: str) -> None:
        """Cancel a job (no error if it has already ended)."""
        ...

    def release(self, job_id: str) -> None:
        """Release a held job (``scontrol release``), as an admin would after a failed launch."""
        ...

    def find_by_name(self, name: str, *, since: float) -> list[str]:
        """Ids of jobs named ``name`` submitted since the epoch time ``since`` (to recover a lost sbatch reply)."""
        ...

    def test_only(self, script: str) -> str:
        """Ask Slurm whether it would accept the script (`sbatch --test-only`); return its verdict."""
        ...

    def ping(self) -> bool:
        """Whether the controller answers."""
        ...

    def usage(self, job_ids: Iterable[str]) -> dict[str, SlurmUsage]:
        """What these ended jobs used, from Slurm's accounting (gateway/slurm/accounting.py), in one query."""
        ...
