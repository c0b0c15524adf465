"""Node faults on the multi-node stack: a node cut off mid-run, a node drained while jobs wait.

A compute node is a slurmd in its own network namespace (gateway/stack/nodes.py); cutting the
host side of its link is what a dead switch port or a crashed node looks like to slurmctld: the
node stops answering, is marked DOWN after SlurmdTimeout, and its jobs end NODE_FAIL. The
completion hook is an afterany job with no node of its own, so it runs on a node that is up and
archives what RELION wrote to the shared file system before the node was lost.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.process import run_command
from gateway.stack import stack_status
from gateway.stack.nodes import Node, Topology
from tests.reliability.conftest import Tally, get, job_request, node_state, nodes_of, post, wait_for_all, wait_until

pytestmark = pytest.mark.skipif(not stack_status().get("multinode"), reason="the stack runs the one-node layout")


def _veth(node: str) -> str:
    return Node(node, "", 0, 0).veth


def _back_up(node: str) -> None:
    """Reconnect the node and let the stack converge (ReturnToService=2 returns it once it registers)."""
    from gateway.stack import stack_up

    run_command(["ip", "link", "set", _veth(node), "up"], timeout=30)
    assert stack_up()["all_up"]
    wait_until(lambda: node_state(node) in ("idle", "mix", "alloc"), 120, f"{node} to return to service", interval=1.0)


def test_a_node_cut_off_mid_run_ends_node_fail_and_the_hook_archives_elsewhere(
    http: requests.Session, own_gateway: Callable[..., str], dataset_url: str, bucket: str, tally: Tally, tmp_path: Path,
    stack: dict[str, Any],
) -> None:
    # --no-requeue: Slurm would otherwise requeue a batch job whose node failed (JobRequeue=1).
    url = own_gateway(SLURM_EXTRA_DIRECTIVES=["--no-requeue"])
    iterations = 50  # far more than run before the node is declared DOWN: the output is partial
    request = job_request("nodecut", dataset_url, bucket, f"cut{secrets.token_hex(3)}", num_mpi=3, flags={"iter": iterations})
    job = post(http, url, request)
    job_id, main_id = job["job_id"], job["slurm"]["main_job_id"]
    workspace = tmp_path / "workspaces" / "nodecut" / job_id / "dataset" / "Class2D"
    wait_until(lambda: list(workspace.glob("run_it001_model.star")), 240, "RELION's first iteration", interval=0.2)
    (victim,) = nodes_of(main_id)  # 3 ranks of one thread each: one node holds them all
    cut_at = time.monotonic()
    run_command(["ip", "link", "set", _veth(victim), "down"], timeout=30)
    try:
        seen: set[str] = set()

        def ended() -> bool:
            record = get(http, url, job_id)
            seen.add(record["status"])
            return record["status"] not in ("queued", "staging", "running", "archiving")

        wait_until(ended, 240, "the job to end after its node was cut off", interval=1.0)
        noticed_s = time.monotonic() - cut_at
        down_state = node_state(victim)
    finally:
        _back_up(victim)
    final = wait_for_all(http, url, [job_id], timeout=120)[job_id]
    archive_nodes = run_command(["sacct", "-X", "-n", "-P", "-j", final["slurm"]["archive_job_id"], "-o", "NodeList"], timeout=30).split()
    files = {f["path"] for f in (final["metadata"] or {}).get("output", {}).get("files", [])}
    models = sorted(p for p in files if p.endswith("_model.star"))
    tally.counts.update(submitted=1, node_fail=int(final["status"] == "node_fail"), archived=int(bool(files)), iterations_archived=len(models))
    tally.notes.append(
        f"{victim} cut off after iteration 1; Slurm said {final['slurm']['state']} {noticed_s:.0f} s later (node {down_state}); "
        f"the hook ran on {archive_nodes}; {len(models)} of {iterations} iterations archived; states seen {sorted(seen)}; "
        # RELION may still run on the cut-off node, writing to the shared disk while the hook packs
        f"still being written while packed: {(final['metadata'] or {}).get('output', {}).get('changed_while_packed', [])}"
    )

    assert final["status"] == "node_fail", final
    assert down_state.startswith(("down", "idle*", "down*")) or "*" in down_state, down_state
    assert archive_nodes and victim not in archive_nodes[-1], archive_nodes  # on a node that is up
    assert 1 <= len(models) < iterations, models  # the partial output, archived
    assert final["metadata"]["output"]["sha256"]


def test_a_drained_node_holds_jobs_with_slurms_reason_in_the_api(
    http: requests.Session, own_gateway: Callable[..., str], dataset_url: str, bucket: str, tally: Tally, stack: dict[str, Any],
) -> None:
    node = stack["nodes"][0]["name"]
    # Only this node: a drained node keeps the job pending (it would otherwise run elsewhere).
    url = own_gateway(SLURM_EXTRA_DIRECTIVES=[f"--nodelist={node}"])
    run_command(["scontrol", "update", f"nodename={node}", "state=drain", "reason=rg-test maintenance"], timeout=30)
    try:
        job = post(http, url, job_request("drain", dataset_url, bucket, f"drain{secrets.token_hex(3)}"))

        def pending_with_reason() -> str | None:
            state = get(http, url, job["job_id"])["slurm"]["state"] or ""
            return state if state.startswith("PENDING (") and "None" not in state else None

        reason = wait_until(pending_with_reason, 60, "Slurm's pending reason in the API", interval=0.5)
        while_drained = get(http, url, job["job_id"])
        status_while_drained = while_drained["status"]
        wait = while_drained["wait"]  # why it waits, from the poller's one squeue; marked an estimate
    finally:
        run_command(["scontrol", "update", f"nodename={node}", "state=resume"], timeout=30)
    final = wait_for_all(http, url, [job["job_id"]], timeout=300)[job["job_id"]]
    tally.counts.update(submitted=1, succeeded=int(final["status"] == "succeeded"))
    tally.notes.append(f"while {node} was drained the API said {status_while_drained}, Slurm {reason}; after resume: {final['status']}")

    assert status_while_drained == "queued"
    assert wait["estimated"] is True and wait["pending_reason"] and wait["pending_reason"] in reason, (wait, reason)
    assert "ReqNodeNotAvail" in reason or "Resources" in reason or "Reserved" in reason, reason
    assert final["status"] == "succeeded", final


def test_the_topology_names_each_nodes_link(stack: dict[str, Any]) -> None:
    # The fault tests cut a node off by its host-side link: the name they use is the stack's.
    topology = Topology(tuple(Node(n["name"], n["address"], n["cpus"], n["memory_mb"], n["gpus"]) for n in stack["nodes"]), True, "")
    links = run_command(["ip", "-o", "link", "show", "master", "rgbr0"], timeout=30)
    assert all(f" {node.veth}@" in links for node in topology.nodes), links
