"""The job page (issue 15) in a real headless Chromium against the served gateway: a user opens a
finished 2D job and sees its state and its class montage, fetched with the bearer token; and
(issue 16) ticks classes and starts the next job on them.

The page reads the token from a ``#token=`` fragment (moved to sessionStorage and out of the
address bar), so one Chromium run logs in and opens the job. What the page showed is read from
the DOM dump: the page's script writes ``data-job-state``, ``data-ready`` and, per image,
``data-loaded`` and ``data-natural-width``; per class checkbox ``data-class`` and ``data-particles``;
on the next-job form ``data-next-request``, the JSON body its Submit button would send (a dump
cannot click, so the test sends that body itself). Screenshots go to the test's tmp directory.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.auth import create_token
from gateway.database import JobStore, make_engine
from gateway.process import run_command
from gateway.relion.presets import TINY_FLAGS
from tests.integration.conftest import wait_for_end

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
USER = "ipage"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs it)")


class PageFacts(HTMLParser):
    """The body's data attributes, the attributes of every <img>, <input>, <form> and <a>, and the
    text (to look for the token). A boolean attribute (checked, disabled) is there with value ""."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.images: list[dict[str, str]] = []
        self.inputs: list[dict[str, str]] = []
        self.forms: list[dict[str, str]] = []
        self.links: list[dict[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = values
        elif tag == "img":
            self.images.append(values)
        elif tag == "input":
            self.inputs.append(values)
        elif tag == "form":
            self.forms.append(values)
        elif tag == "a":
            self.links.append(values)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def chromium(url: str, *, screenshot: Path | None = None, budget_ms: int = 20000) -> str:
    """The DOM after ``budget_ms`` of virtual time (fetches finish within it), or a screenshot."""
    with tempfile.TemporaryDirectory() as profile:
        output = ["--dump-dom"] if screenshot is None else [f"--screenshot={screenshot}", "--window-size=1280,1600", "--hide-scrollbars"]
        return run_command(
            [
                str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *output, url,
            ],
            timeout=120,
        )


def facts(url: str) -> PageFacts:
    # One dump can come before the fetches end on a busy machine: look again until the page says it is done.
    for _ in range(3):
        page = PageFacts()
        page.feed(chromium(url))
        if page.body.get("data-ready") == "job" or page.body.get("data-job-state") == "not-found":
            break
    return page


@pytest.fixture(scope="module")
def user_tokens(gateway_config: dict[str, Any]) -> dict[str, str]:
    store = JobStore(make_engine(gateway_config["STORE_DATABASE_URL"]))
    n = int(gateway_config["AUTH_SCRYPT_N"])
    return {user: create_token(store, user, n=n)[1] for user in (USER, f"{USER}-other")}


@pytest.fixture(scope="module")
def finished_2d(http: requests.Session, gateway_url: str, dataset_url: str, bucket: str) -> dict[str, Any]:
    request = {
        "user_id": USER, "workspace_id": "page", "dataset_s3_url": dataset_url, "output_s3_prefix": f"s3://{bucket}/results/{USER}",  # the user's own ([s3] output_prefixes): its child may write there too
        "mode": "2d", "num_mpi": 3, "flags": {**TINY_FLAGS["2d"], "j": 1},
    }
    response = http.post(f"{gateway_url}/v1/relion/jobs", json=request, timeout=60)
    assert response.status_code == 202, response.text
    job = wait_for_end(http, gateway_url, response.json()["job_id"], timeout=600)
    assert job["status"] == "succeeded", job["message"]
    return job


def test_the_job_page_shows_a_finished_2d_jobs_montage_and_state(
    http: requests.Session, gateway_url: str, finished_2d: dict[str, Any], user_tokens: dict[str, str], tmp_path: Path
) -> None:
    job_id = finished_2d["job_id"]
    listing = http.get(f"{gateway_url}/v1/relion/jobs/{job_id}/previews", timeout=30).json()
    montages = [p for p in listing["previews"] if p["kind"] == "classes"]
    if not montages:
        pytest.skip(f"the finished 2D job {job_id} has no 'classes' preview: the job side (gateway/jobside/previews.py) "
                    f"wrote none, so there is nothing for the page to show (listing: {listing})")
    latest = max(montages, key=lambda p: p["iteration"])
    assert latest["iteration"] == listing["latest_iteration"]

    token = user_tokens[USER]
    page_url = f"{gateway_url}/v1/relion/ui/"
    page = facts(f"{page_url}#token={token}&job={job_id}")
    assert page.body.get("data-token-from") == "fragment", page.body
    assert page.body.get("data-job-state") == "succeeded", page.body
    assert page.body.get("data-ready") == "job", page.body
    shown = [img for img in page.images if img.get("data-name") == latest["name"]]
    assert len(shown) == 1, page.images
    montage = shown[0]
    assert montage["data-kind"] == "classes" and montage["data-loaded"] == "true", montage
    assert int(montage["data-natural-width"]) == latest["width"] > 0, montage
    assert montage["src"].startswith("blob:"), montage  # fetched with the token, not by <img> itself
    assert token not in "".join(page.text) and token not in str(page.images)

    # The job's row in the list, its state, and another user's view of the same link.
    assert any(job_id in t for t in page.text) and "succeeded" in page.text
    other = facts(f"{page_url}#token={user_tokens[USER + '-other']}&job={job_id}")
    assert other.body.get("data-job-state") == "not-found", other.body
    assert not any(img.get("data-loaded") == "true" for img in other.images)

    shots = {
        "job-page.png": f"{page_url}#token={token}&job={job_id}",
        "job-page-log.png": f"{page_url}#token={token}&job={job_id}&show=log-out",
        "job-list.png": f"{page_url}#token={token}",
        "job-page-login.png": page_url,
    }
    for name, url in shots.items():
        chromium(url, screenshot=tmp_path / name)
        assert (tmp_path / name).stat().st_size > 0
        print(f"screenshot: {tmp_path / name}")


def test_once_the_log_dir_copy_is_gone_the_page_shows_the_archived_previews_from_s3(
    http: requests.Session, gateway_url: str, gateway_config: dict[str, Any], finished_2d: dict[str, Any], user_tokens: dict[str, str]
) -> None:
    job_id = finished_2d["job_id"]
    archived = [p for p in (finished_2d["metadata"] or {}).get("previews", []) if p["kind"] == "classes"]
    if not archived:
        pytest.skip(f"metadata.json of {job_id} lists no 'classes' preview: the archive hook has not archived previews yet")
    previews = Path(gateway_config["PATHS_LOG_ROOT"]) / USER / job_id / "previews"
    moved = previews.with_name("previews.moved")
    previews.rename(moved)  # as if the log dir's copy had been cleaned up
    try:
        listing = http.get(f"{gateway_url}/v1/relion/jobs/{job_id}/previews", timeout=30).json()
        assert listing["updated_at"] is None and all("url" not in p for p in listing["previews"])
        latest = max(archived, key=lambda p: p["iteration"])
        image = http.get(f"{gateway_url}/v1/relion/jobs/{job_id}/previews/{latest['name']}", timeout=30)
        assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
        assert image.headers["ETag"] == f'"{latest["sha256"]}"' and len(image.content) == latest["bytes"]

        page = facts(f"{gateway_url}/v1/relion/ui/#token={user_tokens[USER]}&job={job_id}")
        montage = next(img for img in page.images if img.get("data-name") == latest["name"])
        assert montage["data-loaded"] == "true" and int(montage["data-natural-width"]) == latest["width"], montage
    finally:
        moved.rename(previews)


def test_the_job_page_ticks_classes_of_a_2d_job_and_starts_a_3d_job_on_them(
    http: requests.Session, gateway_url: str, bucket: str, finished_2d: dict[str, Any], user_tokens: dict[str, str]
) -> None:
    job_id = finished_2d["job_id"]
    outputs = (finished_2d["metadata"] or {}).get("outputs")
    assert outputs, f"metadata.json of {job_id} records no outputs to chain from: {finished_2d['metadata']}"
    counts = {int(n): int(c) for n, c in outputs["class_particles"].items()}
    # The two most populated classes (as the chain test picks them), not a guess at which have particles.
    chosen = sorted(n for n in sorted(counts, key=counts.__getitem__)[-2:] if counts[n] > 0)
    assert chosen, counts

    token = user_tokens[USER]
    page_url = f"{gateway_url}/v1/relion/ui/"
    page = facts(f"{page_url}#token={token}&job={job_id}&classes={','.join(map(str, chosen))}")
    assert page.body.get("data-ready") == "job" and page.body.get("data-chain") == "ready", page.body

    # One checkbox per class with its particle count; a class without particles cannot be ticked;
    # the classes the fragment named are ticked, the others are not.
    boxes = {int(box["data-class"]): box for box in page.inputs if "data-class" in box}
    assert {n: int(box["data-particles"]) for n, box in boxes.items()} == counts, boxes
    assert {n for n, box in boxes.items() if "disabled" in box} == {n for n, c in counts.items() if c == 0}, boxes
    assert {n for n, box in boxes.items() if box.get("data-checked") == "true"} == set(chosen), boxes

    forms = [form for form in page.forms if "data-next-request" in form]
    assert len(forms) == 1, page.forms
    request = json.loads(forms[0]["data-next-request"])
    assert request["input_job_id"] == job_id and request["select_classes"] == chosen, request
    assert request["mode"] == "3d" and request["num_mpi"] == 3 and "ref_class" not in request, request
    assert request["user_id"] == USER and request["workspace_id"] == finished_2d["workspace_id"], request
    assert request["output_s3_prefix"] == f"s3://{bucket}/results/{USER}", request  # the parent's
    assert "dataset_s3_url" not in request, request  # the parent's dataset, set by the gateway
    flags = request["flags"]
    assert "i" not in flags and flags["o"] == "Class3D/run" and flags["ref"] == "ref.mrc", flags
    assert token not in "".join(page.text) and token not in str(page.forms)

    # What Submit would send, sent as the user: the API takes it and the parent lists the child.
    response = requests.post(
        f"{gateway_url}/v1/relion/jobs", json=request, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    assert response.status_code == 202, response.text
    child = response.json()
    child_id = child["job_id"]
    try:
        assert child["input_job_id"] == job_id and child["select_classes"] == chosen, child
        assert child["flags"]["i"] == "parent/particles.star", child["flags"]
        parent = http.get(f"{gateway_url}/v1/relion/jobs/{job_id}", timeout=30).json()
        assert child_id in parent["children"], parent["children"]

        # The parent's page links the child, and the child's page links the parent.
        again = facts(f"{page_url}#token={token}&job={job_id}")
        assert any(link.get("data-child") == child_id and link.get("href") == f"#job={child_id}" for link in again.links), again.links
        shown = facts(f"{page_url}#token={token}&job={child_id}")
        assert shown.body.get("data-ready") == "job", shown.body
        assert any(link.get("data-parent") == job_id and link.get("href") == f"#job={job_id}" for link in shown.links), shown.links
    finally:
        # The form suggests 25 iterations; this test needs none of them.
        http.delete(f"{gateway_url}/v1/relion/jobs/{child_id}", timeout=30)
        wait_for_end(http, gateway_url, child_id, timeout=300)
