"""Slurm's job states as squeue and sacct print them, and which of them are final.

The scheduler adapters speak only these; the portal's states and the table from Slurm's states to
them are the job lifecycle's (gateway/jobs/states.py). Unknown Slurm values parse to UNKNOWN with a
warning, never guessed.
"""
from __future__ import annotations

import enum
import logging

log = logging.getLogger(__name__)


class SlurmState(str, enum.Enum):
    """The base Slurm job states that squeue and sacct print (sacct adds e.g. 'CANCELLED by 0')."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESIZING = "RESIZING"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    PREEMPTED = "PREEMPTED"
    REVOKED = "REVOKED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    UNKNOWN = "UNKNOWN"  # not a Slurm state: what we record when Slurm printed something we do not know

    @classmethod
    def parse(cls, raw: str) -> "SlurmState":
        """Parse squeue/sacct output: 'CANCELLED by 0' -> CANCELLED; unknown words -> UNKNOWN."""
        word = raw.strip().split(" ", 1)[0].rstrip("+").upper()
        try:
            return cls(word)
        except ValueError:
            log.warning("unknown Slurm job state %r", raw)
            return cls.UNKNOWN

    @property
    def is_terminal(self) -> bool:
        return self in SLURM_TERMINAL


SLURM_TERMINAL = frozenset(
    {
        SlurmState.COMPLETED,
        SlurmState.FAILED,
        SlurmState.CANCELLED,
        SlurmState.TIMEOUT,
        SlurmState.OUT_OF_MEMORY,
        SlurmState.NODE_FAIL,
        SlurmState.BOOT_FAIL,
        SlurmState.DEADLINE,
        SlurmState.PREEMPTED,
        SlurmState.REVOKED,
        SlurmState.SPECIAL_EXIT,
    }
)
