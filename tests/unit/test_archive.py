"""The completion hook against an in-process S3 fake (moto) and a fake scheduler."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterator

import boto3
import jsonschema
import pytest

import gateway.jobside
from moto import mock_aws

from gateway.jobs.spec import JobSpec
from gateway.jobside.archive import run_archive
from gateway.jobside.stage_in import stage_in
from gateway.storage.s3 import S3Storage, StorageError
from tests.fakes import FakeScheduler

BUCKET = "relion-local"


@pytest.fixture
def storage(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Storage]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield S3Storage(client)


def make_job(tmp_path: Path) -> dict[str, Any]:
    log_dir = tmp_path / "logs" / "alice" / "job_2d_ws1_0123abcd"
    workspace = tmp_path / "ws" / "alice" / "job_2d_ws1_0123abcd"
    output = workspace / "dataset" / "Class2D"
    output.mkdir(parents=True)
    log_dir.mkdir(parents=True)
    (output / "run_it002_model.star").write_text("data_model_general\n_rlnCurrentResolution 25.6\n")
    (output / "run_it002_classes.mrcs").write_bytes(b"\0" * 4096)
    (log_dir / "main-1001.out").write_text("Expectation iteration 2 of 2\n")
    (log_dir / "main-1001.err").write_text("")
    (log_dir / "phases").write_text("staging 100\nrunning 105\nfinished 115\n")
    return {
        "job_id": "job_2d_ws1_0123abcd",
        "user_id": "alice",
        "workspace_id": "ws1",
        "mode": "2d",
        "request": {"flags": {"i": "particles.star"}},
        "resources": {"partition": "debug", "ntasks": 3, "cpus_per_task": 1, "mem_per_cpu_mb": 1000, "time_limit": "00:30:00", "total_cpus": 3, "total_memory_mb": 3000},
        "relion_command": ["relion_refine_mpi", "--i", "particles.star"],
        "dataset_s3_url": f"s3://{BUCKET}/datasets/tiny.tar.gz",
        "output_url": f"s3://{BUCKET}/results/job_2d_ws1_0123abcd/",
        "log_dir": str(log_dir),
        "workspace_dir": str(workspace),
        "output_prefix": "Class2D/run",
        "output_dir": "Class2D",
        "accepted_at": 90.0,
    }


def finished_scheduler() -> FakeScheduler:
    scheduler = FakeScheduler()
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    return scheduler


def test_archive_uploads_verified_output_metadata_and_logs_then_deletes_workspace(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    metadata = run_archive(
        JobSpec.from_dict(job), "1001", storage=storage, scheduler=finished_scheduler(), compressor="gzip",
        summarize=lambda d, prefix, mode: {"iterations_run": 2, "prefix": prefix, "mode": mode},
        accounting=lambda job_id: {"total_cpu": "00:13.439", "nodes": "1", "node_list": "vm"},
    )
    assert metadata["slurm"]["total_cpu"] == "00:13.439" and metadata["resources"]["node_list"] == "vm"
    client = storage.client
    body = client.get_object(Bucket=BUCKET, Key="results/job_2d_ws1_0123abcd/output.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        assert sorted(archive.getnames()) == ["Class2D", "Class2D/run_it002_classes.mrcs", "Class2D/run_it002_model.star"]
    stored = json.loads(client.get_object(Bucket=BUCKET, Key="results/job_2d_ws1_0123abcd/metadata.json")["Body"].read())
    assert stored == metadata
    assert metadata["slurm"]["state"] == "COMPLETED" and metadata["slurm"]["exit_code"] == 0
    assert metadata["relion"]["results"] == {"iterations_run": 2, "prefix": "Class2D/run", "mode": "2d"}
    assert metadata["output"]["bytes"] == len(body)
    assert {f["path"] for f in metadata["output"]["files"]} == {"run_it002_classes.mrcs", "run_it002_model.star"}
    assert metadata["timings"]["queued"] == 10.0 and metadata["timings"]["running"] == 10.0
    assert metadata["logs"][0].endswith("/logs/main-1001.err")
    assert not Path(job["workspace_dir"]).exists()
    assert json.loads((Path(job["log_dir"]) / "metadata.json").read_text()) == metadata
    validate_metadata(metadata)


def validate_metadata(metadata: dict) -> None:
    schema = json.loads((Path(gateway.jobside.__file__).parent / "metadata.schema.json").read_text())
    jsonschema.validate(metadata, schema)


def test_archive_keeps_the_workspace_when_s3_fails(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    job["output_url"] = "s3://no-such-bucket/results/job/"
    with pytest.raises(StorageError, match="no-such-bucket"):
        run_archive(JobSpec.from_dict(job), "1001", storage=storage, scheduler=finished_scheduler(), compressor="gzip", retry_delay=0.01)
    assert (Path(job["workspace_dir"]) / "dataset" / "Class2D" / "run_it002_model.star").exists()


def test_archive_of_a_job_that_produced_nothing_still_records_metadata(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    import shutil

    shutil.rmtree(Path(job["workspace_dir"]))
    scheduler = FakeScheduler()
    scheduler.set_state("1001", "FAILED", exit_code=2)
    (Path(job["log_dir"]) / "main-1001.err").write_text("ERROR: \nMetaDataTable::read: File nonexist.star does not exist\n  backtrace...\n")
    metadata = run_archive(JobSpec.from_dict(job), "1001", storage=storage, scheduler=scheduler, compressor="gzip")
    validate_metadata(metadata)
    assert metadata["relion"]["error"] == "ERROR: MetaDataTable::read: File nonexist.star does not exist"
    assert metadata["output"] is None
    assert metadata["slurm"]["state"] == "FAILED" and metadata["slurm"]["exit_code"] == 2


def test_stage_in_streams_and_records_checksums(tmp_path: Path, storage: S3Storage) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("particles.star")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"data_"))
    storage.client.put_object(Bucket=BUCKET, Key="d.tar.gz", Body=buffer.getvalue())
    record = stage_in(storage, f"s3://{BUCKET}/d.tar.gz", tmp_path / "dataset", quota_bytes=10**6, max_members=10)
    import hashlib

    assert record["sha256"] == hashlib.sha256(buffer.getvalue()).hexdigest()
    assert record["bytes"] == len(buffer.getvalue()) and record["members"] == 1
    assert (tmp_path / "dataset" / "particles.star").read_text() == "data_"


def test_stage_in_of_a_missing_object_names_it(tmp_path: Path, storage: S3Storage) -> None:
    with pytest.raises(StorageError, match=r"GET s3://relion-local/missing.tar.gz failed: NoSuchKey"):
        stage_in(storage, f"s3://{BUCKET}/missing.tar.gz", tmp_path / "d", quota_bytes=10, max_members=10)


def changing_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int) -> Path:
    """A `tar` first in PATH that packs for real, then says a file changed and exits 1 (GNU tar's
    code for it), its first ``times`` runs; it counts its runs in the returned file."""
    import shutil
    import stat

    real = shutil.which("tar")
    bindir, count = tmp_path / "bin", tmp_path / "tar-runs"
    bindir.mkdir()
    count.write_text("0")
    script = bindir / "tar"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(( $(cat "{count}") + 1 )); echo "$n" > "{count}"\n'
        f'"{real}" "$@" || exit $?\n'
        f'if [ "$n" -le {times} ]; then echo "tar: Class2D/run_it002_model.star: file changed as we read it" >&2; exit 1; fi\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{Path(real).parent}:/usr/bin:/bin")
    return count


def archive_quickly(tmp_path: Path, storage: S3Storage) -> dict[str, Any]:
    """The hook on make_job's job, with pauses of hundredths of a second between tries."""
    return run_archive(JobSpec.from_dict(make_job(tmp_path)), "1001", storage=storage, scheduler=finished_scheduler(),
                       compressor="gzip", retry_delay=0.01)


