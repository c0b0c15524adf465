"""Drive the real local stack: `stack up` (twice), status, a Slurm job, S3 over HTTP, recovery.

The stack is shared with the other integration tests: these tests leave it UP and never run
`stack down`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.stack import stack_dir, stack_status
from gateway.stack.daemons import is_alive, read_pid_file

pytestmark = [
    pytest.mark.integration,
    pytest.mark.serial,  # kills and restarts the shared daemons
    pytest.mark.skipif(os.geteuid() != 0, reason="the local stack needs root"),
]

REPO = Path(__file__).resolve().parents[2]
ENTRY = "from gateway.stack.control import stack_group; stack_group()"


def stack_cli(*args: str, timeout: float = 1800.0) -> subprocess.CompletedProcess[str]:
    """Run `relion-gateway stack ...` in a fresh interpreter, as a user would."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def up() -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    result = stack_cli("up")
    elapsed = time.monotonic() - t0
    assert result.returncode == 0, result.stdout + result.stderr
    return result, elapsed


def daemon_lines(output: str) -> dict[str, str]:
    names = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "nanio")
    return {
        line.split()[0]: line for line in output.splitlines()
        if line.split() and (line.split()[0] in names or line.split()[0].startswith("slurmd-"))
    }


def slurmd_daemons(status: dict[str, Any]) -> list[str]:
    """One slurmd per node: "slurmd-<node>" on the multi-node stack, "slurmd" on one node."""
    return sorted(name for name in status["daemons"] if name == "slurmd" or name.startswith("slurmd-"))


@pytest.fixture(scope="module")
def running() -> dict[str, Any]:
    up()
    return stack_status()


