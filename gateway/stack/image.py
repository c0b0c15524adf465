"""`relion-gateway image build|status`: the service's container image, built here with no registry.

What `build` does (every step skipped when its result is there already):

1. podman, debootstrap and runc from Debian when missing.
2. The base image ``localhost/relion-gateway-base:bookworm``: ``debootstrap --variant=minbase``
   with Python 3.11 included (python3, python3-venv, ca-certificates), docs, man pages, locales and
   apt's lists left out, imported with ``podman import``. The Containerfile names it through
   ``--build-arg BASE=``, so a site with a registry builds the same file on the stock Debian image.
3. The wheels of the committed tree (``git archive HEAD``, so the image is exactly the commit its
   tag names; uncommitted changes are not in it) and of every dependency (``pip wheel``).
4. ``podman build --format docker`` (the OCI format drops HEALTHCHECK) tagged
   ``localhost/relion-gateway:<version>-<short sha>``; an image already tagged so is reused.
   Afterwards the untagged build stage and all but the newest ``--keep`` images are removed
   (each is ~360 MB, most of it the venv layer).

This machine's hybrid cgroups need podman's runc runtime, the cgroupfs manager and ulimits within
the process's hard limits (../shared/notes/containers.md): PODMAN_GLOBAL and ULIMITS carry them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from gateway import __version__
from gateway.process import CommandError, run_command

log = logging.getLogger(__name__)

REPO = "localhost/relion-gateway"
# The service account the Containerfile makes (its UID/GID build arguments default to the same).
IMAGE_UID = 10001
IMAGE_GID = 10001
BASE_IMAGE = "localhost/relion-gateway-base:bookworm"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
TOOLS = {"podman": "podman", "debootstrap": "debootstrap", "runc": "runc"}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Hybrid cgroups (cgroup v1 controllers + cgroup2 unified): crun refuses them; runc with cgroupfs works.
PODMAN_GLOBAL = ("--runtime", "runc", "--cgroup-manager=cgroupfs")
# podman's default limits are above this machine's hard limits (setrlimit fails): ask for less.
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
# Left out of the base: nothing in the image reads them.
BASE_EXCLUDES = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/locale/",
                 "var/lib/apt/lists/", "var/cache/apt/", "var/cache/debconf/", "var/log/")
APT_TIMEOUT_S = 900.0
DEBOOTSTRAP_TIMEOUT_S = 1200.0
WHEEL_TIMEOUT_S = 1200.0
BUILD_TIMEOUT_S = 1800.0
QUERY_TIMEOUT_S = 60.0

Runner = Callable[..., str]


def source_root() -> Path:
    """The checkout this module runs from (the image is built from its committed tree)."""
    return Path(__file__).resolve().parents[2]


def podman(*args: str) -> list[str]:
    """A podman argv with the runtime flags this machine needs."""
    return ["podman", *PODMAN_GLOBAL, *args]


def image_tag(version: str, short_sha: str) -> str:
    return f"{REPO}:{version}-{short_sha}"


def apt_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The first Debian mirror apt uses here (deb822 URIs: line), else deb.debian.org."""
    try:
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split(":", 1)[1].split()[0]
    except OSError:
        pass
    return DEFAULT_MIRROR


