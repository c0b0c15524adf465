"""Issue 15: a job's preview images over the API (log dir while it runs, S3 once archived) and the job page."""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from gateway.storage.base import ObjectInfo, S3Location, StorageError
from tests.conftest import valid_request
from tests.fakes import FakeStorage

JOBS = "/v1/relion/jobs"


@dataclass
class StreamingStorage(FakeStorage):
    """FakeStorage with the streamed GET the preview reader uses (it bounds what it reads)."""

    fail: bool = False

    def open_stream(self, location: S3Location) -> tuple[io.BytesIO, ObjectInfo]:
        if self.fail:
            raise StorageError("GET", location.bucket, location.key, "Connection refused")
        data = self.get_bytes(location)
        return io.BytesIO(data), ObjectInfo(len(data), "etag")


@pytest.fixture
def storage() -> StreamingStorage:
    return StreamingStorage()


def png(width: int, height: int, shade: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), shade).save(buffer, "PNG")
    return buffer.getvalue()


def entry(iteration: int, kind: str, data: bytes, width: int, height: int) -> dict[str, Any]:
    return {"name": f"it{iteration:03d}-{kind}.png", "iteration": iteration, "kind": kind, "width": width, "height": height,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# What a 2D job's side leaves after two iterations: a montage per iteration and the history plot.
IMAGES = {
    "it001-classes.png": (png(24, 8, 40), 24, 8),
    "it002-classes.png": (png(24, 8, 200), 24, 8),
    "it002-history.png": (png(16, 12), 16, 12),
}


def entries() -> list[dict[str, Any]]:
    return [entry(int(name[2:5]), name[6:-4], data, w, h) for name, (data, w, h) in IMAGES.items()]


@pytest.fixture
def job(client: FlaskClient) -> dict[str, Any]:
    response = client.post(JOBS, json=valid_request())
    assert response.status_code == 202, response.json
    return dict(response.json)


@pytest.fixture
def log_dir(app: Flask, job: dict[str, Any]) -> Path:
    return Path(app.config["PATHS_LOG_ROOT"]) / "alice" / job["job_id"]


def write_previews(log_dir: Path, listed: list[dict[str, Any]] | None = None) -> Path:
    previews = log_dir / "previews"
    previews.mkdir()
    for name, (data, _, _) in IMAGES.items():
        (previews / name).write_bytes(data)
    index = {"schema_version": 1, "updated_at": "2026-01-02T03:04:05Z", "previews": entries() if listed is None else listed}
    (previews / "index.json").write_text(json.dumps(index))
    return previews


def archive(app: Flask, job: dict[str, Any], storage: StreamingStorage, log_dir: Path) -> None:
    """What the archive hook leaves: the PNGs under <output_url>previews/, metadata.json listing them, no log dir copy."""
    for path in (log_dir / "previews").iterdir():
        path.unlink()
    (log_dir / "previews").rmdir()
    listed = [{**e, "url": f"{job['output_url']}previews/{e['name']}"} for e in entries()]
    for name, (data, _, _) in IMAGES.items():
        storage.objects[f"{job['output_url']}previews/{name}"] = data
    app.extensions["relion_gateway"].store.update(
        job["job_id"], state="succeeded", metadata_json=json.dumps({"schema_version": 1, "previews": listed})
    )


def url(job: dict[str, Any], name: str | None = None) -> str:
    return f"{JOBS}/{job['job_id']}/previews" + (f"/{name}" if name else "")


# -- the listing --------------------------------------------------------------------------------


def test_listing_comes_from_the_log_dirs_index_while_the_job_runs(client: FlaskClient, job: dict, log_dir: Path) -> None:
    assert client.get(url(job)).json == {"previews": [], "latest_iteration": None, "updated_at": None}
    write_previews(log_dir)
    body = client.get(url(job)).json
    assert body["latest_iteration"] == 2 and body["updated_at"] == "2026-01-02T03:04:05Z"
    assert [p["name"] for p in body["previews"]] == ["it001-classes.png", "it002-classes.png", "it002-history.png"]
    assert body["previews"][0] == entries()[0]


def test_listing_after_the_archive_comes_from_metadata_without_urls(app: Flask, client: FlaskClient, job: dict, log_dir: Path, storage: StreamingStorage) -> None:
    write_previews(log_dir)
    archive(app, job, storage, log_dir)
    body = client.get(url(job)).json
    assert body == {"previews": entries(), "latest_iteration": 2, "updated_at": None}
    assert all("url" not in p for p in body["previews"])


def test_entries_breaking_the_contract_are_left_out(client: FlaskClient, job: dict, log_dir: Path) -> None:
    good = entries()[0]
    bad = [
        {**good, "name": "it001-classes.PNG"},
        {**good, "name": "../job.json"},
        {**good, "kind": "fsc"},  # the name says classes
        {**good, "iteration": 7},  # the name says 1
        {**good, "name": "it001-map.png", "kind": "map", "sha256": "not-a-digest"},
        {**good, "name": "it001-fsc.png", "kind": "fsc", "width": -1},
        {**good, "name": "it001-map.png", "kind": "map", "bytes": "12"},
        "it001-classes.png",
    ]
    write_previews(log_dir, [*bad, good, good])
    assert client.get(url(job)).json["previews"] == [good]


def test_listed_in_the_job_sides_order(client: FlaskClient, job: dict, log_dir: Path) -> None:
    data = png(2, 2)
    kinds = ["history", "fsc", "map", "map-class10", "map-class2", "map-class1", "classes"]
    write_previews(log_dir, [entry(12, "history", data, 2, 2)] + [entry(3, kind, data, 2, 2) for kind in kinds])
    body = client.get(url(job)).json
    assert [p["name"][6:-4] for p in body["previews"]] == list(reversed(kinds)) + ["history"]
    assert body["latest_iteration"] == 12 and body["previews"][-1]["name"] == "it012-history.png"


def test_an_unreadable_index_falls_back_to_the_archived_list(client: FlaskClient, job: dict, log_dir: Path) -> None:
    previews = write_previews(log_dir)
    for text in ("{not json", json.dumps({"schema_version": 2, "previews": entries()}), "[" * 100_000):
        (previews / "index.json").write_text(text)
        response = client.get(url(job))
        assert response.status_code == 200 and response.json["previews"] == []


# -- one image -------------------------------------------------------------------------------------


def test_an_image_has_its_sha256_as_etag_and_a_304_on_if_none_match(client: FlaskClient, job: dict, log_dir: Path) -> None:
    write_previews(log_dir)
    data = IMAGES["it002-classes.png"][0]
    response = client.get(url(job, "it002-classes.png"))
    assert response.status_code == 200 and response.mimetype == "image/png" and response.data == data
    digest = hashlib.sha256(data).hexdigest()
    assert response.headers["ETag"] == f'"{digest}"'
    assert response.headers["Cache-Control"] == "private, max-age=86400"
    assert response.headers["Vary"] == "Authorization" and response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]

    again = client.get(url(job, "it002-classes.png"), headers={"If-None-Match": f'"{digest}"'})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == f'"{digest}"'
    other = client.get(url(job, "it002-classes.png"), headers={"If-None-Match": '"0000"'})
    assert other.status_code == 200 and other.data == data