def wait_for_sacct_state(job_id: str, want: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout.split()
        # After a wiped StateSaveLocation Slurm reuses job ids: the newest record is the last one.
        state = out[-1] if out else ""
        if state == want:
            return state
        time.sleep(0.5)
    return state


def submit_true() -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--output=/dev/null", "--wrap", "true"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    return out.strip().split(";")[0]


def s3_roundtrip(status: dict[str, Any]) -> None:
    import boto3
    from botocore.config import Config

    s3 = status["s3"]
    client = boto3.client(
        "s3",
        endpoint_url=s3["endpoint_url"],
        region_name=s3["region"],
        aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"],
        config=Config(signature_version="s3v4"),
    )
    key = f"tests/stack-{uuid.uuid4().hex}.txt"
    body = b"relion-gateway stack test\n" * 100
    client.put_object(Bucket=s3["bucket"], Key=key, Body=body)
    try:
        assert client.get_object(Bucket=s3["bucket"], Key=key)["Body"].read() == body
    finally:
        client.delete_object(Bucket=s3["bucket"], Key=key)


def kill_9_keep_pid_file(name: str) -> int:
    pid_file = stack_dir() / "run" / f"{name}.pid"
    pid = read_pid_file(pid_file)
    assert pid is not None and is_alive(pid), f"{name} is not running from our pid file"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid_file.exists()
    assert stack_status()["daemons"][name]["state"] == "stale pid file"
    return pid


def test_second_up_is_a_no_op(running: dict[str, Any]) -> None:
    # How fast it is belongs in a benchmark, not here (a loaded CI machine took 3.6 s once).
    result, _elapsed = up()
    lines = daemon_lines(result.stdout)
    assert len(lines) == 5 + len(slurmd_daemons(running)), result.stdout
    for name, line in lines.items():
        assert "already up" in line or "external" in line, line
    assert "started" not in result.stdout


def test_status_json_all_up(running: dict[str, Any]) -> None:
    result = stack_cli("status", "--json", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["all_up"] is True
    assert {"munged", "mariadbd", "slurmdbd", "slurmctld", "nanio"} <= set(status["daemons"])
    assert len(slurmd_daemons(status)) == len(status["nodes"]) >= 1
    for name, info in status["daemons"].items():
        assert info["state"] in ("up", "external"), (name, info)
        assert isinstance(info["pid"], int)
    env = status["environment"]
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["GATEWAY_S3_ENDPOINT_URL"] == "http://rghead:9010"
    assert env["AWS_ACCESS_KEY_ID"] == status["s3"]["access_key"]
    assert env["GATEWAY_PATHS_STATE_DIR"] == str(stack_dir().parent)
    assert status["slurm_conf"] == "/etc/slurm/slurm.conf"
    human = stack_cli("status", timeout=60)
    assert human.returncode == 0
    assert f"export AWS_SECRET_ACCESS_KEY={status['s3']['secret_key']}" in human.stdout


def test_sbatch_job_completes_in_accounting(running: dict[str, Any]) -> None:
    job_id = submit_true()
    assert wait_for_sacct_state(job_id, "COMPLETED") == "COMPLETED"


def test_memory_is_a_consumable_resource(running: dict[str, Any]) -> None:
    # CR_CPU_Memory: --mem-per-cpu requests are accepted and accounted; more than the node has is refused.
    out = subprocess.run(
        ["sbatch", "--parsable", "--output=/dev/null", "-n", "2", "--mem-per-cpu=1500", "--wrap", "true"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    assert wait_for_sacct_state(out, "COMPLETED") == "COMPLETED"
    tres = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", out, "-o", "AllocTRES"], capture_output=True, text=True, timeout=30,
    ).stdout.split()[-1]
    assert "mem=3000M" in tres
    refused = subprocess.run(["sbatch", "--output=/dev/null", "--mem=64000", "--wrap", "true"], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0


def test_s3_put_get_over_http(running: dict[str, Any]) -> None:
    s3_roundtrip(running)


def test_up_recovers_killed_slurmd(running: dict[str, Any]) -> None:
    slurmd = slurmd_daemons(running)[0]
    old = kill_9_keep_pid_file(slurmd)
    result, _ = up()
    assert "started" in daemon_lines(result.stdout)[slurmd]
    status = stack_status()
    assert status["all_up"] is True
    assert status["daemons"][slurmd]["pid"] != old
    assert wait_for_sacct_state(submit_true(), "COMPLETED") == "COMPLETED"


def test_up_recovers_killed_nanio(running: dict[str, Any]) -> None:
    kill_9_keep_pid_file("nanio")
    result, _ = up()
    assert "started" in daemon_lines(result.stdout)["nanio"]
    status = stack_status()
    assert status["all_up"] is True
    s3_roundtrip(status)


def test_up_recovers_killed_mariadbd(running: dict[str, Any]) -> None:
    # MariaDB's own pid file and socket in /run/mysqld are left behind too.
    kill_9_keep_pid_file("mariadbd")
    result, _ = up()
    assert "started" in daemon_lines(result.stdout)["mariadbd"]
    assert stack_status()["all_up"] is True
    # slurmdbd reconnects to the new server: accounting still works end to end.
    assert wait_for_sacct_state(submit_true(), "COMPLETED") == "COMPLETED"


multinode = pytest.mark.skipif(not stack_status().get("multinode"), reason="the stack runs the one-node layout")


@multinode
def test_nodes_are_apart_with_their_own_names_and_addresses(running: dict[str, Any]) -> None:
    nodes = running["nodes"]
    assert len(nodes) >= 2 and all(node["state"] in ("idle", "mix", "alloc") for node in nodes), nodes
    # One job over two nodes: each step task reports its node's own hostname and address, and a
    # node reaches the head's services by name (S3 answers), never at loopback.
    out = subprocess.run(
        ["srun", "-N2", "-n2", "--mpi=pmix", "bash", "-c",
         "echo $(hostname) $(hostname -I) $(curl -s -o /dev/null -w %{http_code} http://rghead:9010/)"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split("\n")
    seen = sorted(tuple(line.split()) for line in out if line.strip())
    assert seen == sorted((node["name"], node["address"], "403") for node in nodes[:2])


def _half_made_node(node: dict[str, Any]) -> None:
    """What a killed `up` or a crashed node leaves: no slurmd, no namespace, a dangling link."""
    name = node["name"]
    kill_9_keep_pid_file(f"slurmd-{name}")
    subprocess.run(["ip", "netns", "del", name], check=True, timeout=30)


@multinode
def test_up_rebuilds_a_node_whose_namespace_is_gone(running: dict[str, Any]) -> None:
    node = running["nodes"][-1]
    _half_made_node(node)
    result, _ = up()
    assert f"created network namespace {node['name']}" in result.stdout, result.stdout
    status = stack_status()
    assert status["all_up"] is True
    job = subprocess.run(
        ["sbatch", "--parsable", "--output=/dev/null", "-w", node["name"], "--wrap", "true"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    # A rebuilt node re-registers with slurmctld before it takes the job: on a loaded machine that
    # took more than a minute once (CI: PENDING after 60 s).
    assert wait_for_sacct_state(job, "COMPLETED", timeout=150) == "COMPLETED"


@multinode
def test_down_removes_what_up_made_outside_the_state_dir_and_up_brings_it_back(running: dict[str, Any]) -> None:
    # Last in this module: the other modules find the stack up again.
    names = [node["name"] for node in running["nodes"]]
    down = stack_cli("down", timeout=600)
    assert down.returncode == 0, down.stdout + down.stderr
    try:
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert not any(name in netns for name in names), netns
        assert subprocess.run(["ip", "link", "show", "rgbr0"], capture_output=True, timeout=30).returncode != 0
        hosts = Path("/etc/hosts").read_text()
        assert "rghead" not in hosts and "relion-gateway stack" not in hosts
        assert not os.path.ismount("/run/netns")
    finally:
        result, _ = up()
    assert stack_status()["all_up"] is True and [n["name"] for n in stack_status()["nodes"]] == names
