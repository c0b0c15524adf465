"""The typed job record: one shape for the store, job.json and the job side; old records still load."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.jobs.phases import Phases
from gateway.jobs.spec import JOB_SPEC_VERSION, LEGACY_JOB_SPEC_VERSION, JobSpec, Resources
from gateway.jobside.archive import phase_timings
from tests.fakes import FakeScheduler

JOBS = "/v1/relion/jobs"


def legacy_record() -> dict[str, Any]:
    """A job_json as the gateway before the typed record stored it (no schema_version, template variables inside)."""
    return {
        "job_id": "job_2d_ws1_0123abcd",
        "user_id": "alice",
        "workspace_id": "ws1",
        "mode": "2d",
        "request": {"mode": "2d", "num_mpi": 3, "flags": {"i": "particles.star", "o": "Class2D/run"}},
        "request_sha256": "ab" * 32,
        "resources": {"partition": "debug", "ntasks": 3, "cpus_per_task": 1, "mem_per_cpu_mb": 1000,
                      "time_limit": "00:30:00", "total_cpus": 3, "total_memory_mb": 3000},
        "relion_command": ["relion_refine_mpi", "--i", "particles.star"],
        "dataset_s3_url": "s3://b/datasets/tiny.tar.gz",
        "output_url": "s3://b/results/job_2d_ws1_0123abcd/",
        "log_dir": "/logs/alice/job_2d_ws1_0123abcd",
        "workspace_dir": "/ws/alice/job_2d_ws1_0123abcd",
        "output_prefix": "Class2D/run",
        "output_dir": "Class2D",
        "accepted_at": 90.0,
        "run_as": None,
        "archive_context": {"job_id": "job_2d_ws1_0123abcd", "archive_cpus": 2, "after_main": True},
        "main_slurm_id": "1001",
        "archive_slurm_id": "1002",
    }


def test_a_legacy_record_loads_by_attribute() -> None:
    spec = JobSpec.from_dict(legacy_record())
    assert spec.schema_version == LEGACY_JOB_SPEC_VERSION
    assert spec.resources == Resources("debug", 3, 1, 1000, "00:30:00")
    assert spec.relion_command == ("relion_refine_mpi", "--i", "particles.star")
    assert (spec.log_dir, spec.main_slurm_id, spec.archive_slurm_id) == ("/logs/alice/job_2d_ws1_0123abcd", "1001", "1002")
    assert spec.flags == {"i": "particles.star", "o": "Class2D/run"}
    # The template variables are not part of the record any more: written back, they are gone.
    assert "archive_context" not in spec.to_dict() and spec.to_dict()["schema_version"] == JOB_SPEC_VERSION


def test_a_record_round_trips_through_json() -> None:
    spec = JobSpec.from_dict(legacy_record())
    again = JobSpec.from_json(spec.to_json())
    assert again == spec.__class__(**{**spec.__dict__, "schema_version": JOB_SPEC_VERSION})
    # job.json keeps the totals portals and metadata.json read.
    assert json.loads(spec.to_json(indent=2))["resources"]["total_memory_mb"] == 3000


def test_a_minimal_record_loads_with_defaults() -> None:
    spec = JobSpec.from_json('{"log_dir": "/nonexistent"}')
    assert (spec.log_dir, spec.job_id, spec.resources, spec.relion_command, spec.request) == ("/nonexistent", "", None, (), {})


def test_submit_writes_the_typed_record_and_the_job_side_reads_it(client, app, scheduler: FakeScheduler) -> None:
    from tests.unit.test_api import submit

    job = submit(client)
    record = app.extensions["relion_gateway"].store.get(job["job_id"])
    stored = JobSpec.from_json(record.job_json)
    on_disk = JobSpec.load(Path(stored.log_dir) / "job.json")
    assert stored == on_disk and stored.schema_version == JOB_SPEC_VERSION
    assert (on_disk.main_slurm_id, on_disk.archive_slurm_id) == (record.main_slurm_id, record.archive_slurm_id)
    assert "archive_context" not in json.loads(record.job_json)
    # The hook's script is derived from the record: rendering it again gives what was submitted.
    jobs = app.extensions["relion_gateway"]
    assert jobs.scripts.archive(stored, record.main_slurm_id) == record.archive_script == scheduler.submitted[1]


def test_a_legacy_record_gets_the_same_archive_script_as_a_new_one(client, app, scheduler: FakeScheduler) -> None:
    from tests.unit.test_api import submit

    job = submit(client)
    jobs = app.extensions["relion_gateway"]
    record = jobs.store.get(job["job_id"])
    legacy = {**json.loads(record.job_json), "archive_context": {"archive_memory_mb": 1}}
    del legacy["schema_version"]
    assert jobs.scripts.archive(JobSpec.from_dict(legacy), "7") == jobs.scripts.archive(JobSpec.from_json(record.job_json), "7")


def test_one_phases_reader_for_the_poller_and_the_hook(tmp_path: Path) -> None:
    # A requeued job stamps twice; a line cut short keeps its phase with no time.
    (tmp_path / "phases").write_text("staging 100\nrunning 105\nstaging 200\nrunning 210\nfinished 230\narchiv")
    phases = Phases.read(tmp_path)
    assert (phases.last, phases.count("staging"), phases.last_time("staging")) == ("archiv", 2, 200.0)
    timings = phase_timings(90.0, phases, 240.0, 250.0)
    assert timings == {"queued": 110.0, "staging": 10.0, "running": 20.0, "archiving": 10.0}
    assert Phases.read(tmp_path / "missing") == Phases()


def test_the_archive_hook_goes_to_its_own_partition_when_one_is_set(client, app, scheduler: FakeScheduler) -> None:
    from tests.unit.test_api import submit

    jobs = app.extensions["relion_gateway"]
    submit(client)
    main_script, archive_script = scheduler.submitted[-2:]
    own = [line for line in main_script.splitlines() if line.startswith("#SBATCH --partition=")]
    assert [line for line in archive_script.splitlines() if line.startswith("#SBATCH --partition=")] == own
    jobs.config["SLURM_ARCHIVE_PARTITION"] = "cpu-archive"
    submit(client)
    main_script, archive_script = scheduler.submitted[-2:]
    assert "#SBATCH --partition=cpu-archive" in archive_script.splitlines()
    assert "cpu-archive" not in main_script


def test_an_archive_partition_must_be_a_configured_one() -> None:
    import pytest

    from gateway.config import build_config

    with pytest.raises(ValueError, match=r"\[slurm\] archive_partition"):
        build_config(environ={}, overrides={"SLURM_PARTITIONS": {"debug": {}}, "SLURM_ARCHIVE_PARTITION": "gpu"})
    assert build_config(environ={}, overrides={"SLURM_PARTITIONS": {"debug": {}}, "SLURM_ARCHIVE_PARTITION": "debug"})["SLURM_ARCHIVE_PARTITION"] == "debug"
