"""Integration fixtures: the real local stack (Slurm, RELION, S3 server) and a served gateway.

`relion-gateway stack up` is idempotent, so the session fixture simply calls it; it never takes
the stack down (other sessions and developers share it).

Authentication is on, as in production: the session creates an admin token in the gateway's store
and the tests' requests carry it (the `http` session). A test that serves a gateway on another
store lets the same token in with `allow_admin(app, admin_token)`.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from gateway import create_app
from gateway.auth import create_token
from gateway.config import build_config
from gateway.storage.s3 import S3Location, S3Storage, make_s3_client
from gateway.database import JobStore, TokenRecord, make_engine
from gateway.stack.nodes import HEAD_NAME  # jobs reach the services at the head, never at loopback

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "submit_failed", "archive_failed", "lost"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> dict[str, Any]:
    from gateway.stack import stack_up

    status = stack_up()
    assert status["all_up"], status
    # The gateway under test hands its environment to sbatch, and so to the jobs: S3 credentials
    # travel that way, never in a script.
    os.environ.update({k: v for k, v in status["environment"].items() if not k.startswith("GATEWAY_")})
    return status


@pytest.fixture(scope="session")
def storage(stack: dict[str, Any]) -> S3Storage:
    return S3Storage(make_s3_client(stack["s3"]["endpoint_url"], stack["s3"]["region"]))


@pytest.fixture(scope="session")
def bucket(stack: dict[str, Any]) -> str:
    return str(stack["s3"]["bucket"])


@pytest.fixture(scope="session")
def dataset_url(tmp_path_factory: pytest.TempPathFactory, storage: S3Storage, bucket: str) -> str:
    from gateway.relion.dataset import make_dataset

    tarball = make_dataset(tmp_path_factory.mktemp("data") / "tiny")
    location = S3Location(bucket, f"datasets/test-{secrets.token_hex(4)}.tar.gz")
    storage.upload_file(str(tarball), location)
    return location.url


@pytest.fixture(scope="session")
def gateway_config(tmp_path_factory: pytest.TempPathFactory, stack: dict[str, Any]) -> dict[str, Any]:
    state = tmp_path_factory.mktemp("gateway-state")
    state.chmod(0o711)  # jobs (another account) reach their workspaces and logs below it
    config = build_config(environ={"GATEWAY_CONFIG": str(ROOT / "config" / "local.toml")})
    config.update(
        {
            "PATHS_STATE_DIR": str(state),
            "PATHS_WORKSPACE_ROOT": str(state / "workspaces"),
            "PATHS_LOG_ROOT": str(state / "logs"),
            "JOB_CACHE_DIR": str(state / "cache"),  # beside the workspaces: its files are hard-linked there
            "STORE_DATABASE_URL": f"sqlite:///{state / 'gateway.sqlite'}",
            "S3_ENDPOINT_URL": stack["s3"]["endpoint_url"],
            "POLLER_INTERVAL_ACTIVE": 1.0,
            "POLLER_INTERVAL_QUEUED": 1.0,
            "POLLER_INTERVAL_IDLE": 2.0,
            "JOB_STAGE_IN_QUOTA_BYTES": 32 * 1024 * 1024,
            "SERVER_PUBLIC_URL": "",
            "WEBHOOKS_ALLOW_NETWORKS": ["127.0.0.1/32"],  # the tests' webhook receivers listen on loopback
        }
    )
    return config


@pytest.fixture(scope="session")
def admin_token(gateway_config: dict[str, Any]) -> tuple[TokenRecord, str]:
    """An admin token in the session gateway's store, as `relion-gateway token create --admin` makes."""
    store = JobStore(make_engine(gateway_config["STORE_DATABASE_URL"]))
    return create_token(store, "itest-admin", admin=True, n=int(gateway_config["AUTH_SCRYPT_N"]))


@pytest.fixture(scope="session")
def http(admin_token: tuple[TokenRecord, str]) -> requests.Session:
    """Requests to the gateway under test, with the admin bearer token."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {admin_token[1]}"
    return session


def allow_admin(app: Any, admin_token: tuple[TokenRecord, str]) -> None:
    """Let the session's admin token into a gateway with a store of its own."""
    store = app.extensions["relion_gateway"].store
    if store.get_token(admin_token[0].id) is None:
        store.insert_token(admin_token[0])


@pytest.fixture(scope="session")
def gateway_url(gateway_config: dict[str, Any]) -> Iterator[str]:
    port = free_port()
    url = f"http://{HEAD_NAME}:{port}"
    # Jobs send their signed events to this URL.
    gateway_config["SERVER_PUBLIC_URL"] = url
    app = create_app(gateway_config)
    server = make_server(HEAD_NAME, port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield url
    app.extensions["relion_gateway_poller"].stop()
    server.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HEAD_NAME, 0))
        return int(probe.getsockname()[1])


def wait_for_end(http: requests.Session, url: str, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = http.get(f"{url}/v1/relion/jobs/{job_id}", timeout=30).json()
        if job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job['status']} after {timeout} s"
        time.sleep(1.0)