def test_a_304_reads_nothing(client: FlaskClient, job: dict, log_dir: Path) -> None:
    previews = write_previews(log_dir)
    digest = entries()[0]["sha256"]
    (previews / "it001-classes.png").unlink()  # listed, gone: only a read would notice
    assert client.get(url(job, "it001-classes.png"), headers={"If-None-Match": f'"{digest}"'}).status_code == 304


@pytest.mark.parametrize("name", ["it003-classes.png", "it001-map-class1.png", "it001-fsc.png"])
def test_a_name_not_listed_is_404_in_the_error_shape(client: FlaskClient, job: dict, log_dir: Path, name: str) -> None:
    previews = write_previews(log_dir)
    (previews / name).write_bytes(png(4, 4))  # on disk, but the index does not list it
    response = client.get(url(job, name))
    assert response.status_code == 404
    assert response.json["code"] == 404 and response.json["status"] == "Not Found"
    assert response.json["message"] == f"{job['job_id']} has no preview {name!r} (state queued)"


@pytest.mark.parametrize(
    "path",
    [
        "..%2F..%2Fjob.json",
        "..%2Fjob.json",
        "%2e%2e",
        "..",
        "index.json",
        "job.json",
        "it001-classes.png%00",
        "it001-classes.png%2F",
        "it001-classes.png.json",
        "IT001-classes.png",
        "it1-classes.png",
        "it001-classes.png%0A",
        "it\u0661\u0662\u0663-classes.png",  # Arabic-Indic digits: \d would take them
        "it001-classes.png;.png",
        "it001-..%2F..%2Fclasses.png",
        "%2Fetc%2Fpasswd",
    ],
)
def test_traversal_and_odd_names_never_reach_a_file(client: FlaskClient, job: dict, log_dir: Path, path: str) -> None:
    write_previews(log_dir)
    response = client.get(f"{url(job)}/{path}")
    assert response.status_code in (404, 422), (path, response.status_code)
    assert response.mimetype == "application/json" and set(response.json) >= {"code", "status", "message"}


