"""Where each RELION rank ran (from its stdout) and the GPUs it was given, in metadata.json."""
from __future__ import annotations

import json
from pathlib import Path

from gateway.jobs.spec import JobSpec
from gateway.jobside.archive import run_archive
from gateway.relion.logs import RankHost, rank_hosts, rank_hosts_in
from gateway.storage.s3 import S3Storage
from tests.unit.test_archive import finished_scheduler, make_job, storage, validate_metadata  # noqa: F401 (fixture)

# As relion_refine_mpi 3.1/4.0 print it, ranks interleaved with each other and with other output.
RELION_4_STDOUT = """\
RELION version: 4.0.1-commit-ex417f
Precision: BASE=double
 === RELION MPI setup ===
 + Number of MPI processes             = 4
 + Leader  (0) runs on host            = rgnode1
 + Follower     1 runs on host = rgnode1
 + Follower     3 runs on host = rgnode2 + Follower     2 runs on host = rgnode2
 =================
 Running CPU instructions in double precision.
Follower 9 is not a line RELION writes about hosts
 Expectation iteration 1 of 2
"""
RELION_3_STDOUT = " Master  (0) runs on host = vm-a.cluster.local\n Slave     1 runs on host = vm-b.cluster.local\n Slave     2 runs on host = vm-b.cluster.local\n"


def test_rank_hosts_reads_relion_4s_words() -> None:
    assert rank_hosts(RELION_4_STDOUT.splitlines()) == [
        RankHost(0, "rgnode1"), RankHost(1, "rgnode1"), RankHost(2, "rgnode2"), RankHost(3, "rgnode2"),
    ]


def test_rank_hosts_reads_the_older_words() -> None:
    assert [(h.rank, h.host) for h in rank_hosts(RELION_3_STDOUT.splitlines())] == [
        (0, "vm-a.cluster.local"), (1, "vm-b.cluster.local"), (2, "vm-b.cluster.local"),
    ]


def test_rank_hosts_tolerates_other_text_and_keeps_a_requeued_runs_hosts() -> None:
    assert rank_hosts(["", "nothing here", "Leader (0) runs on host =", "~~(,_,\">", "\x00\xff"]) == []
    # A requeued job appends its second run to the same log: the later line wins.
    assert rank_hosts(["Leader (0) runs on host = old", "Leader (0) runs on host = new"]) == [RankHost(0, "new")]


def test_rank_hosts_in_a_missing_log_is_none(tmp_path: Path) -> None:
    assert rank_hosts_in(tmp_path / "main-1.out") == []
    (tmp_path / "main-2.out").write_bytes(RELION_3_STDOUT.encode() + b"\xff\xfe garbage\n")
    assert len(rank_hosts_in(tmp_path / "main-2.out")) == 3


def test_metadata_records_rank_hosts_and_the_gpu_layout(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    log_dir = Path(job["log_dir"])
    (log_dir / "main-1001.out").write_text(RELION_4_STDOUT)
    gpus = {"visible_devices": "2,3", "device_string": "0:1:0", "ranks": 4, "mode": "2d", "source": "CUDA_VISIBLE_DEVICES",
            "warnings": ["3 ranks share 2 devices"]}
    (log_dir / "gpus.json").write_text(json.dumps(gpus))
    metadata = run_archive(JobSpec.from_dict(job), "1001", storage=storage, scheduler=finished_scheduler(), compressor="gzip")
    validate_metadata(metadata)
    resources = metadata["resources"]
    assert resources["rank_hosts"] == [
        {"rank": 0, "host": "rgnode1"}, {"rank": 1, "host": "rgnode1"}, {"rank": 2, "host": "rgnode2"}, {"rank": 3, "host": "rgnode2"},
    ]
    assert resources["hosts"] == ["rgnode1", "rgnode2"]
    assert resources["gpus"] == gpus


def test_metadata_without_host_lines_or_gpus(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    (Path(job["log_dir"]) / "gpus.json").write_text('{"torn')  # a torn record never stops the archive
    metadata = run_archive(JobSpec.from_dict(job), "1001", storage=storage, scheduler=finished_scheduler(), compressor="gzip")
    validate_metadata(metadata)
    assert (metadata["resources"]["rank_hosts"], metadata["resources"]["hosts"], metadata["resources"]["gpus"]) == ([], [], None)
