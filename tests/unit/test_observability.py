"""JSON logs carry the job id; Slurm commands are timed and their failures counted."""
from __future__ import annotations

import json
import logging

import pytest

from gateway.observability import SLURM_ERRORS, SLURM_LATENCY, JsonFormatter, instrumented
from gateway.process import CommandError


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("gateway.service", logging.INFO, __file__, 1, message, args, None)


def test_json_log_line_has_the_job_id_when_about_a_job() -> None:
    line = json.loads(JsonFormatter().format(record("job %s: %s -> %s", "job_2d_ws1_0123abcd", "queued", "running")))
    assert line["job_id"] == "job_2d_ws1_0123abcd"
    assert line["message"] == "job job_2d_ws1_0123abcd: queued -> running"
    assert line["level"] == "INFO" and line["logger"] == "gateway.service" and line["time"].endswith("Z")


def test_json_log_line_without_a_job() -> None:
    assert "job_id" not in json.loads(JsonFormatter().format(record("poll failed")))


def test_instrumented_runner_times_commands_and_counts_failures() -> None:
    def fake(argv, *, timeout, input=None, env=None, merge_stderr=False):  # type: ignore[no-untyped-def]
        if argv[0].endswith("sacct"):
            raise CommandError(argv, 1, "", "slurmdbd down")
        return "ok"

    run = instrumented(fake)
    before_errors = SLURM_ERRORS.labels("sacct")._value.get()
    before_count = SLURM_LATENCY.labels("squeue")._sum.get()
    assert run(["squeue", "-h"], timeout=5) == "ok"
    with pytest.raises(CommandError):
        run(["/usr/bin/sacct"], timeout=5)
    assert SLURM_ERRORS.labels("sacct")._value.get() == before_errors + 1
    assert SLURM_LATENCY.labels("squeue")._sum.get() >= before_count
