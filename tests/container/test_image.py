"""The container image run with podman on the local stack (issue 18).

Needs the image of this commit (`make image`, i.e. `relion-gateway image build`; or the image named
by RELION_GATEWAY_TEST_IMAGE) and the local stack
with slurmrestd (`relion-gateway stack up --with-rest`); skipped with the reason otherwise. The
stack is read, never started or stopped here.

The gateway in the container uses the `rest` backend with tokens it signs itself (slurmrestd's JWT
key mounted read-only: no Slurm binary or munge in the image), the stack's S3 server, and host
networking, so jobs on the nodes reach it at rghead:<port> as they reach a host gateway.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import requests

from gateway import __version__
from gateway.process import CommandError, run_command
from gateway.stack.image import ULIMITS, image_tag, podman

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
IMAGE_UID = 10001  # the Containerfile's default UID/GID build arguments
KEY_IN_CONTAINER = "/run/secrets/slurm-jwt.key"
TERMINAL = {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "submit_failed",
            "archive_failed", "lost"}


def pod(*args: str, timeout: float = 120, merge_stderr: bool = False) -> str:
    return run_command(podman(*args), timeout=timeout, merge_stderr=merge_stderr)


def logs(name: str, tail: int = 40) -> str:
    """The container's output (gunicorn and the gateway log to stderr)."""
    return pod("logs", "--tail", str(tail), name, merge_stderr=True)


def unavailable(reason: str) -> NoReturn:
    """Skip, saying why; fail instead where the run promised the image (`make test` builds it first
    and sets RELION_GATEWAY_TEST_IMAGE_REQUIRED, so a missing image is not a silent pass there)."""
    if os.environ.get("RELION_GATEWAY_TEST_IMAGE_REQUIRED"):
        pytest.fail(f"RELION_GATEWAY_TEST_IMAGE_REQUIRED is set but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def image_ref() -> str:
    if shutil.which("podman") is None:
        unavailable("podman is not installed (`make image` installs it and builds the image)")
    # Another image (one built from an earlier commit, a site's) by name: RELION_GATEWAY_TEST_IMAGE.
    ref = os.environ.get("RELION_GATEWAY_TEST_IMAGE") or image_tag(
        __version__, run_command(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], timeout=30).strip())
    try:
        pod("image", "exists", ref, timeout=30)
    except CommandError:
        unavailable(f"the image {ref} is not built: run `make image` (or name one in RELION_GATEWAY_TEST_IMAGE)")
    return ref


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    from gateway.stack import stack_status

    status = stack_status()
    rest = status.get("slurmrestd") or {}
    if not status.get("all_up") or not rest.get("jwt_key"):
        unavailable("the local stack with slurmrestd is not up (`relion-gateway stack up --with-rest`)")
    return status


@dataclass
class Gateway:
    name: str
    url: str
    work: Path

    def exec(self, *argv: str, timeout: float = 120) -> str:
        return pod("exec", self.name, *argv, timeout=timeout)

    def wait_healthy(self, timeout: float = 90) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not healthy after {timeout:.0f} s:\n{logs(self.name)}")