def test_an_output_that_changes_while_packed_is_packed_again_once_it_settles(
    tmp_path: Path, storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = changing_tar(tmp_path, monkeypatch, times=1)
    metadata = archive_quickly(tmp_path, storage)
    assert runs.read_text().strip() == "2"  # packed again after the pause, then whole
    assert "changed_while_packed" not in metadata["output"]
    validate_metadata(metadata)


def test_an_output_still_changing_after_every_try_is_kept_and_the_files_are_named(
    tmp_path: Path, storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when RELION still runs on a node Slurm declared dead (cut off from slurmctld only): the
    # archive tar wrote is whole, and metadata.json names what was moving.
    from gateway.jobside.archive import PACK_ATTEMPTS

    runs = changing_tar(tmp_path, monkeypatch, times=99)
    metadata = archive_quickly(tmp_path, storage)
    assert runs.read_text().strip() == str(PACK_ATTEMPTS)
    assert metadata["output"]["changed_while_packed"] == ["Class2D/run_it002_model.star"]
    body = storage.client.get_object(Bucket=BUCKET, Key="results/job_2d_ws1_0123abcd/output.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        assert "Class2D/run_it002_model.star" in archive.getnames()
    validate_metadata(metadata)


def test_another_tar_failure_still_keeps_the_workspace(tmp_path: Path, storage: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "tar").write_text("#!/bin/sh\necho 'tar: Class2D: Cannot open: Permission denied' >&2\nexit 2\n")
    (bindir / "tar").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    job = make_job(tmp_path)
    with pytest.raises(Exception, match="Permission denied"):
        run_archive(JobSpec.from_dict(job), "1001", storage=storage, scheduler=finished_scheduler(),
                    compressor="gzip", retry_delay=0.01)
    assert Path(job["workspace_dir"]).exists()
