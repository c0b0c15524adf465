"""The service's image run with podman against the local stack: what the container test and
bench/image.py start, and what a developer reads to see the settings a container needs.

The container uses the `rest` backend with tokens it signs itself (slurmrestd's JWT key mounted
read-only: no Slurm binary or munge in the image), the stack's S3 server, the stack's profile
(``config/``, mounted at /etc/relion-gateway) and host networking, so the jobs on the nodes reach
it at rghead:<port> as they reach a host gateway. A job needs what the host gateway's jobs need:
the workspace and log roots at the same path inside and outside (``mounts``), and ``[job] python``
an interpreter with this package on the nodes (the image's venv is not on them).
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from gateway.process import CommandError, run_command
from gateway.stack.image import IMAGE_GID, IMAGE_UID, ULIMITS, podman
from gateway.stack.nodes import HEAD_NAME

KEY_IN_CONTAINER = "/run/secrets/slurm-jwt.key"
CONFIG_IN_CONTAINER = "/etc/relion-gateway"
STATE_IN_CONTAINER = "/var/lib/relion-gateway"
NAME_PREFIX = "rg-ctest-"


def pod(*args: str, timeout: float = 120, merge_stderr: bool = False) -> str:
    return run_command(podman(*args), timeout=timeout, merge_stderr=merge_stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ContainerGateway:
    """One running container: its name and the URL this host reaches it at."""

    name: str
    url: str

    def exec(self, *argv: str, timeout: float = 120) -> str:
        return pod("exec", self.name, *argv, timeout=timeout)

    def logs(self, tail: int = 40) -> str:
        """The container's output (gunicorn and the gateway log to stderr)."""
        return pod("logs", "--tail", str(tail), self.name, merge_stderr=True)

    def wait_healthy(self, timeout: float = 90) -> float:
        """Seconds until /healthz answered 200; AssertionError with the container's log after ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not healthy after {timeout:.0f} s:\n{self.logs()}")

    def create_token(self, user: str) -> str:
        """A token made in the container's own store (`relion-gateway token create` prints it last)."""
        return self.exec("relion-gateway", "token", "create", "--user", user).strip().splitlines()[-1]

    def remove(self) -> None:
        try:
            pod("rm", "-f", "-t", "5", self.name, timeout=60)
        except CommandError:
            pass  # already gone


def run_on_stack(image: str, stack: Mapping[str, Any], work: Path, config_dir: Path, *, state: str,
                 user: tuple[int, int] | None = None, extra_env: Mapping[str, str] | None = None,
                 mounts: Sequence[str] = ()) -> ContainerGateway:
    """``podman run -d`` the image with the stack's settings (``stack`` is `stack status`'s record).

    ``state`` is a volume name or a host directory for /var/lib/relion-gateway; ``user`` runs the
    container as another uid:gid than the image's (the key copy in ``work`` is made theirs).
    """
    port = free_port()
    name = f"{NAME_PREFIX}{secrets.token_hex(4)}"
    key = work / "slurm-jwt.key"
    shutil.copyfile(stack["slurmrestd"]["jwt_key"], key)  # root may read the stack's 0600 key
    uid, gid = user or (IMAGE_UID, IMAGE_GID)
    os.chown(key, uid, gid)
    key.chmod(0o400)
    env = {
        "GATEWAY_CONFIG": f"{CONFIG_IN_CONTAINER}/local.toml",  # the stack's profile, mounted below
        "GATEWAY_SLURM_BACKEND": "rest",
        "GATEWAY_SLURM_REST_URL": stack["slurmrestd"]["url"],
        "GATEWAY_SLURM_REST_JWT_KEY_FILE": KEY_IN_CONTAINER,
        "GATEWAY_SERVER_PORT": str(port),
        "GATEWAY_SERVER_PUBLIC_URL": f"http://{HEAD_NAME}:{port}",
        "GATEWAY_SERVER_WORKERS": "1",
        "GATEWAY_JOB_RUN_AS": "",  # no host accounts in the image: jobs run as the token's user
        "GATEWAY_JOB_CACHE_DIR": "",
        **{k: v for k, v in stack["environment"].items() if k.startswith("AWS_") or k == "GATEWAY_S3_ENDPOINT_URL"},
        **(extra_env or {}),
    }
    argv = ["run", "-d", "--name", name, "--network=host", *ULIMITS,
            "-v", f"{config_dir}:{CONFIG_IN_CONTAINER}:ro",
            "-v", f"{key}:{KEY_IN_CONTAINER}:ro",
            "-v", f"{state}:{STATE_IN_CONTAINER}"]
    for mount in mounts:
        argv += ["-v", mount]
    if user:
        argv += ["--user", f"{uid}:{gid}"]
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    pod(*argv, image)
    return ContainerGateway(name, f"http://127.0.0.1:{port}")


@dataclass(frozen=True)
class JobDirs:
    """Host directories a container's jobs share with the nodes, owned by the job account."""

    root: Path
    state: Path
    workspaces: Path
    logs: Path

    @property
    def mounts(self) -> list[str]:
        # The same path inside and outside: the scripts the container renders name them.
        return [f"{self.workspaces}:{self.workspaces}", f"{self.logs}:{self.logs}"]

    def env(self, rest_user: str, job_python: str) -> dict[str, str]:
        return {"GATEWAY_SLURM_REST_USER": rest_user, "GATEWAY_JOB_PYTHON": job_python,
                "GATEWAY_PATHS_WORKSPACE_ROOT": str(self.workspaces), "GATEWAY_PATHS_LOG_ROOT": str(self.logs)}


def job_dirs(owner: tuple[int, int]) -> JobDirs:
    """Make them under /var/tmp (the nodes see it; pytest's tmp is 0700), owned by ``owner``."""
    root = Path("/var/tmp") / f"relion-gateway-ctest-{secrets.token_hex(4)}"
    dirs = JobDirs(root, root / "state", root / "workspaces", root / "logs")
    for path in (dirs.state, dirs.workspaces, dirs.logs):
        path.mkdir(parents=True)
        os.chown(path, *owner)
    os.chown(root, *owner)
    return dirs
