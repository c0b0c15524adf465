"""`relion-gateway image build`: the steps it runs (a fake runner), what it skips, and the Containerfile's promises."""
from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.process import CommandError
from gateway.stack import image
from gateway.stack.image import BASE_IMAGE, ImageBuilder, apt_mirror, image_tag, keep_in_base

ROOT = Path(__file__).resolve().parents[2]


class FakeRunner:
    """Answers git and podman queries; records every argv."""

    def __init__(self, existing: Sequence[str] = ()) -> None:
        self.existing = set(existing)
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float, **kwargs: Any) -> str:
        argv = list(argv)
        assert timeout > 0
        self.calls.append(argv)
        if argv[:1] == ["git"]:
            if "--short" in argv:
                return "abc1234\n"
            if "rev-parse" in argv:
                return "abc1234" + "0" * 33 + "\n"
            if "archive" in argv:
                out = Path(argv[argv.index("-o") + 1])
                with tarfile.open(out, "w") as tar:
                    for name in ("Containerfile", ".containerignore"):
                        tar.add(str(ROOT / name), arcname=name)
                return ""
            if "remote" in argv:
                raise CommandError(argv, 2, "", "error: No such remote 'origin'")
            return ""
        if "exists" in argv:
            if argv[-1] in self.existing:
                return ""
            raise CommandError(argv, 1)
        if "inspect" in argv:
            return json.dumps([{"Size": 123_000_000}])
        if "images" in argv:
            return json.dumps([{"Names": [f"localhost/relion-gateway:0.1.0-old{i}"], "Created": i} for i in range(5)]
                              + [{"Names": ["localhost/relion-gateway:0.1.0-abc1234"], "Created": 99}])
        return ""

    def named(self, word: str) -> list[list[str]]:
        return [argv for argv in self.calls if word in argv]


def builder(runner: FakeRunner, tools: bool = True) -> ImageBuilder:
    return ImageBuilder(ROOT, runner=runner, which=lambda name: f"/usr/bin/{name}" if tools else None)


def test_the_tag_names_version_and_commit() -> None:
    assert image_tag("0.1.0", "abc1234") == "localhost/relion-gateway:0.1.0-abc1234"


def test_an_image_of_the_same_commit_is_reused() -> None:
    runner = FakeRunner(existing=["localhost/relion-gateway:0.1.0-abc1234"])
    report = builder(runner).build()
    assert report.reused and report.size_bytes == 123_000_000
    assert not runner.named("build") and not runner.named("debootstrap")
    assert "reused" in report.lines()[-1]


def test_a_cold_build_makes_the_base_the_wheels_and_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner()
    monkeypatch.setattr(image.ImageBuilder, "build_base", lambda self, work: runner(["debootstrap", "stub"], timeout=1))
    report = builder(runner).build()
    assert not report.reused
    assert [s.name for s in report.steps] == ["tools", "reuse", "base", "wheels", "build", "prune"]
    # the untagged build stage, then all but the 3 newest images (the new one among them)
    assert runner.named("prune")[0][-2:] == ["--filter", "label=io.relion-gateway.stage=build"]
    assert report.removed == ["localhost/relion-gateway:0.1.0-old2", "localhost/relion-gateway:0.1.0-old1",
                              "localhost/relion-gateway:0.1.0-old0"]
    (build,) = runner.named("build")
    assert build[:4] == ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
    assert "--format" in build and build[build.index("--format") + 1] == "docker"  # keeps HEALTHCHECK
    assert f"BASE={BASE_IMAGE}" in build and "SOURCE=unknown" in build
    assert "nofile=4096:4096" in build and build[build.index("-t") + 1] == "localhost/relion-gateway:0.1.0-abc1234"
    (wheel,) = [argv for argv in runner.calls if "wheel" in argv]
    assert "--wheel-dir" in wheel


def test_a_present_base_or_another_base_skips_debootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_base(self: ImageBuilder, work: Path) -> None:
        raise AssertionError("debootstrap should not run")

    monkeypatch.setattr(image.ImageBuilder, "build_base", no_base)
    report = builder(FakeRunner(existing=[BASE_IMAGE])).build()
    assert [s.outcome for s in report.steps if s.name == "base"] == ["skipped"]
    runner = FakeRunner()
    builder(runner).build(base="docker.io/library/debian:bookworm-slim")
    assert "BASE=docker.io/library/debian:bookworm-slim" in runner.named("build")[0]


def test_missing_tools_are_installed_from_debian() -> None:
    runner = FakeRunner(existing=["localhost/relion-gateway:0.1.0-abc1234"])
    builder(runner, tools=False).build()
    (install,) = [argv for argv in runner.calls if argv[:2] == ["apt-get", "install"]]
    assert {"podman", "debootstrap", "runc"} <= set(install)


def test_the_base_leaves_out_docs_and_apt_lists() -> None:
    def member(name: str) -> tarfile.TarInfo:
        return tarfile.TarInfo(name)

    assert keep_in_base(member("./usr/share/doc/python3/copyright")) is None
    assert keep_in_base(member("./var/lib/apt/lists/deb.debian.org_InRelease")) is None
    assert keep_in_base(member("./usr/share/doc")) is not None  # the directory itself stays
    assert keep_in_base(member("./usr/bin/python3.11")) is not None


def test_apt_mirror_reads_deb822_sources(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
                       "\nTypes: deb\nURIs: http://mirror.example/debian-security\n")
    assert apt_mirror(sources) == "http://mirror.example/debian"
    assert apt_mirror(tmp_path / "none") == "http://deb.debian.org/debian"


def test_the_containerfile_keeps_its_promises() -> None:
    text = (ROOT / "Containerfile").read_text()
    assert "ARG BASE=docker.io/library/debian:bookworm-slim" in text
    assert "--no-index" in text and "pip uninstall -y -q pip setuptools" in text
    for label in ("version", "source", "licenses", "title", "description", "revision"):
        assert f"org.opencontainers.image.{label}=" in text
    assert 'VOLUME ["/etc/relion-gateway", "/var/lib/relion-gateway"]' in text
    assert "EXPOSE 9012" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert 'USER ${UID}:${GID}' in text
    assert 'CMD ["serve", "--host", "0.0.0.0"]' in text and 'ENTRYPOINT ["relion-gateway"]' in text
    # The build context is the wheels only: no source tree, venv, state or key reaches the build.
    assert (ROOT / ".containerignore").read_text().split("\n")[1:3] == ["*", "!wheels/"]