def run_gateway(image: str, stack: dict[str, Any], work: Path, *, user: tuple[int, int] | None = None,
                state: str, extra_env: dict[str, str] | None = None, mounts: list[str] | None = None) -> Gateway:
    """podman run -d the image with the stack's settings; ``state`` is a volume name or a host dir."""
    port = free_port()
    name = f"rg-ctest-{secrets.token_hex(4)}"
    key = work / "slurm-jwt.key"
    shutil.copyfile(stack["slurmrestd"]["jwt_key"], key)  # root may read the stack's 0600 key
    uid, gid = user or (IMAGE_UID, IMAGE_UID)
    os.chown(key, uid, gid)
    key.chmod(0o400)
    env = {
        "GATEWAY_CONFIG": "/etc/relion-gateway/local.toml",  # the stack's profile, mounted below
        "GATEWAY_SLURM_BACKEND": "rest",
        "GATEWAY_SLURM_REST_URL": stack["slurmrestd"]["url"],
        "GATEWAY_SLURM_REST_JWT_KEY_FILE": KEY_IN_CONTAINER,
        "GATEWAY_SERVER_PORT": str(port),
        "GATEWAY_SERVER_PUBLIC_URL": f"http://rghead:{port}",
        "GATEWAY_SERVER_WORKERS": "1",
        "GATEWAY_JOB_RUN_AS": "",  # no host accounts in the image: jobs run as the token's user
        "GATEWAY_JOB_CACHE_DIR": "",
        **{k: v for k, v in stack["environment"].items() if k.startswith("AWS_") or k == "GATEWAY_S3_ENDPOINT_URL"},
        **(extra_env or {}),
    }
    argv = ["run", "-d", "--name", name, "--network=host", *ULIMITS,
            "-v", f"{ROOT / 'config'}:/etc/relion-gateway:ro",
            "-v", f"{key}:{KEY_IN_CONTAINER}:ro",
            "-v", f"{state}:/var/lib/relion-gateway"]
    for mount in mounts or []:
        argv += ["-v", mount]
    if user:
        argv += ["--user", f"{uid}:{gid}"]
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    pod(*argv, image)
    return Gateway(name, f"http://127.0.0.1:{port}", work)


def remove(name: str) -> None:
    try:
        pod("rm", "-f", "-t", "5", name, timeout=60)
    except CommandError:
        pass


