"""Kill the node daemon (slurmd) under a running job and bring it back later.

slurmd is only the node's daemon: the job's slurmstepd and RELION keep running without it, and
RELION finishes while slurmd is down. Until slurmd returns the node cannot finish the job's
epilog nor start the completion hook, so the job must not be reported as ended; once it is back
the outcome (here: success, the output archived) is reported.
"""
from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path

import requests

from tests.reliability.conftest import (
    Tally, get, job_request, nodes_of, post, slurm_jobs_named, slurmd_daemon, wait_for_all, wait_until,
)


def test_slurmd_killed_mid_run_and_brought_back_reports_the_outcome(
    http: requests.Session, own_gateway: Callable[..., str], dataset_url: str, bucket: str, tally: Tally, tmp_path: Path
) -> None:
    from gateway.stack import stack_status, stack_up

    url = own_gateway()
    request = job_request("slurmdcrash", dataset_url, bucket, f"slurmd{secrets.token_hex(3)}", flags={"iter": 4})
    job_id = post(http, url, request)["job_id"]
    phases = tmp_path / "logs" / "slurmdcrash" / job_id / "phases"
    wait_until(lambda: phases.exists() and "running" in phases.read_text(), 180, "RELION to start", interval=0.1)
    # The slurmd of a node the job runs on (the first of its nodes on the multi-node stack).
    status = stack_status()
    node = nodes_of(get(http, url, job_id)["slurm"]["main_job_id"])[0]
    os.kill(status["daemons"][slurmd_daemon(status, node)]["pid"], signal.SIGKILL)
    try:
        wait_until(lambda: "finished" in phases.read_text(), 180, "RELION to finish without slurmd")
        seen_while_down = {get(http, url, job_id)["status"] for _ in range(3)}
    finally:
        assert stack_up()["all_up"]
    ended = wait_for_all(http, url, [job_id], timeout=300)[job_id]
    named = slurm_jobs_named(job_id)
    tally.counts.update(
        submitted=1,
        accepted=1,
        in_slurm=len(named.get(job_id, ())),
        lost=int(ended["status"] == "lost"),
        duplicated=len(named.get(job_id, ())) - 1,
    )
    tally.notes.append(f"while slurmd was down: {sorted(seen_while_down)}; after: {ended['status']}: {ended['message']}")

    assert seen_while_down <= {"running", "archiving"}, seen_while_down  # not ended while the node cannot say
    assert ended["status"] == "succeeded", ended
    assert "run_it004_model.star" in {f["path"] for f in ended["metadata"]["output"]["files"]}
    assert tally.counts["duplicated"] == 0
