"""Files a job wrote are read without following its symlinks (its account owns its log dir)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from flask.testing import FlaskClient

from gateway.jobfiles import read_job_file, read_job_text
from gateway.slurm.memory import memory_kill_line
from tests.fakes import FakeScheduler
from tests.unit.test_api import JOBS, submit


def test_a_regular_file_is_read_and_a_planted_symlink_or_fifo_is_not(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    job = root / "alice" / "job_1"
    job.mkdir(parents=True)
    secret = tmp_path / "callback.key"
    secret.write_text("0123456789abcdef\n")
    (job / "main-1.err").write_text("ERROR: real\n")
    assert read_job_text(root, job / "main-1.err") == "ERROR: real\n"
    (job / "main-2.err").symlink_to(secret)
    assert read_job_file(root, job / "main-2.err") is None
    os.mkfifo(job / "main-3.err")
    assert read_job_file(root, job / "main-3.err") is None  # and it did not hang
    # A symlinked directory on the way is refused too.
    (root / "alice" / "job_2").symlink_to(tmp_path)
    assert read_job_file(root, root / "alice" / "job_2" / "callback.key") is None
    assert read_job_file(root, job / "missing") is None
    assert read_job_file(root, job / "main-1.err", limit=4) is None
    # Without the root (the job side, slurm.memory): the last three components are the job's.
    assert read_job_text(None, job / "main-1.err") == "ERROR: real\n"
    assert read_job_file(None, job / "main-2.err") is None


def test_memory_kill_line_does_not_follow_a_symlink(tmp_path: Path) -> None:
    job = tmp_path / "logs" / "alice" / "job_1"
    job.mkdir(parents=True)
    (tmp_path / "gateway.txt").write_text("Exceeded job memory limit\n")
    (job / "main-1.err").symlink_to(tmp_path / "gateway.txt")
    assert memory_kill_line(job / "main-1.err") == ""


def test_the_log_endpoint_and_the_poller_refuse_a_jobs_symlinks(client: FlaskClient, app, scheduler: FakeScheduler, tmp_path: Path) -> None:
    service = app.extensions["relion_gateway"]
    job = submit(client)
    log_dir = Path(json.loads(service.store.get(job["job_id"]).job_json)["log_dir"])
    secret = tmp_path / "secret.txt"
    secret.write_text('{"iteration": 999, "stolen": "the gateway key"}\n')
    # The job replaces its stdout, progress and metadata with links to a gateway file.
    (log_dir / "main-1001.out").symlink_to(secret)
    (log_dir / "progress.json").symlink_to(secret)
    (log_dir / "metadata.json").symlink_to(secret)
    response = client.get(f"{JOBS}/{job['job_id']}/logs?stream=out")
    assert response.status_code == 404 and "stolen" not in response.get_data(as_text=True)
    scheduler.set_state("1001", "RUNNING")
    service.poll()
    assert service.store.get(job["job_id"]).progress_json is None
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    service.poll()
    record = service.store.get(job["job_id"])
    assert record.state == "succeeded" and (record.metadata_json is None or "stolen" not in record.metadata_json)


def test_error_line_does_not_follow_a_symlink(tmp_path: Path) -> None:
    from gateway.relion.logs import error_line

    job = tmp_path / "logs" / "alice" / "job_1"
    job.mkdir(parents=True)
    (tmp_path / "callback.key").write_text("ERROR: 0123456789abcdef\n")
    (job / "main-1.err").symlink_to(tmp_path / "callback.key")
    assert error_line(job / "main-1.err") == ""
    (job / "main-2.err").write_text("ERROR: \nthe real one\n")
    assert error_line(job / "main-2.err") == "ERROR: the real one"


def test_a_job_account_reads_its_own_files_below_a_root_it_may_only_traverse(tmp_path: Path) -> None:
    # The job side (the hook, as the job's account) reads its phases and stderr below the log root,
    # which is 0711: opening the directories for reading would fail, walking through them must not.
    import pwd
    import subprocess
    import sys

    root = tmp_path / "logs"
    job = root / "alice" / "job_1"
    job.mkdir(parents=True)
    (job / "phases").write_text("staging 1\n")
    for directory in (root, root / "alice"):
        directory.chmod(0o711)
    account = pwd.getpwnam("nobody")
    os.chown(job, account.pw_uid, account.pw_gid)
    os.chown(job / "phases", account.pw_uid, account.pw_gid)
    code = f"from gateway.jobfiles import read_job_text; from pathlib import Path; print(read_job_text(None, Path({str(job / 'phases')!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, user=account.pw_uid, group=account.pw_gid,
        extra_groups=[], cwd="/", env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert out.stdout.strip() == "staging 1", out.stderr
