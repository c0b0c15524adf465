"""Previews in the job: the watcher starts the renderer without waiting for it, and the archive hook
renders a missed final iteration and uploads every preview (an in-process S3 fake, moto)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import pytest
from moto import mock_aws

import gateway.jobside
from gateway.jobs.spec import JobSpec
from gateway.jobside.archive import run_archive
from gateway.jobside.preview_runner import FinalRender, PreviewLauncher, has_iteration
from gateway.jobside.previews import render_previews
from gateway.jobside.watch import watch
from gateway.storage.s3 import S3Storage, StorageError
from tests.fakes import FakeScheduler
from tests.unit.test_previews import make_2d, make_autorefine

BUCKET = "relion-local"
JOB_ID = "job_2d_ws1_0badcafe"


# -- the watcher's launcher, with a fake renderer process ------------------------------------------


class FakeChild:
    def __init__(self, argv: list[str], **options: Any) -> None:
        self.argv, self.options = argv, options
        self.code: int | None = None
        self.signals: list[str] = []

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.signals.append("TERM")
        self.code = -15

    def kill(self) -> None:
        self.signals.append("KILL")
        self.code = -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.code


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def launcher(tmp_path: Path, **options: Any) -> tuple[PreviewLauncher, list[FakeChild], Clock]:
    children: list[FakeChild] = []
    clock = Clock()

    def popen(argv: list[str], **kw: Any) -> FakeChild:
        children.append(FakeChild(argv, **kw))
        return children[-1]

    made = PreviewLauncher(tmp_path / "dataset", "Class2D/run", "2d", tmp_path / "logs" / "previews",
                           popen=popen, clock=clock, python="/opt/py/bin/python", **options)
    return made, children, clock


def iterations_of(child: FakeChild) -> list[int]:
    argv = child.argv
    return [int(argv[i + 1]) for i, arg in enumerate(argv) if arg == "--iteration"]


def test_each_finished_iteration_is_rendered_once_one_renderer_at_a_time(tmp_path: Path) -> None:
    previews, children, clock = launcher(tmp_path, settle=2.0)
    previews.finished(0)
    clock.now += 10
    previews.poll()
    assert children == []  # it000 holds the initial references only
    previews.finished(2)
    previews.poll()
    assert children == []  # RELION may still be writing iteration 2's files
    clock.now += 2
    previews.poll()
    assert len(children) == 1 and iterations_of(children[0]) == [1, 2]
    argv = children[0].argv
    assert argv[:5] == ["/opt/py/bin/python", "-I", "-m", "gateway.jobside", "previews"]
    assert argv[argv.index("--out") + 1] == str(tmp_path / "logs" / "previews") and argv[-2:] == ["--nice", "10"]
    assert children[0].options["cwd"] == "/" and children[0].options["stderr"] == subprocess.STDOUT
    previews.finished(3)
    previews.finished(4)
    previews.finished(4)
    previews.poll()
    assert len(children) == 1  # the first is still running: never two at once, never a wait
    children[0].code = 0
    clock.now += 2
    previews.poll()
    assert len(children) == 2 and iterations_of(children[1]) == [3, 4]
    children[1].code = 0
    previews.poll()
    previews.poll()
    assert len(children) == 2 and [r["iterations"] for r in previews.renders] == [[1, 2], [3, 4]]
    assert not (tmp_path / "logs" / "previews" / "render.log").read_text()  # successes log only the renderer's lines


def test_iterations_that_keep_coming_are_rendered_together_but_not_held_back_for_ever(tmp_path: Path) -> None:
    previews, children, clock = launcher(tmp_path, settle=2.0, max_wait=20.0)
    for iteration in range(1, 13):  # one every 1.9 s: never 2 s without a newer one
        previews.finished(iteration)
        previews.poll()
        clock.now += 1.9
    assert len(children) == 1 and iterations_of(children[0]) == list(range(1, 13))  # at 20.9 s: the 20 s cap


def test_a_failing_or_hanging_renderer_is_logged_and_the_next_goes_on(tmp_path: Path) -> None:
    previews, children, clock = launcher(tmp_path, timeout=60, settle=0.0)
    previews.finished(1)
    previews.poll()
    children[0].code = 1
    previews.finished(2)
    previews.poll()
    clock.now += 61
    previews.finished(3)
    previews.poll()
    assert children[1].signals == ["TERM"] and iterations_of(children[2]) == [3]
    previews.close()
    assert children[2].signals == ["TERM"]
    log = (tmp_path / "logs" / "previews" / "render.log").read_text()
    assert "previews of iterations [1] failed (exit 1)" in log
    assert "previews of iterations [2] timed out after 60 s (killed)" in log
    assert "previews of iterations [3] stopped: the watcher is ending" in log
    assert [r["outcome"] for r in previews.renders] == ["failed (exit 1)", "timed out after 60 s (killed)", "stopped: the watcher is ending"]


def test_a_renderer_that_cannot_start_costs_nothing_but_a_log_line(tmp_path: Path) -> None:
    def popen(argv: list[str], **kw: Any) -> Any:
        raise OSError("no such interpreter")

    previews = PreviewLauncher(tmp_path, "Class2D/run", "2d", tmp_path / "previews", popen=popen, settle=0.0)
    previews.finished(1)
    previews.poll()
    assert previews.child is None and "could not start the renderer for iterations [1]" in (tmp_path / "previews" / "render.log").read_text()


# -- the watcher with the real renderer --------------------------------------------------------


def test_the_watcher_renders_the_previews_of_finished_iterations_next_to_progress(tmp_path: Path) -> None:
    dataset = make_2d(tmp_path / "dataset")
    logs = tmp_path / "logs"
    logs.mkdir()
    previews = PreviewLauncher(dataset, "Class2D/run", "2d", logs / "previews", settle=0.2)
    deadline = time.monotonic() + 60
    reports: list[dict[str, Any]] = []

    def keep_going() -> bool:
        return not (previews.renders and previews.child is None and not previews.pending) and time.monotonic() < deadline

    watch(dataset, "Class2D/run", "2d", progress_file=logs / "progress.json", report=reports.append, interval=0.05,
          keep_going=keep_going, previews=previews)
    assert reports[0]["iteration"] == 2
    assert previews.renders[0]["iterations"] == [1, 2] and previews.renders[0]["outcome"] == "ok"
    index = json.loads((logs / "previews" / "index.json").read_text())
    assert [e["name"] for e in index["previews"]] == ["it001-classes.png", "it001-history.png", "it002-classes.png", "it002-history.png"]
    assert "iteration 2: it002-classes.png" in (logs / "previews" / "render.log").read_text()


def test_the_watch_command_renders_and_stops_on_sigterm_saying_nothing_on_stderr(tmp_path: Path) -> None:
    dataset = make_2d(tmp_path / "dataset")
    logs = tmp_path / "logs"
    logs.mkdir()
    command = [sys.executable, "-I", "-m", "gateway.jobside", "watch", "--dir", str(dataset), "--prefix", "Class2D/run",
               "--mode", "2d", "--job-id", JOB_ID, "--progress-file", str(logs / "progress.json"), "--interval", "0.2"]
    watcher = subprocess.Popen(command, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": os.environ["PATH"]})
    try:
        deadline = time.monotonic() + 60
        while not has_iteration(logs / "previews", 2):
            assert time.monotonic() < deadline and watcher.poll() is None, "no previews from the watcher"
            time.sleep(0.1)
        watcher.send_signal(signal.SIGTERM)
        _, stderr = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 128 + signal.SIGTERM
    assert stderr == b""  # the job's stderr is where the gateway looks for RELION's error
    assert json.loads((logs / "progress.json").read_text())["iteration"] == 2


# -- the archive hook ---------------------------------------------------------------------------


@pytest.fixture
def storage(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Storage]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield S3Storage(client)


def make_job(tmp_path: Path) -> dict[str, Any]:
    log_dir = tmp_path / "logs" / "alice" / JOB_ID
    workspace = tmp_path / "ws" / "alice" / JOB_ID
    make_2d(workspace / "dataset")
    log_dir.mkdir(parents=True)
    (log_dir / "main-1001.out").write_text("Expectation iteration 2 of 2\n")
    (log_dir / "main-1001.err").write_text("")
    (log_dir / "phases").write_text("staging 100\nrunning 105\nfinished 115\n")
    return {
        "job_id": JOB_ID, "user_id": "alice", "workspace_id": "ws1", "mode": "2d",
        "request": {"flags": {"i": "particles.star"}},
        "resources": {"partition": "debug", "ntasks": 3, "cpus_per_task": 1, "mem_per_cpu_mb": 1000, "time_limit": "00:30:00",
                      "total_cpus": 3, "total_memory_mb": 3000},
        "relion_command": ["relion_refine_mpi", "--i", "particles.star"],
        "dataset_s3_url": f"s3://{BUCKET}/datasets/tiny.tar.gz",
        "output_url": f"s3://{BUCKET}/results/{JOB_ID}/",
        "log_dir": str(log_dir), "workspace_dir": str(workspace),
        "output_prefix": "Class2D/run", "output_dir": "Class2D", "accepted_at": 90.0,
    }


def archive(job: dict[str, Any], storage: Any) -> dict[str, Any]:
    scheduler = FakeScheduler()
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    metadata = run_archive(JobSpec.from_dict(job), "1001", storage=storage, scheduler=scheduler, compressor="gzip", retry_delay=0.01)
    schema = json.loads((Path(gateway.jobside.__file__).parent / "metadata.schema.json").read_text())
    jsonschema.validate(metadata, schema)
    return metadata


def s3_object(storage: S3Storage, key: str) -> dict[str, Any]:
    return storage.client.get_object(Bucket=BUCKET, Key=key)


def test_the_archive_renders_a_missed_final_iteration_and_uploads_every_preview(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    previews_dir = Path(job["log_dir"]) / "previews"
    render_previews(Path(job["workspace_dir"]) / "dataset", "Class2D/run", "2d", [1], previews_dir)  # the watcher did it001
    metadata = archive(job, storage)
    names = [p["name"] for p in metadata["previews"]]
    assert names == ["it001-classes.png", "it001-history.png", "it002-classes.png", "it002-history.png"]
    log = (previews_dir / "render.log").read_text()
    assert "iteration 2: it002-classes.png" in log and '"iterations": [2],' in log  # rendered by the hook, iteration 2 only
    local = json.loads((previews_dir / "index.json").read_text())
    for entry, indexed in zip(metadata["previews"], local["previews"]):
        assert entry == {**indexed, "url": f"s3://{BUCKET}/results/{JOB_ID}/previews/{entry['name']}"}
        stored = s3_object(storage, f"results/{JOB_ID}/previews/{entry['name']}")
        assert stored["ContentType"] == "image/png" and stored["Body"].read() == (previews_dir / entry["name"]).read_bytes()
    uploaded_index = json.loads(s3_object(storage, f"results/{JOB_ID}/previews/index.json")["Body"].read())
    assert uploaded_index["previews"] == local["previews"] and uploaded_index["schema_version"] == 1
    stored_metadata = json.loads(s3_object(storage, f"results/{JOB_ID}/metadata.json")["Body"].read())
    assert stored_metadata["previews"] == metadata["previews"]
    assert not Path(job["workspace_dir"]).exists()


def test_the_archive_renders_nothing_when_the_watcher_had_the_final_iteration(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    previews_dir = Path(job["log_dir"]) / "previews"
    render_previews(Path(job["workspace_dir"]) / "dataset", "Class2D/run", "2d", [1, 2], previews_dir)
    metadata = archive(job, storage)
    assert len(metadata["previews"]) == 4 and not (previews_dir / "render.log").exists()


def test_previews_that_fail_to_upload_are_left_out_and_never_fail_the_archive(tmp_path: Path, storage: S3Storage) -> None:
    class Flaky:
        def __init__(self, inner: S3Storage) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def put_bytes(self, data: bytes, location: Any, content_type: str = "application/octet-stream") -> None:
            if location.key.endswith("it002-history.png"):
                raise StorageError("PUT", location.bucket, location.key, "503 Slow Down")
            self.inner.put_bytes(data, location, content_type)

    job = make_job(tmp_path)
    metadata = archive(job, Flaky(storage))  # the watcher rendered nothing: the hook renders both iterations
    assert [p["name"] for p in metadata["previews"]] == ["it001-classes.png", "it001-history.png", "it002-classes.png"]
    uploaded = json.loads(s3_object(storage, f"results/{JOB_ID}/previews/index.json")["Body"].read())
    assert [e["name"] for e in uploaded["previews"]] == [p["name"] for p in metadata["previews"]]
    assert "it002-history.png not uploaded" in (Path(job["log_dir"]) / "previews" / "render.log").read_text()
    assert metadata["output"] is not None


def test_a_broken_output_gives_no_previews_and_still_archives(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    (Path(job["workspace_dir"]) / "dataset" / "Class2D" / "run_it002_classes.mrcs").write_bytes(b"\0" * 4096)
    metadata = archive(job, storage)
    assert [p["name"] for p in metadata["previews"]] == ["it001-classes.png", "it001-history.png"] and metadata["output"] is not None
    log = (Path(job["log_dir"]) / "previews" / "render.log").read_text()
    assert "iteration 2: no previews" in log and "archive: previews of iterations [2, 1] failed (exit 1)" in log


def test_the_final_render_has_nothing_to_do_before_the_first_iteration(tmp_path: Path) -> None:
    dataset = make_autorefine(tmp_path / "d", iterations=0, converged=False)
    assert FinalRender.start(dataset, "Refine3D/run", "autorefine", tmp_path / "previews") is None
    assert FinalRender.start(tmp_path / "nothing", "Refine3D/run", "autorefine", tmp_path / "previews") is None


def test_the_watcher_and_the_archive_hook_load_no_image_library() -> None:
    # The watcher lives as long as RELION inside the job's --mem (~31 MB): rendering is a child's job.
    code = (
        "import sys\nimport gateway.jobside.program, gateway.jobside.watch, gateway.jobside.archive, gateway.callbacks\n"
        "print(sorted(m for m in ('numpy', 'PIL', 'mrcfile', 'matplotlib') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd="/")
    assert loaded.stdout.strip() == "[]"


def test_every_indexed_preview_is_one_the_api_serves(tmp_path: Path) -> None:
    from gateway.jobs.previews import Preview  # the API's reading of the contract

    dataset = make_autorefine(tmp_path / "d")
    render_previews(dataset, "Refine3D/run", "autorefine", [1, 4], tmp_path / "previews")
    make_2d(tmp_path / "d")
    render_previews(dataset, "Class2D/run", "2d", [2], tmp_path / "previews")
    entries = json.loads((tmp_path / "previews" / "index.json").read_text())["previews"]
    assert [e["kind"] for e in entries] == ["map", "fsc", "history", "classes", "history", "map", "fsc", "history"]
    assert all(Preview.from_entry(e) is not None and Preview.from_entry(e).as_dict() == e for e in entries)
