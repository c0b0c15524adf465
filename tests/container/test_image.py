"""The container image run with podman on the local stack (issue 18).

Needs the image of this commit (`make image`, i.e. `relion-gateway image build`; or the image named
by RELION_GATEWAY_TEST_IMAGE) and the local stack
with slurmrestd (`relion-gateway stack up --with-rest`); skipped with the reason otherwise. The
stack is read, never started or stopped here.

The container is started as gateway/stack/container.py says (the `rest` backend with tokens it
signs itself, the stack's S3 server, host networking).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import requests

from gateway import __version__
from gateway.process import CommandError, run_command
from gateway.client import retrying_session
from gateway.stack.container import NAME_PREFIX, ContainerGateway, job_dirs, pod, run_on_stack
from gateway.stack.image import IMAGE_UID, image_tag

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"  # the stack's profile (local.toml), mounted read-only


def unavailable(reason: str) -> NoReturn:
    """Skip, saying why; fail instead where the run promised the image (`make test` builds it first
    and sets RELION_GATEWAY_TEST_IMAGE_REQUIRED, so a missing image is not a silent pass there)."""
    if os.environ.get("RELION_GATEWAY_TEST_IMAGE_REQUIRED"):
        pytest.fail(f"RELION_GATEWAY_TEST_IMAGE_REQUIRED is set but {reason}")
    pytest.skip(reason)


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


@pytest.fixture(scope="module")
def gateway(image_ref: str, stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerGateway]:
    work = tmp_path_factory.mktemp("container")
    volume = f"{NAME_PREFIX}state-{secrets.token_hex(4)}"
    pod("volume", "create", volume)
    ctr = run_on_stack(image_ref, stack, work, CONFIG, state=volume)
    try:
        ctr.wait_healthy()
        yield ctr
    finally:
        ctr.remove()
        pod("volume", "rm", "-f", volume)


def test_healthz_and_readyz(gateway: ContainerGateway) -> None:
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


def test_the_service_runs_as_the_image_user_not_root(gateway: ContainerGateway) -> None:
    assert gateway.exec("id", "-u").strip() == str(IMAGE_UID)
    users = pod("top", gateway.name, "user", "huser", "comm").splitlines()[1:]
    assert users and all(line.split()[0] != "root" and line.split()[1] != "root" for line in users), users
    assert any("gunicorn" in line or "relion-gateway" in line for line in users), users


def test_image_metadata_user_healthcheck_labels(image_ref: str, gateway: ContainerGateway) -> None:
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


def test_no_build_tool_test_dependency_or_secret_in_the_image(gateway: ContainerGateway) -> None:
    found = gateway.exec("sh", "-c", "for t in gcc cc make pip pip3 curl git scontrol sbatch munge; do "
                         "command -v $t; done; ls /opt/relion-gateway/venv/lib/python3.11/site-packages; true")
    assert "/" not in "".join(line for line in found.splitlines() if line.startswith("/")), found
    for package in ("pytest", "moto", "schemathesis", "mypy", "pip", "setuptools"):
        assert f"\n{package}\n" not in f"\n{found}\n", package
    # The only key is the mounted one; nothing under the venv or /etc names one.
    assert gateway.exec("sh", "-c", "ls /run/secrets").split() == ["slurm-jwt.key"]


def test_a_token_made_inside_works_and_the_store_survives_a_restart(gateway: ContainerGateway) -> None:
    token = gateway.create_token("alice")
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{gateway.url}/v1/relion/jobs", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{gateway.url}/v1/relion/jobs", timeout=30).status_code == 401
    pod("restart", "-t", "10", gateway.name)
    gateway.wait_healthy()
    assert requests.get(f"{gateway.url}/v1/relion/jobs", headers=headers, timeout=30).status_code == 200


def test_demo_2d_job_through_the_container(image_ref: str, stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                                          monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The demo's 2D classification submitted to the container's gateway, to succeeded with its output
    in S3 and its usage recorded (from slurmdbd through slurmrestd: no sacct in the image).

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
    shared = job_dirs(owner)
    request.addfinalizer(lambda: shutil.rmtree(shared.root, ignore_errors=True))
    for key, value in stack["environment"].items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)  # this process uploads the dataset and checks the output
    storage = S3Storage(make_s3_client(stack["s3"]["endpoint_url"], stack["s3"]["region"]))
    bucket = stack["s3"]["bucket"]
    dataset = S3Location(bucket, "datasets/tiny-container.tar.gz")
    storage.upload_file(str(make_dataset(work / "tiny")), dataset)
    ctr = run_on_stack(image_ref, stack, work, CONFIG, user=owner, state=str(shared.state),
                       extra_env=shared.env("rgjob", sys.executable), mounts=shared.mounts)
    try:
        ctr.wait_healthy()
        session = retrying_session()
        session.headers["Authorization"] = f"Bearer {ctr.create_token('demo')}"
        started = time.monotonic()
        job = submit_and_follow(session, ctr.url, bucket, dataset, 3, 600)
        elapsed = time.monotonic() - started
        print(f"demo 2D job through the container: {job['status']} in {elapsed:.0f} s")
        if job["status"] != "succeeded":
            errs = {p.name: p.read_text()[-1500:] for p in shared.logs.rglob("*.err")}
            pytest.fail(f"{job['status']}: {job['message']}\n{errs}\n{ctr.logs(30)}")
        output = parse_s3_url(job["output_url"])
        storage.head(output.child("metadata.json"))
        assert (job["metadata"] or {}).get("output", {}).get("bytes", 0) > 0
        # What it cost, from slurmdbd through slurmrestd: the image has no sacct.
        deadline = time.monotonic() + 90
        while not (usage := (session.get(f"{ctr.url}/v1/relion/jobs/{job['job_id']}", timeout=30).json()["metadata"] or {}).get("usage")):
            assert time.monotonic() < deadline, f"no usage recorded:\n{ctr.logs(30)}"
            time.sleep(2)
        assert usage["cpu_hours"] > 0 and usage["cpu_hours_used"] > 0 and usage["peak_task_rss_bytes"] > 0, usage
        assert len(usage["slurm_jobs"]) == 2, usage  # the main job and its archive hook
    finally:
        ctr.remove()
