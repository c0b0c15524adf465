"""Stage-in through the dataset cache: one download per object version, hard links, a fallback that says why."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import IO, Any

import pytest

from gateway.jobside.stage_in import restore_output, stage_dataset
from gateway.storage.base import ObjectInfo, S3Location

URL = "s3://relion-local/datasets/tiny.tar.gz"


def tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class CountingStorage:
    """The parts of BrokeredStorage stage-in uses; counts the bytes it serves."""

    def __init__(self, data: bytes, etag: str = '"v1"') -> None:
        self.data, self.etag, self.served, self.gets = data, etag, 0, 0
        self.output = b""

    def dataset_info(self, location: S3Location) -> ObjectInfo:
        return ObjectInfo(len(self.data), self.etag)

    def open_stream(self, location: S3Location) -> tuple[IO[bytes], ObjectInfo]:
        self.gets += 1
        self.served += len(self.data)
        return io.BytesIO(self.data), ObjectInfo(len(self.data), self.etag)

    def open_output_archive(self) -> tuple[IO[bytes], ObjectInfo]:
        return io.BytesIO(self.output), ObjectInfo(len(self.output), '"out"')


DATASET = {"particles.star": b"data_\nloop_\n_rlnImageName #1\n1@particles.mrcs\n", "particles.mrcs": b"\0" * 4096}


def stage(storage: CountingStorage, dest: Path, cache: Path | None, **options: Any) -> dict[str, Any]:
    return stage_dataset(storage, URL, dest, quota_bytes=10**7, max_members=100, cache_root=cache, cache_quota_bytes=10**7, **options)


def test_the_second_job_links_the_first_jobs_download_and_reads_nothing_from_s3(tmp_path: Path) -> None:
    storage = CountingStorage(tarball(DATASET))
    first = stage(storage, tmp_path / "w1" / "dataset", tmp_path / "cache")
    second = stage(storage, tmp_path / "w2" / "dataset", tmp_path / "cache")
    assert storage.gets == 1
    assert first["cache"]["hit"] is False and first["bytes"] == len(storage.data)
    assert second["cache"]["hit"] is True and second["bytes"] == 0 and second["sha256"] == first["sha256"]
    for name in DATASET:
        a, b = (tmp_path / w / "dataset" / name for w in ("w1", "w2"))
        assert a.stat().st_ino == b.stat().st_ino and a.read_bytes() == DATASET[name]  # one copy on disk
        assert a.stat().st_mode & 0o222 == 0  # nobody writes the cache through a link


def test_a_new_version_of_the_object_is_a_new_entry(tmp_path: Path) -> None:
    stage(CountingStorage(tarball(DATASET)), tmp_path / "w1" / "dataset", tmp_path / "cache")
    newer = CountingStorage(tarball({**DATASET, "particles.mrcs": b"\1" * 4096}), etag='"v2"')
    record = stage(newer, tmp_path / "w2" / "dataset", tmp_path / "cache")
    assert record["cache"]["hit"] is False and newer.gets == 1
    assert (tmp_path / "w2" / "dataset" / "particles.mrcs").read_bytes() == b"\1" * 4096


def test_an_object_that_changes_between_head_and_get_is_not_cached(tmp_path: Path) -> None:
    storage = CountingStorage(tarball(DATASET))
    storage.dataset_info = lambda location: ObjectInfo(len(storage.data), '"stale"')  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="changed while it was staged"):
        stage(storage, tmp_path / "w1" / "dataset", tmp_path / "cache")
    assert not list((tmp_path / "cache" / "entries").iterdir())


def test_without_a_usable_cache_the_dataset_is_staged_directly_and_the_record_says_why(tmp_path: Path) -> None:
    storage = CountingStorage(tarball(DATASET))
    record = stage(storage, tmp_path / "w1" / "dataset", tmp_path / "not-mounted" / "cache")
    assert record["cache"]["used"] is False and record["cache"]["reason"]
    assert (tmp_path / "w1" / "dataset" / "particles.mrcs").read_bytes() == DATASET["particles.mrcs"]
    plain = stage(storage, tmp_path / "w2" / "dataset", None)
    assert "cache" not in plain and storage.gets == 2


def test_restore_output_puts_back_only_the_output_directory(tmp_path: Path) -> None:
    dest = tmp_path / "w" / "dataset"
    storage = CountingStorage(tarball(DATASET))
    stage(storage, dest, None)
    storage.output = tarball({"Class2D/run_it002_optimiser.star": b"x", "elsewhere.txt": b"y"})
    record = restore_output(storage, dest, "Class2D", quota_bytes=10**6, max_members=10)
    assert (dest / "Class2D" / "run_it002_optimiser.star").read_bytes() == b"x" and record["members"] == 2
    assert not (dest / "elsewhere.txt").exists() and not (tmp_path / "w" / "restored-output").exists()
    storage.output = tarball({"other/file": b"z"})
    with pytest.raises(ValueError, match="no directory 'Class2D'"):
        restore_output(storage, dest, "Class2D", quota_bytes=10**6, max_members=10)


def parent_output(tmp_path: Path) -> tuple[bytes, dict[str, Any]]:
    """A finished 2D parent: its output.tar.gz (Class2D/ only, as archived) and its recorded outputs."""
    from gateway.relion.subset import job_outputs
    from tests.unit.test_subset import classification

    parent = classification(tmp_path / "parent-dataset", "2d")
    outputs = job_outputs(parent, "Class2D/run", "2d")
    files = {str(p.relative_to(parent)): p.read_bytes() for p in (parent / "Class2D").iterdir()}
    return tarball(files), outputs.to_dict()


def test_a_chained_job_links_its_parents_cached_output_and_writes_its_particles(tmp_path: Path) -> None:
    from gateway.jobs.spec import ChainInput
    from gateway.jobside.chain import stage_parent
    from tests.unit.test_subset import stacks

    archive, outputs = parent_output(tmp_path)
    storage = CountingStorage(b"")
    storage.open_parent_output = lambda: (io.BytesIO(archive), ObjectInfo(len(archive), '"p1"'))  # type: ignore[attr-defined]
    classes = sorted(int(n) for n, count in outputs["class_particles"].items() if count)
    chain = ChainInput("job_2d_ws_parent", "2d", outputs, "s3://b/results/job_2d_ws_parent/output.tar.gz", '"p1"', len(archive), (classes[0],))
    records = []
    for workspace in ("w1", "w2"):
        dest = tmp_path / workspace / "dataset"
        dest.mkdir(parents=True)
        stacks(dest)  # the parent's dataset, as stage_dataset left it
        records.append(stage_parent(storage, dest, chain, quota_bytes=10**7, max_members=100, cache_root=tmp_path / "cache", cache_quota_bytes=10**7))
    first, second = records
    assert first["cache"]["hit"] is False and first["bytes"] == len(archive)
    assert second["cache"]["hit"] is True and second["bytes"] == 0  # the second child reads nothing from S3
    assert second["particles"] == outputs["class_particles"][str(classes[0])] and second["classes"] == [classes[0]]
    assert (tmp_path / "w2" / "dataset" / "parent" / "particles.star").is_file()

    # The parent's archive was rewritten since the child was submitted: refused, not cached.
    storage.open_parent_output = lambda: (io.BytesIO(archive), ObjectInfo(len(archive), '"p2"'))  # type: ignore[attr-defined]
    dest = tmp_path / "w3" / "dataset"
    dest.mkdir(parents=True)
    stacks(dest)
    with pytest.raises(ValueError, match="changed since this job was submitted"):
        stage_parent(storage, dest, chain, quota_bytes=10**7, max_members=100)


def test_a_rerun_of_the_same_attempt_starts_from_an_empty_dataset_directory(tmp_path: Path) -> None:
    # Seen in CI after a slurmctld SIGKILL: Slurm ran a job's script again and the dataset cache
    # refused the directory its first run had filled ("... dataset is not empty").
    from gateway.jobside.program import clear_earlier_run

    dest = tmp_path / "dataset"
    assert clear_earlier_run(dest) is False  # nothing there yet
    (dest / "Class2D").mkdir(parents=True)
    (dest / "Class2D" / "run_it001_model.star").write_text("data_\n")
    assert clear_earlier_run(dest) is True and not dest.exists()
    link = tmp_path / "elsewhere"
    link.symlink_to(tmp_path)
    assert clear_earlier_run(link) is False and tmp_path.exists()  # a symlink is never followed
