"""Fixtures in the style of the Flask tutorial: a fresh app per test, built by the factory."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway import create_app
from tests.fakes import FakeScheduler, FakeStorage


def valid_request(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "user_id": "alice",
        "workspace_id": "ws1",
        "dataset_s3_url": "s3://relion-local/datasets/tiny.tar.gz",
        "output_s3_prefix": "s3://relion-local/results",
        "mode": "2d",
        "num_mpi": 3,
        "flags": {"i": "particles.star", "o": "Class2D/run", "K": 3, "iter": 2, "ctf": True, "j": 1},
    }
    request.update(changes)
    return request


@pytest.fixture
def scheduler() -> FakeScheduler:
    return FakeScheduler()


@pytest.fixture
def storage() -> FakeStorage:
    return FakeStorage()


@pytest.fixture
def app(tmp_path: Path, scheduler: FakeScheduler, storage: FakeStorage, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    # A test must not pick up the developer's GATEWAY_* settings.
    for name in list(__import__("os").environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    app = create_app(
        {
            "TESTING": True,
            "PATHS_STATE_DIR": str(tmp_path / "state"),
            "PATHS_WORKSPACE_ROOT": "",
            "PATHS_LOG_ROOT": "",
            "STORE_DATABASE_URL": "",
            "S3_ALLOWED_BUCKETS": ["relion-local"],
        },
        scheduler=scheduler,
        storage=storage,  # type: ignore[arg-type]
    )
    yield app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
