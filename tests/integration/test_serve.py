"""`relion-gateway serve` under gunicorn: two workers, one poller lease between them, JSON logs, metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from gateway.auth import create_token
from gateway.database import JobStore, leases_table, make_engine
from gateway.stack.nodes import HEAD_NAME  # jobs reach the services at the head, never at loopback
from tests.integration.conftest import ROOT, free_port


def test_gunicorn_serves_with_one_poller(tmp_path: Path, stack: dict[str, Any]) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(stack["environment"])
    env.update({"GATEWAY_CONFIG": str(ROOT / "config" / "local.toml"), "GATEWAY_PATHS_STATE_DIR": str(tmp_path)})
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite'}"))
    token = create_token(store, "ops", admin=True)[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port), "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://{HEAD_NAME}:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        assert requests.get(f"{url}/readyz", timeout=30).json()["ready"] is True
        metrics = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert metrics.status_code == 200 and "relion_gateway_slurm_command_seconds" in metrics.text
        time.sleep(3)  # both workers have started their poller threads by now
        with store.engine.connect() as conn:
            holders = conn.execute(sa.select(leases_table.c.holder).where(leases_table.c.name == "poller")).scalars().all()
        assert len(holders) == 1  # one poller for the deployment, not one per worker
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    lines = [line for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
    assert lines and all("level" in json.loads(line) for line in lines)  # JSON logs
