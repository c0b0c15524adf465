"""The API docs page renders in a real headless Chromium, from local assets, and lists the job endpoints."""
from __future__ import annotations

import shutil
import tempfile

import pytest

from gateway.process import run_command

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_docs_page_lists_the_job_endpoints(gateway_url: str) -> None:
    # Swagger UI renders after fetching the spec; on a busy machine one dump can come too early.
    for _ in range(3):
        dom = dump_dom(f"{gateway_url}/v1/relion/docs")
        if 'data-path="' in dom:
            break
    assert "swagger-ui" in dom
    # Paths are listed relative to the spec's server, which the page offers (and calls them under).
    for path in ("/jobs", "/jobs/{job_id}", "/render"):
        assert f'data-path="{path}"' in dom, f"{path} not listed on the docs page"
    assert 'value="/v1/relion"' in dom, "the server /v1/relion is not offered on the docs page"


def dump_dom(url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        return run_command(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                # Swagger UI fetches the spec and renders after load: give it virtual time.
                "--virtual-time-budget=30000",
                "--dump-dom",
                url,
            ],
            timeout=120,
        )