def test_a_symlink_planted_by_the_job_is_not_followed(client: FlaskClient, job: dict, log_dir: Path, tmp_path: Path) -> None:
    # A job owns its log dir: it could point a listed name (or previews/ itself) at a file of the gateway's.
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(5, 5, 7))
    listed = entry(3, "map", secret.read_bytes(), 5, 5)
    previews = write_previews(log_dir, [*entries(), listed])
    os.symlink(secret, previews / listed["name"])
    assert client.get(url(job, listed["name"])).status_code == 404

    outside = tmp_path / "outside"
    previews.rename(outside)
    os.symlink(outside, log_dir / "previews")
    assert client.get(url(job)).json["previews"] == []  # neither the index nor the images are read through it
    assert client.get(url(job, "it001-classes.png")).status_code == 404


def test_a_fifo_or_a_directory_under_a_listed_name_is_not_read(client: FlaskClient, job: dict, log_dir: Path) -> None:
    fifo = entry(4, "map", png(3, 3), 3, 3)
    folder = entry(4, "fsc", png(3, 3), 3, 3)
    previews = write_previews(log_dir, [*entries(), fifo, folder])
    os.mkfifo(previews / fifo["name"])
    (previews / folder["name"]).mkdir()
    assert client.get(url(job, fifo["name"])).status_code == 404
    assert client.get(url(job, folder["name"])).status_code == 404


def test_bytes_that_are_not_the_listed_png_are_not_served(client: FlaskClient, job: dict, log_dir: Path) -> None:
    html = b"<html><script>alert(1)</script></html>"
    listed = {**entry(5, "map", html, 1, 1)}
    previews = write_previews(log_dir, [*entries(), listed])
    (previews / listed["name"]).write_bytes(html)  # the sha256 matches, but it is no PNG
    assert client.get(url(job, listed["name"])).status_code == 404
    (previews / "it001-classes.png").write_bytes(png(24, 8, 41))  # a PNG, but not the listed one
    response = client.get(url(job, "it001-classes.png"))
    assert response.status_code == 404 and "listed but not available" in response.json["message"]


def test_another_users_job_is_404_and_admins_see_it(client: FlaskClient, bob_client: FlaskClient, admin_client: FlaskClient,
                                                    anonymous_client: FlaskClient, job: dict, log_dir: Path) -> None:
    write_previews(log_dir)
    for path in (url(job), url(job, "it001-classes.png")):
        response = bob_client.get(path)
        assert response.status_code == 404 and response.json["message"] == f"no job {job['job_id']!r}"
        assert anonymous_client.get(path).status_code == 401
        assert admin_client.get(path).status_code == 200
    assert bob_client.get(url(job, "../../etc/passwd")).status_code == 404


