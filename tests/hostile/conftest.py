"""The hostile-tenant suite: one user's job tries every escape, on the real stack.

Each attempt is recorded as (attempt, expected, observed) and the run's summary prints the table,
so a site reads from a CI log what a job could and could not reach. The stack fixtures are the
integration suite's.
"""
from __future__ import annotations

import io
import secrets
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.relion.dataset import TARBALL_MEMBERS, make_dataset
from gateway.storage.s3 import S3Location, S3Storage
from tests.integration.conftest import (  # noqa: F401  (fixtures)
    TERMINAL,
    admin_token,
    allow_admin,
    bucket,
    dataset_url,
    free_port,
    gateway_config,
    gateway_url,
    http,
    stack,
    storage,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/hostile" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@dataclass
class Attempt:
    attempt: str
    expected: str
    observed: str
    denied: bool


ATTEMPTS: list[Attempt] = []  # for the summary: every test's, as its reports arrive
_RECORDED: list[Attempt] = []  # the running test's, until its teardown report carries them


def record(attempt: str, expected: str, observed: str, denied: bool) -> bool:
    """Note one escape attempt for the summary table; return ``denied`` for the test's assert."""
    _RECORDED.append(Attempt(attempt, expected, " ".join(observed.split()), denied))
    return denied


@pytest.fixture(autouse=True)
def _attempts_ride_the_report(request: pytest.FixtureRequest) -> Iterator[None]:
    # Under pytest-xdist the test runs in a worker and the summary is printed by the controller:
    # the attempts travel in the test's report (user_properties), which both processes see.
    yield
    request.node.user_properties.extend(("hostile_attempt", asdict(a)) for a in _RECORDED)
    _RECORDED.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        ATTEMPTS.extend(Attempt(**value) for name, value in report.user_properties if name == "hostile_attempt")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ATTEMPTS:
        return
    terminalreporter.section("hostile tenant: every escape attempt")
    width = max(len(a.attempt) for a in ATTEMPTS)
    terminalreporter.write_line(f"{'attempt':<{width}} | expected | observed")
    for a in ATTEMPTS:
        mark = "" if a.denied else "  <-- NOT DENIED"
        terminalreporter.write_line(f"{a.attempt:<{width}} | {a.expected} | {a.observed}{mark}")


def hostile_tarball(out: Path, extra: dict[str, bytes]) -> Path:
    """The tiny dataset plus ``extra`` members (path -> bytes) at the archive root."""
    make_dataset(out / "tiny")
    tarball = out / "hostile.tar.gz"
    with tarfile.open(tarball, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name in TARBALL_MEMBERS:
            tar.add(out / "tiny" / name, arcname=name)
        for name, data in sorted(extra.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return tarball


def upload(s3: S3Storage, bucket_name: str, tarball: Path, key: str | None = None) -> str:
    location = S3Location(bucket_name, key or f"datasets/hostile-{secrets.token_hex(4)}.tar.gz")
    s3.upload_file(str(tarball), location)
    return location.url
