"""The Slurm CLI backend against recorded Slurm 22.05 output (tests/fixtures/slurm)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.process import CommandError
from gateway.slurm.backend import SchedulerError
from gateway.slurm.cli import FIELD_SEPARATOR, SlurmCliBackend, parse_sacct, parse_sbatch_parsable, parse_squeue
from gateway.slurm.states import SlurmState
from tests.fakes import RecordedRunner

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"
SQUEUE = (FIXTURES / "squeue.txt").read_text()
SACCT = (FIXTURES / "sacct.txt").read_text()


@pytest.mark.parametrize(("stdout", "expected"), [("42\n", "42"), ("42;cluster\n", "42")])
def test_sbatch_parsable(stdout: str, expected: str) -> None:
    assert parse_sbatch_parsable(stdout) == expected


def test_sbatch_without_a_job_id_is_an_error() -> None:
    with pytest.raises(SchedulerError, match="no job id"):
        parse_sbatch_parsable("sbatch: warning: something\n")


def test_parse_squeue_by_field_name() -> None:
    jobs = parse_squeue(SQUEUE)
    assert jobs["2"].state == SlurmState.RUNNING and jobs["2"].comment == "relion-gateway:job_x"
    assert jobs["4"].describe() == "PENDING (Dependency)"
    assert jobs["3"].state == SlurmState.FAILED and jobs["3"].exit_code is None  # squeue has no exit code


def test_parse_sacct_exit_codes_and_cancelled_by() -> None:
    jobs = parse_sacct(SACCT)
    assert (jobs["2"].state, jobs["2"].raw_state) == (SlurmState.CANCELLED, "CANCELLED by 0")
    assert (jobs["3"].state, jobs["3"].exit_code, jobs["3"].signal) == (SlurmState.FAILED, 3, 0)
    assert jobs["4"].elapsed == "00:00:00" and jobs["4"].source == "sacct"


def test_a_malformed_line_is_skipped_not_misparsed(caplog: pytest.LogCaptureFixture) -> None:
    jobs = parse_sacct(SACCT + f"9{FIELD_SEPARATOR}RUNNING\n")
    assert "9" not in jobs and "skipping" in caplog.text


def test_status_is_one_squeue_plus_one_sacct_for_ended_or_missing_jobs() -> None:
    runner = RecordedRunner({"squeue": SQUEUE, "sacct": SACCT})
    backend = SlurmCliBackend(runner)
    jobs = backend.status(["2", "3", "4", "77"])
    assert [argv[0] for argv in runner.calls] == ["squeue", "sacct"]
    squeue_argv, sacct_argv = runner.calls
    assert "--jobs=2,3,4,77" in squeue_argv and "--states=all" in squeue_argv
    assert "--jobs=3,77" in sacct_argv  # 3 ended (needs its exit code); 77 is not in squeue
    assert {"-X", "--parsable2", f"--delimiter={FIELD_SEPARATOR}"} <= set(sacct_argv)
    assert jobs["3"].exit_code == 3 and jobs["2"].source == "squeue"


def test_status_when_squeue_knows_none_of_the_ids() -> None:
    invalid = CommandError(["squeue"], 1, "", "slurm_load_jobs error: Invalid job id specified")
    runner = RecordedRunner({"squeue": invalid, "sacct": SACCT})
    jobs = SlurmCliBackend(runner).status(["2", "3", "4"])
    assert set(jobs) == {"2", "3", "4"}


def test_status_of_nothing_calls_nothing() -> None:
    runner = RecordedRunner()
    assert SlurmCliBackend(runner).status([]) == {}
    assert runner.calls == []


def test_submit_sends_the_script_on_stdin() -> None:
    runner = RecordedRunner({"sbatch": "17\n"})
    assert SlurmCliBackend(runner).submit("#!/bin/bash\ntrue\n") == "17"
    assert runner.calls == [["sbatch", "--parsable"]] and runner.inputs == ["#!/bin/bash\ntrue\n"]


def test_sbatch_failure_carries_slurms_message() -> None:
    refused = CommandError(["sbatch", "--parsable"], 1, "", "sbatch: error: Batch job submission failed: More processors requested than permitted")
    with pytest.raises(SchedulerError, match="More processors requested than permitted") as excinfo:
        SlurmCliBackend(RecordedRunner({"sbatch": refused})).submit("#!/bin/bash\n")
    assert excinfo.value.argv == ["sbatch", "--parsable"]


def test_ping() -> None:
    assert SlurmCliBackend(RecordedRunner({"scontrol": "Slurmctld(primary) at vm is UP\n"})).ping()
    assert not SlurmCliBackend(RecordedRunner({})).ping()


def test_a_job_only_accounting_calls_live_is_unknown() -> None:
    # As after slurmctld was SIGKILLed right after a submission: slurmdbd keeps a PENDING stub
    # (named "allocation") for a job slurmctld no longer has.
    stub = FIELD_SEPARATOR.join(["9124", "PENDING", "0:0", "None", "allocation", "Unknown", "Unknown", "00:00:00", ""]) + "\n"
    invalid = CommandError(["squeue"], 1, "", "slurm_load_jobs error: Invalid job id specified")
    jobs = SlurmCliBackend(RecordedRunner({"squeue": invalid, "sacct": SACCT + stub})).status(["3", "9124"])
    assert set(jobs) == {"3"}


def test_a_job_cancelled_before_it_started_keeps_squeues_name_while_sacct_calls_it_allocation() -> None:
    # Measured: for a few seconds after scancel of a held job sacct names it "allocation" while
    # squeue still shows its name; the tracker must not take it for another job.
    squeue = FIELD_SEPARATOR.join(["9125", "CANCELLED", "None", "job_2d_ws_abc", "N/A", ""]) + "\n"
    sacct = FIELD_SEPARATOR.join(["9125", "CANCELLED by 0", "0:0", "None", "allocation", "Unknown", "Unknown", "00:00:00", ""]) + "\n"
    jobs = SlurmCliBackend(RecordedRunner({"squeue": squeue, "sacct": sacct})).status(["9125"])
    assert jobs["9125"].name == "job_2d_ws_abc" and jobs["9125"].raw_state == "CANCELLED by 0" and jobs["9125"].exit_code == 0