def keep_in_base(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """tarfile filter for the base's rootfs: drop BASE_EXCLUDES' contents (their directories stay)."""
    name = member.name.removeprefix("./")
    for prefix in BASE_EXCLUDES:
        if name.startswith(prefix) and name != prefix.rstrip("/"):
            return None
    return member


@dataclass
class Step:
    name: str
    seconds: float
    outcome: str  # "done", "skipped" or "reused"


@dataclass
class BuildReport:
    tag: str
    commit: str
    steps: list[Step] = field(default_factory=list)
    reused: bool = False
    size_bytes: int | None = None
    removed: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    def lines(self) -> list[str]:
        out = [f"{step.name:<10} {step.outcome:<8} {step.seconds:7.1f} s" for step in self.steps]
        size = f", {self.size_bytes / 1e6:.0f} MB" if self.size_bytes else ""
        out += [f"removed    {name}" for name in self.removed]
        out.append(f"image {self.tag} ({'reused' if self.reused else 'built'}{size}) in {self.seconds:.1f} s")
        return out


class ImageBuilder:
    """The steps of `image build`, each through ``runner`` (tests pass a fake)."""

    def __init__(self, root: Path | None = None, *, runner: Runner = run_command,
                 which: Callable[[str], str | None] = shutil.which, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root or source_root()
        self._run = runner
        self._which = which
        self._clock = clock

    # --- queries ---------------------------------------------------------------------------

    def commit(self) -> tuple[str, str]:
        """(full sha, short sha) of HEAD."""
        full = self._run(["git", "-C", str(self.root), "rev-parse", "HEAD"], timeout=QUERY_TIMEOUT_S).strip()
        short = self._run(["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"], timeout=QUERY_TIMEOUT_S).strip()
        return full, short

    def dirty(self) -> bool:
        out = self._run(["git", "-C", str(self.root), "status", "--porcelain", "--untracked-files=no"], timeout=QUERY_TIMEOUT_S)
        return bool(out.strip())

    def source_url(self) -> str:
        try:
            return self._run(["git", "-C", str(self.root), "remote", "get-url", "origin"], timeout=QUERY_TIMEOUT_S).strip() or "unknown"
        except CommandError:
            return "unknown"

    def image_exists(self, ref: str) -> bool:
        try:
            self._run(podman("image", "exists", ref), timeout=QUERY_TIMEOUT_S)
        except CommandError as exc:
            if exc.returncode == 1:
                return False
            raise
        return True

    def inspect(self, ref: str) -> dict[str, Any]:
        data = json.loads(self._run(podman("image", "inspect", ref), timeout=QUERY_TIMEOUT_S))
        return data[0] if isinstance(data, list) else data

    def missing_tools(self) -> list[str]:
        return sorted({package for binary, package in TOOLS.items() if self._which(binary) is None})

    # --- steps -----------------------------------------------------------------------------

    def ensure_tools(self) -> bool:
        missing = self.missing_tools()
        if not missing:
            return False
        log.info("installing %s", " ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            self._run(["apt-get", "install", "-y", "-q", *missing], timeout=APT_TIMEOUT_S, env=env)
        except CommandError:
            self._run(["apt-get", "update", "-q"], timeout=APT_TIMEOUT_S, env=env)
            self._run(["apt-get", "install", "-y", "-q", *missing], timeout=APT_TIMEOUT_S, env=env)
        return True

    def build_base(self, workdir: Path) -> None:
        rootfs = workdir / "rootfs"
        self._run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs),
                   apt_mirror()], timeout=DEBOOTSTRAP_TIMEOUT_S)
        archive = workdir / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(str(rootfs), arcname=".", filter=keep_in_base)
        shutil.rmtree(rootfs, ignore_errors=True)
        self._run(podman("import", "--change", "CMD=/bin/bash", str(archive), BASE_IMAGE), timeout=BUILD_TIMEOUT_S)

    def build_context(self, workdir: Path, commit: str) -> Path:
        """workdir/context: the Containerfile and .containerignore of ``commit`` and wheels/."""
        source, context = workdir / "source", workdir / "context"
        source.mkdir()
        (context / "wheels").mkdir(parents=True)
        archive = workdir / "source.tar"
        self._run(["git", "-C", str(self.root), "archive", "--format=tar", "-o", str(archive), commit], timeout=QUERY_TIMEOUT_S)
        with tarfile.open(archive) as tar:
            tar.extractall(source, filter="data")
        self._run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(context / "wheels"), str(source)],
                  timeout=WHEEL_TIMEOUT_S, cwd=str(source))
        for name in ("Containerfile", ".containerignore"):
            shutil.copy2(source / name, context / name)
        return context

    def build_image(self, context: Path, tag: str, *, version: str, commit: str, base: str, uid: int, gid: int) -> None:
        args = ["build", "--format", "docker", *ULIMITS, "-f", str(context / "Containerfile"),
                "--build-arg", f"BASE={base}", "--build-arg", f"VERSION={version}", "--build-arg", f"REVISION={commit}",
                "--build-arg", f"SOURCE={self.source_url()}", "--build-arg", f"UID={uid}", "--build-arg", f"GID={gid}",
                "-t", tag, str(context)]
        self._run(podman(*args), timeout=BUILD_TIMEOUT_S)

    def prune(self, keep: int, current: str) -> list[str]:
        """Drop the untagged build stages and all but the ``keep`` newest images of REPO (never ``current``)."""
        self._run(podman("image", "prune", "-f", "--filter", "label=io.relion-gateway.stage=build"), timeout=BUILD_TIMEOUT_S)
        listed = json.loads(self._run(podman("images", "--format", "json", REPO), timeout=QUERY_TIMEOUT_S) or "[]")
        tagged = sorted(((int(i.get("Created", 0)), name) for i in listed for name in i.get("Names") or []
                         if name.startswith(f"{REPO}:")), reverse=True)
        removed = []
        for _, name in tagged[max(keep, 1):]:
            if name == current:
                continue
            try:
                self._run(podman("rmi", name), timeout=QUERY_TIMEOUT_S)
                removed.append(name)
            except CommandError as exc:  # a container still uses it
                log.info("kept %s: %s", name, exc.stderr.strip()[:200])
        return removed

    @contextmanager
    def _timed(self, report: BuildReport, name: str) -> Iterator[list[str]]:
        outcome = ["done"]
        start = self._clock()
        yield outcome
        report.steps.append(Step(name, self._clock() - start, outcome[0]))

    def build(self, *, force: bool = False, base: str = BASE_IMAGE, uid: int = IMAGE_UID, gid: int = IMAGE_GID,
              keep: int = 3) -> BuildReport:
        full, short = self.commit()
        report = BuildReport(tag=image_tag(__version__, short), commit=full)
        with self._timed(report, "tools") as outcome:
            if not self.ensure_tools():
                outcome[0] = "skipped"
        with self._timed(report, "reuse") as outcome:
            outcome[0] = "skipped"
            if not force and self.image_exists(report.tag):
                report.reused = True
        if not report.reused:
            with tempfile.TemporaryDirectory(prefix="relion-gateway-image-", dir="/var/tmp") as tmp:
                work = Path(tmp)
                with self._timed(report, "base") as outcome:
                    if base != BASE_IMAGE or self.image_exists(BASE_IMAGE):
                        outcome[0] = "skipped"
                    else:
                        self.build_base(work)
                with self._timed(report, "wheels"):
                    context = self.build_context(work, full)
                with self._timed(report, "build"):
                    self.build_image(context, report.tag, version=__version__, commit=full, base=base, uid=uid, gid=gid)
                with self._timed(report, "prune"):
                    report.removed = self.prune(keep, report.tag)
        else:
            report.steps[-1].outcome = "reused"
        report.size_bytes = self.inspect(report.tag).get("Size")
        return report


