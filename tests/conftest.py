"""Fixtures in the style of the Flask tutorial: a fresh app per test, built by the factory.

Authentication is on, as in production: the app fixture creates a token for alice and an admin
token, and every client that ``app.test_client()`` makes sends alice's unless told otherwise
(``app.test_client(token=ADMIN)``, ``app.test_client(token=None)`` for none at all).
"""
from __future__ import annotations

import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway import create_app
from gateway.auth import create_token
from tests.fakes import FakeScheduler, FakeStorage

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The tests that take minutes first (stable: the others keep their order), so that under
    # pytest-xdist the rest fill the other workers while they run instead of after.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def _searchable(path: Path) -> Path:
    path.chmod(path.stat().st_mode | stat.S_IXOTH)
    return path


@pytest.fixture(scope="session", autouse=True)
def _job_accounts_reach_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Jobs on the local stack run as an unprivileged account (config/local.toml [job] run_as) and
    must reach their workspaces and logs below the tests' temporary directories, which pytest makes
    mode 700: allow search (o+x, never listing) on the way down."""
    base = tmp_path_factory.getbasetemp()
    # Every directory between /tmp and the base: under pytest-xdist the base is one more level
    # down (<...>/pytest-N/popen-gw0), below pytest's own 0700 pytest-of-<user>.
    tmp = Path(tempfile.gettempdir())
    for directory in [*reversed(base.parents), base]:
        if tmp in directory.parents:
            _searchable(directory)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """pytest's tmp_path, searchable by the job accounts (see _job_accounts_reach_tmp)."""
    return _searchable(tmp_path)


# A cheap scrypt cost for tests (production's default is 2**14); the stored hash names its cost.
TEST_SCRYPT_N = 16
_DEFAULT = object()


class AuthClient(FlaskClient):
    """A test client that sends ``Authorization: Bearer <token>`` unless the request sets its own."""

    def __init__(self, *args: Any, token: Any = _DEFAULT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token: str | None = self.application.config["TEST_TOKENS"]["alice"] if token is _DEFAULT else token

    def open(self, *args: Any, **kwargs: Any) -> Any:
        if self.token is not None:
            headers = kwargs.get("headers")
            names = {str(k).lower() for k in (headers.keys() if hasattr(headers, "keys") else dict(headers or []).keys())}
            if "authorization" not in names:
                merged = dict(headers.items() if hasattr(headers, "items") else (headers or []))
                merged["Authorization"] = f"Bearer {self.token}"
                kwargs["headers"] = merged
        return super().open(*args, **kwargs)


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
            "AUTH_SCRYPT_N": TEST_SCRYPT_N,
        },
        scheduler=scheduler,
        storage=storage,  # type: ignore[arg-type]
    )
    store = app.extensions["relion_gateway"].store
    app.config["TEST_TOKENS"] = {
        "alice": create_token(store, "alice", n=TEST_SCRYPT_N)[1],
        "bob": create_token(store, "bob", n=TEST_SCRYPT_N)[1],
        "admin": create_token(store, "root", admin=True, n=TEST_SCRYPT_N)[1],
    }
    app.test_client_class = AuthClient
    yield app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Alice's client."""
    return app.test_client()


@pytest.fixture
def admin_client(app: Flask) -> FlaskClient:
    return app.test_client(token=app.config["TEST_TOKENS"]["admin"])


@pytest.fixture
def bob_client(app: Flask) -> FlaskClient:
    return app.test_client(token=app.config["TEST_TOKENS"]["bob"])


@pytest.fixture
def anonymous_client(app: Flask) -> FlaskClient:
    return app.test_client(token=None)