@pytest.fixture(scope="module")
def gateway(image_ref: str, stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("container")
    volume = f"rg-ctest-state-{secrets.token_hex(4)}"
    pod("volume", "create", volume)
    ctr = run_gateway(image_ref, stack, work, state=volume)
    try:
        ctr.wait_healthy()
        yield ctr
    finally:
        remove(ctr.name)
        pod("volume", "rm", "-f", volume)


def test_healthz_and_readyz(gateway: Gateway) -> None:
    health = requests.get(f"{gateway.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["version"] == __version__
    deadline = time.monotonic() + 30
    while True:
        ready = requests.get(f"{gateway.url}/readyz", timeout=30)
        if ready.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(2)
    # store, Slurm (slurmrestd, with a token the container signed itself) and S3 all answer
    assert ready.status_code == 200, ready.text
    assert all(check["ok"] for check in ready.json()["checks"].values())


def test_the_service_runs_as_the_image_user_not_root(gateway: Gateway) -> None:
    assert gateway.exec("id", "-u").strip() == str(IMAGE_UID)
    users = pod("top", gateway.name, "user", "huser", "comm").splitlines()[1:]
    assert users and all(line.split()[0] != "root" and line.split()[1] != "root" for line in users), users
    assert any("gunicorn" in line or "relion-gateway" in line for line in users), users


def test_image_metadata_user_healthcheck_labels(image_ref: str, gateway: Gateway) -> None:
    (info,) = json.loads(pod("image", "inspect", image_ref))
    config = info["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert "/healthz" in " ".join(info.get("Healthcheck", config.get("Healthcheck", {})).get("Test", []))
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "BSD-3-Clause"
    for key in ("title", "description", "source", "revision"):
        assert labels[f"org.opencontainers.image.{key}"]
    assert config["ExposedPorts"] == {"9012/tcp": {}}
    assert set(config["Volumes"]) == {"/etc/relion-gateway", "/var/lib/relion-gateway"}
    pod("healthcheck", "run", gateway.name)  # the image's HEALTHCHECK passes (exit 0)


def test_no_build_tool_test_dependency_or_secret_in_the_image(gateway: Gateway) -> None:
    found = gateway.exec("sh", "-c", "for t in gcc cc make pip pip3 curl git scontrol sbatch munge; do "
                         "command -v $t; done; ls /opt/relion-gateway/venv/lib/python3.11/site-packages; true")
    assert "/" not in "".join(line for line in found.splitlines() if line.startswith("/")), found
    for package in ("pytest", "moto", "schemathesis", "mypy", "pip", "setuptools"):
        assert f"\n{package}\n" not in f"\n{found}\n", package
    # The only key is the mounted one; nothing under the venv or /etc names one.
    assert gateway.exec("sh", "-c", "ls /run/secrets").split() == ["slurm-jwt.key"]


def test_a_token_made_inside_works_and_the_store_survives_a_restart(gateway: Gateway) -> None:
    token = gateway.exec("relion-gateway", "token", "create", "--user", "alice").strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{gateway.url}/v1/relion/jobs", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{gateway.url}/v1/relion/jobs", timeout=30).status_code == 401
    pod("restart", "-t", "10", gateway.name)
    gateway.wait_healthy()
    assert requests.get(f"{gateway.url}/v1/relion/jobs", headers=headers, timeout=30).status_code == 200


def test_demo_2d_job_through_the_container(image_ref: str, stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                                          monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The demo's 2D classification submitted to the container's gateway, to succeeded with its output in S3.

    Jobs need what the host gateway's jobs need: the gateway package on the nodes ([job] python is
    this checkout's interpreter, which the nodes share) and the workspace and log roots at the same
    path inside and outside the container. The container runs as the stack's job account (rgjob),
    whose token submits the jobs, so both sides own the job directories. The job-side code (stage-in,
    archive) is the nodes' package, not the image's: the two must be the same version.
    """
    import pwd

    from gateway.demo import submit_and_follow
    from gateway.relion.dataset import make_dataset
    from gateway.storage.s3 import S3Location, S3Storage, make_s3_client, parse_s3_url

    try:
        account = pwd.getpwnam("rgjob")
    except KeyError:
        unavailable("no rgjob account (the stack's job account)")
    owner = (account.pw_uid, account.pw_gid)
    work = tmp_path_factory.mktemp("container-demo")
    shared = Path("/var/tmp") / f"relion-gateway-ctest-{secrets.token_hex(4)}"  # nodes see /var/tmp; pytest's tmp is 0700
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    for sub in ("state", "workspaces", "logs"):
        (shared / sub).mkdir(parents=True)
        os.chown(shared / sub, *owner)
    os.chown(shared, *owner)
    for key, value in stack["environment"].items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)  # this process uploads the dataset and checks the output
    storage = S3Storage(make_s3_client(stack["s3"]["endpoint_url"], stack["s3"]["region"]))
    bucket = stack["s3"]["bucket"]
    dataset = S3Location(bucket, "datasets/tiny-container.tar.gz")
    storage.upload_file(str(make_dataset(work / "tiny")), dataset)
    ctr = run_gateway(
        image_ref, stack, work, user=owner, state=str(shared / "state"),
        extra_env={"GATEWAY_SLURM_REST_USER": "rgjob", "GATEWAY_JOB_PYTHON": sys.executable,
                   "GATEWAY_PATHS_WORKSPACE_ROOT": str(shared / "workspaces"), "GATEWAY_PATHS_LOG_ROOT": str(shared / "logs")},
        mounts=[f"{shared / 'workspaces'}:{shared / 'workspaces'}", f"{shared / 'logs'}:{shared / 'logs'}"],
    )
    try:
        ctr.wait_healthy()
        token = ctr.exec("relion-gateway", "token", "create", "--user", "demo").strip().splitlines()[-1]
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        started = time.monotonic()
        job = submit_and_follow(session, ctr.url, bucket, dataset, 3, 600)
        elapsed = time.monotonic() - started
        print(f"demo 2D job through the container: {job['status']} in {elapsed:.0f} s")
        if job["status"] != "succeeded":
            errs = {p.name: p.read_text()[-1500:] for p in (shared / "logs").rglob("*.err")}
            pytest.fail(f"{job['status']}: {job['message']}\n{errs}\n{logs(ctr.name, 30)}")
        output = parse_s3_url(job["output_url"])
        storage.head(output.child("metadata.json"))
        assert (job["metadata"] or {}).get("output", {}).get("bytes", 0) > 0
    finally:
        remove(ctr.name)
