"""The state table: every Slurm state maps somewhere explicit; vanished jobs are never successes."""
from __future__ import annotations

import pytest

from gateway.jobs.states import FINAL_STATE_OF_MAIN, LIVE_STATE_OF_MAIN, JobState, gateway_state
from gateway.slurm.states import SLURM_TERMINAL, SlurmState


def test_every_slurm_state_is_in_exactly_one_table() -> None:
    for state in SlurmState:
        if state == SlurmState.UNKNOWN:
            continue
        in_live = state in LIVE_STATE_OF_MAIN
        in_final = state in FINAL_STATE_OF_MAIN or state == SlurmState.COMPLETED
        assert in_live != in_final, state
        assert (state in SLURM_TERMINAL) == in_final, state


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("CANCELLED by 0", SlurmState.CANCELLED), ("RUNNING", SlurmState.RUNNING), ("COMPLETED+", SlurmState.COMPLETED), ("WEIRD", SlurmState.UNKNOWN)],
)
def test_parse_slurm_state(raw: str, expected: SlurmState) -> None:
    assert SlurmState.parse(raw) == expected


def test_unknown_slurm_state_is_unknown_and_not_terminal(caplog: pytest.LogCaptureFixture) -> None:
    state = gateway_state(SlurmState.parse("BRAND_NEW_STATE"), SlurmState.PENDING, None)
    assert state == JobState.UNKNOWN and not state.is_terminal
    assert "unknown Slurm job state" in caplog.text


@pytest.mark.parametrize(
    ("main", "archive", "archive_exit", "phase", "expected"),
    [
        (SlurmState.PENDING, SlurmState.PENDING, None, None, JobState.QUEUED),
        (SlurmState.RUNNING, SlurmState.PENDING, None, "staging", JobState.STAGING),
        (SlurmState.RUNNING, SlurmState.PENDING, None, "running", JobState.RUNNING),
        (SlurmState.RUNNING, SlurmState.PENDING, None, None, JobState.STAGING),
        (SlurmState.COMPLETED, SlurmState.RUNNING, None, "finished", JobState.ARCHIVING),
        (SlurmState.COMPLETED, SlurmState.COMPLETED, 0, "finished", JobState.SUCCEEDED),
        (SlurmState.FAILED, SlurmState.COMPLETED, 0, "running", JobState.FAILED),
        (SlurmState.TIMEOUT, SlurmState.COMPLETED, 0, "running", JobState.TIMEOUT),
        (SlurmState.OUT_OF_MEMORY, SlurmState.COMPLETED, 0, "running", JobState.OUT_OF_MEMORY),
        (SlurmState.COMPLETED, SlurmState.FAILED, 3, "finished", JobState.ARCHIVE_FAILED),
        (SlurmState.COMPLETED, SlurmState.CANCELLED, 0, "finished", JobState.ARCHIVE_FAILED),
        (None, None, None, None, JobState.LOST),
        (SlurmState.COMPLETED, None, None, "finished", JobState.LOST),
        (None, SlurmState.RUNNING, None, None, JobState.ARCHIVING),
    ],
)
def test_gateway_state_table(main, archive, archive_exit, phase, expected: JobState) -> None:
    assert gateway_state(main, archive, archive_exit, phase) == expected