@click.group("image")
def image_group() -> None:
    """The gateway's container image (podman; no registry needed)."""


@image_group.command("build")
@click.option("--force", is_flag=True, help="build even when an image of this commit exists")
@click.option("--base", default=BASE_IMAGE, show_default=True,
              help="base image (another one, e.g. docker.io/library/debian:bookworm-slim, skips debootstrap)")
@click.option("--uid", type=int, default=IMAGE_UID, show_default=True, help="the service user's uid in the image")
@click.option("--gid", type=int, default=IMAGE_GID, show_default=True, help="the service user's gid in the image")
@click.option("--keep", type=int, default=3, show_default=True, help="images of older commits kept (the newest first)")
def build_command(force: bool, base: str, uid: int, gid: int, keep: int) -> None:
    """Build localhost/relion-gateway:<version>-<commit> from the committed tree (reused when it exists)."""
    builder = ImageBuilder()
    if builder.dirty():
        click.echo("note: uncommitted changes are not in the image (it is built from HEAD)", err=True)
    try:
        report = builder.build(force=force, base=base, uid=uid, gid=gid, keep=keep)
    except CommandError as exc:
        raise click.ClickException(str(exc)[:4000]) from exc
    for line in report.lines():
        click.echo(line)


@image_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def status_command(as_json: bool) -> None:
    """Whether the base and this commit's image exist, and the image's size."""
    builder = ImageBuilder()
    missing = builder.missing_tools()
    status: dict[str, Any] = {"tools_missing": missing, "base": BASE_IMAGE, "base_present": False, "image": None,
                              "present": False, "size_bytes": None}
    _, short = builder.commit()
    status["image"] = image_tag(__version__, short)
    if "podman" not in missing:
        status["base_present"] = builder.image_exists(BASE_IMAGE)
        status["present"] = builder.image_exists(status["image"])
        if status["present"]:
            status["size_bytes"] = builder.inspect(status["image"]).get("Size")
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"base   {BASE_IMAGE}: {'present' if status['base_present'] else 'absent'}")
    size = f" ({status['size_bytes'] / 1e6:.0f} MB)" if status["size_bytes"] else ""
    click.echo(f"image  {status['image']}: {'present' if status['present'] else 'absent'}{size}")
    if missing:
        click.echo(f"missing tools: {' '.join(missing)} (image build installs them)")