def test_once_the_log_dir_copy_is_gone_the_image_comes_from_s3_at_the_recorded_output_url(
    app: Flask, client: FlaskClient, job: dict, log_dir: Path, storage: StreamingStorage
) -> None:
    write_previews(log_dir)
    archive(app, job, storage, log_dir)
    # metadata.json is the job's word: a url there naming another object is never what is read.
    metadata = json.loads(app.extensions["relion_gateway"].store.get(job["job_id"]).metadata_json)
    metadata["previews"][1]["url"] = "s3://relion-local/someone-else/secret.png"
    storage.objects["s3://relion-local/someone-else/secret.png"] = png(24, 8, 1)
    app.extensions["relion_gateway"].store.update(job["job_id"], metadata_json=json.dumps(metadata))

    response = client.get(url(job, "it002-classes.png"))
    assert response.status_code == 200 and response.data == IMAGES["it002-classes.png"][0]
    assert response.headers["ETag"] == f'"{entries()[1]["sha256"]}"'

    del storage.objects[f"{job['output_url']}previews/it001-classes.png"]
    missing = client.get(url(job, "it001-classes.png"))
    assert missing.status_code == 404 and "listed but not available (state succeeded)" in missing.json["message"]

    storage.fail = True
    down = client.get(url(job, "it002-classes.png"))
    assert down.status_code == 503 and down.headers["Retry-After"] == "10"


def test_the_log_dir_copy_wins_while_it_is_there(app: Flask, client: FlaskClient, job: dict, log_dir: Path, storage: StreamingStorage) -> None:
    write_previews(log_dir)
    storage.fail = True  # S3 is not asked while the log dir has the file
    assert client.get(url(job, "it001-classes.png")).data == IMAGES["it001-classes.png"][0]


# -- the spec ----------------------------------------------------------------------------------------


def test_the_spec_documents_both_endpoints(client: FlaskClient) -> None:
    paths = client.get("/v1/relion/openapi.json").json["paths"]
    listing = paths["/jobs/{job_id}/previews"]["get"]
    assert {"200", "401", "404"} <= set(listing["responses"])
    image = paths["/jobs/{job_id}/previews/{name}"]["get"]
    assert {"200", "304", "401", "404", "503"} <= set(image["responses"])
    assert "image/png" in image["responses"]["200"]["content"]
    assert "ETag" in image["responses"]["200"]["headers"]
    name = next(p for p in image["parameters"] if p["name"] == "name")
    assert name["schema"]["pattern"].startswith("^it")


# -- the job page ---------------------------------------------------------------------------------------


def test_the_job_page_is_public_html_with_a_strict_csp(anonymous_client: FlaskClient) -> None:
    response = anonymous_client.get("/v1/relion/ui/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "img-src 'self' blob:" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    html = response.get_data(as_text=True)
    assert '<script src="app.js" defer></script>' in html and 'id="login-form"' in html
    assert "<script>" not in html and "style=" not in html and "http://" not in html and "https://" not in html

    script = anonymous_client.get("/v1/relion/ui/app.js")
    assert script.status_code == 200 and script.mimetype in ("text/javascript", "application/javascript")
    assert "sessionStorage" in script.get_data(as_text=True)
    assert anonymous_client.get("/v1/relion/ui/app.css").mimetype == "text/css"


def test_the_job_page_serves_only_its_own_assets(anonymous_client: FlaskClient) -> None:
    for path in ("index.html.bak", "..%2Fpage.py", "page.py", "..", "%2e%2e%2fapp.py"):
        response = anonymous_client.get(f"/v1/relion/ui/{path}")
        # A path no route takes is a 401 without a token (nothing is told of what exists), as elsewhere.
        assert response.status_code in (401, 404) and response.mimetype == "application/json", path
    redirect = anonymous_client.get("/v1/relion/ui")
    assert redirect.status_code == 308 and redirect.headers["Location"].endswith("/v1/relion/ui/")


def test_the_page_assets_are_plain_and_local() -> None:
    ui = Path(__file__).resolve().parents[2] / "gateway" / "api" / "ui"
    assert sorted(p.name for p in ui.iterdir()) == ["app.css", "app.js", "index.html"]
    script = (ui / "app.js").read_text()
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "localStorage"):
        assert risky not in script, risky
    for path in ui.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name
