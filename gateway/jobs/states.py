"""The state a portal sees for a gateway job, its terminal set, and the one table from Slurm's states.

Modelled on Parsl's scheduler-neutral ``JobState`` and ood_core's ``STATE_MAP``: an explicit enum,
an explicit terminal set (defined here once, as members and as stored values), and unknown Slurm
values mapped to UNKNOWN, never guessed. README "Job states" documents the table.
"""
from __future__ import annotations

import enum

from gateway.slurm.states import SlurmState


class JobState(str, enum.Enum):
    """The state a portal sees for a gateway job."""

    QUEUED = "queued"  # accepted and waiting in Slurm
    STAGING = "staging"  # main job is downloading and extracting the dataset
    RUNNING = "running"  # RELION is running
    ARCHIVING = "archiving"  # main job ended; the completion hook is packing and uploading
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    NODE_FAIL = "node_fail"
    SUBMIT_FAILED = "submit_failed"
    ARCHIVE_FAILED = "archive_failed"
    LOST = "lost"  # Slurm no longer knows the job and no result was recorded
    UNKNOWN = "unknown"  # Slurm printed a state we cannot map; not terminal

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.OUT_OF_MEMORY,
        JobState.NODE_FAIL,
        JobState.SUBMIT_FAILED,
        JobState.ARCHIVE_FAILED,
        JobState.LOST,
    }
)
# The same set as the values the store keeps in its ``state`` column.
TERMINAL_VALUES: frozenset[str] = frozenset(state.value for state in TERMINAL_STATES)

# How the main RELION job's final Slurm state becomes the gateway's final state. This is the
# documented table (README "Job states"); keep both in step.
FINAL_STATE_OF_MAIN: dict[SlurmState, JobState] = {
    SlurmState.COMPLETED: JobState.SUCCEEDED,
    SlurmState.FAILED: JobState.FAILED,
    SlurmState.CANCELLED: JobState.CANCELLED,
    SlurmState.TIMEOUT: JobState.TIMEOUT,
    SlurmState.DEADLINE: JobState.TIMEOUT,
    SlurmState.OUT_OF_MEMORY: JobState.OUT_OF_MEMORY,
    SlurmState.NODE_FAIL: JobState.NODE_FAIL,
    SlurmState.BOOT_FAIL: JobState.NODE_FAIL,
    SlurmState.PREEMPTED: JobState.CANCELLED,
    SlurmState.REVOKED: JobState.CANCELLED,
    SlurmState.SPECIAL_EXIT: JobState.FAILED,
}

# While the main job is still live.
LIVE_STATE_OF_MAIN: dict[SlurmState, JobState] = {
    SlurmState.PENDING: JobState.QUEUED,
    SlurmState.CONFIGURING: JobState.QUEUED,
    SlurmState.REQUEUED: JobState.QUEUED,
    SlurmState.REQUEUE_HOLD: JobState.QUEUED,
    SlurmState.REQUEUE_FED: JobState.QUEUED,
    SlurmState.RESV_DEL_HOLD: JobState.QUEUED,
    SlurmState.RUNNING: JobState.RUNNING,
    SlurmState.COMPLETING: JobState.RUNNING,
    SlurmState.SUSPENDED: JobState.RUNNING,
    SlurmState.RESIZING: JobState.RUNNING,
    SlurmState.SIGNALING: JobState.RUNNING,
    SlurmState.STAGE_OUT: JobState.RUNNING,
    SlurmState.STOPPED: JobState.RUNNING,
}


# The Slurm endings the gateway continues a job after by itself, when its request asked for it
# (auto_continue): the job ran out of time or lost its node or its slot, none of it RELION's fault.
# Never after RELION's own error (FAILED) or a user's cancel: running again would fail again, or
# undo the cancel.
AUTO_CONTINUE_ON: frozenset[SlurmState] = frozenset(
    {SlurmState.TIMEOUT, SlurmState.DEADLINE, SlurmState.PREEMPTED, SlurmState.NODE_FAIL, SlurmState.BOOT_FAIL}
)
# The gateway states a user may continue a job from (POST /jobs/<id>/continue).
CONTINUABLE: frozenset[JobState] = frozenset({JobState.TIMEOUT, JobState.CANCELLED, JobState.NODE_FAIL, JobState.FAILED})


def auto_continues(auto_continue: int, attempt: int, main: SlurmState | None) -> bool:
    """Whether attempt ``attempt`` ending in ``main`` is continued without being asked again."""
    return main in AUTO_CONTINUE_ON and attempt <= auto_continue


def gateway_state(
    main: SlurmState | None,
    archive: SlurmState | None,
    archive_exit_code: int | None,
    main_phase: str | None = None,
) -> JobState:
    """Derive the gateway state from the two Slurm jobs (main RELION job, archive hook).

    ``None`` means Slurm does not know the job (any more). ``main_phase`` is what the main job
    wrote to its phase file ("staging" or "running") so a running job can say which step it is in.
    """
    if main is None:
        # The main job vanished. If the hook is still around it will tell; otherwise the job is lost.
        if archive is None:
            return JobState.LOST
        if not archive.is_terminal:
            return JobState.ARCHIVING
    elif not main.is_terminal:
        if main == SlurmState.UNKNOWN:
            return JobState.UNKNOWN
        live = LIVE_STATE_OF_MAIN.get(main, JobState.UNKNOWN)
        # The script's first step is stage-in: until it has stamped a later phase, a RUNNING main
        # job is staging (without this a job could show running -> staging -> running).
        if live == JobState.RUNNING and main_phase in (None, "staging"):
            return JobState.STAGING
        return live
    # The main job has ended: the hook decides whether the output is safe.
    if archive is None:
        return JobState.LOST
    if not archive.is_terminal:
        return JobState.ARCHIVING
    if archive != SlurmState.COMPLETED or (archive_exit_code or 0) != 0:
        return JobState.ARCHIVE_FAILED
    if main is None:
        return JobState.LOST
    return FINAL_STATE_OF_MAIN.get(main, JobState.FAILED)
