"""The local S3 server: nanio in its own venv (see notes/s3.md section 1 for why nanio).

nanio lives in ``<stack>/nanio-venv`` and not in the gateway's environment: its starlette/uvicorn
pins must not clash with the gateway's dependencies.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from gateway.process import run_command
from gateway.stack.nodes import HEAD_NAME

S3Client = Any  # boto3 clients are built at run time; there are no stubs installed


log = logging.getLogger(__name__)

# 0.1.7 is the version measured in notes/s3.md; nanio is alpha, so do not float to a newer one.
NANIO_REQUIREMENT = "nanio==0.1.7"
S3_PORT = 9010
# Jobs on the nodes and the gateway both address S3 by the head's name (nodes.py): it resolves to
# the bridge address, where nanio listens, or to 127.0.0.1 in the one-node layout.
S3_ENDPOINT_URL = f"http://{HEAD_NAME}:{S3_PORT}"
S3_REGION = "us-east-1"
S3_BUCKET = "relion-local"

VENV_TIMEOUT_S = 300.0
PIP_TIMEOUT_S = 900.0


def nanio_binary(venv: Path) -> Path:
    return venv / "bin" / "nanio"


def ensure_nanio_venv(venv: Path) -> Path:
    """Create the venv and install nanio into it unless its nanio binary is already there."""
    binary = nanio_binary(venv)
    if binary.is_file():
        return binary
    python = venv / "bin" / "python"
    if not python.exists():
        log.info("creating the nanio venv %s", venv)
        # --clear: a half-created venv from an interrupted run is rebuilt rather than trusted.
        run_command([sys.executable, "-m", "venv", "--clear", str(venv)], timeout=VENV_TIMEOUT_S)
    log.info("installing %s into %s", NANIO_REQUIREMENT, venv)
    run_command(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", NANIO_REQUIREMENT],
        timeout=PIP_TIMEOUT_S,
    )
    if not binary.is_file():
        raise RuntimeError(f"pip installed {NANIO_REQUIREMENT} but {binary} is missing")
    return binary


def nanio_argv(venv: Path, data_dir: Path, host: str) -> list[str]:
    """nanio on ``host`` only (it binds 0.0.0.0 unless told otherwise): the head's address."""
    return [
        str(nanio_binary(venv)),
        "serve",
        "--data-dir",
        str(data_dir),
        "--host",
        host,
        "--port",
        str(S3_PORT),
        "--no-access-log",
    ]


def nanio_env(access_key: str, secret_key: str) -> dict[str, str]:
    # nanio refuses to start without credentials; env keeps them off the command line.
    return {"NANIO_ACCESS_KEY": access_key, "NANIO_SECRET_KEY": secret_key}


def s3_client(access_key: str, secret_key: str, *, timeout: float = 5.0, retries: int = 2) -> S3Client:
    """Return a boto3 S3 client for the local server (SigV4: nanio rejects SigV2 presigned URLs)."""
    import boto3  # imported here: `stack down` and the unit tests do not need it
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=S3_ENDPOINT_URL,
        region_name=S3_REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            signature_version="s3v4",
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": retries},
        ),
    )


def s3_ready(client: S3Client) -> bool:
    """Readiness: an authenticated list_buckets succeeds (proves the server and our keys)."""
    try:
        client.list_buckets()
        return True
    except Exception as exc:  # botocore raises many unrelated types while the port is closed
        log.debug("S3 not ready: %s", exc)
        return False


def ensure_bucket(client: S3Client, bucket: str = S3_BUCKET) -> bool:
    """Create the bucket if it does not exist; return True when it was created."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
    client.create_bucket(Bucket=bucket)
    log.info("created bucket %s", bucket)
    return True
