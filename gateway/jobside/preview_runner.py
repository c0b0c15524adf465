"""Start the preview renderer in its own short-lived process: from the watcher, and from the archive hook.

The watcher lives as long as RELION inside the job's memory, so it never imports numpy, mrcfile or
Pillow (this module uses the standard library only): for finished iterations it starts
``python -I -m gateway.jobside previews ...`` (gateway/jobside/previews.py) at a lower priority,
one at a time, and never waits for it. An iteration is rendered once it has been finished for
SETTLE_S with no newer one (RELION writes an iteration's files one after the other, and a renderer
costs ~0.2 s of interpreter start-up and imports, so iterations that come quickly are rendered
together by one process: a 7 s tiny job has all its previews rendered by the archive hook in
one), but never later than MAX_BATCH_WAIT_S after the oldest waiting one. A
render past its timeout is killed; a failed one is written to ``<out>/render.log`` (with the
renderer's own output), never to the job's stderr, whose lines the gateway reads as RELION's
error, and never fails the job.

The archive hook renders what the watcher missed (RELION ends seconds after its last iteration,
and the job script stops the watcher then): the final iteration first, then any earlier one
index.json lacks, in one process beside the packing of the output; then it uploads what
index.json lists.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

PREVIEWS_DIR = "previews"  # under the job's log directory
INDEX_NAME = "index.json"
# it{NNN:03d}-{kind}.png; kind: classes, map-class{K} (1-based), map, fsc, history
NAME_PATTERN = re.compile(r"^it(?P<iteration>\d{3,})-(?P<kind>classes|map-class(?P<k>[1-9]\d*)|map|fsc|history)\.png$", re.ASCII)
INDEX_FIELDS = ("name", "iteration", "kind", "width", "height", "bytes", "sha256")
LOG_NAME = "render.log"
RENDER_TIMEOUT_S = 300.0
NICE = 10  # below RELION's ranks: a render takes what they leave
SETTLE_S = 5.0  # an iteration finished this long, with no newer one, is rendered
MAX_BATCH_WAIT_S = 30.0  # but none waits longer than this for iterations that keep coming


def render_command(
    dataset_dir: Path, prefix: str, mode: str, iterations: list[int], out: Path, *, python: str = sys.executable, nice: int = 0
) -> list[str]:
    argv = [python, "-I", "-m", "gateway.jobside", "previews", "--dir", str(dataset_dir), "--prefix", prefix, "--mode", mode]
    for iteration in iterations:
        argv += ["--iteration", str(iteration)]
    argv += ["--out", str(out)]
    return argv + (["--nice", str(nice)] if nice else [])


def log_line(out: Path, message: str) -> None:
    """Append one timestamped line to render.log; a log that cannot be written is no reason to fail."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / LOG_NAME, "a", encoding="utf-8") as handle:
            handle.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {message}\n")
    except OSError:
        pass


def _start(argv: list[str], out: Path, popen: Callable[..., subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = open(out / LOG_NAME, "ab")
    try:
        return popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/", close_fds=True)
    finally:
        log.close()  # the child holds its own descriptor


def _stop(child: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    child.terminate()
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=30)


class PreviewLauncher:
    """The watcher's side: queue finished iterations, run one renderer at a time, never block."""

    def __init__(
        self,
        dataset_dir: Path,
        prefix: str,
        mode: str,
        out: Path,
        *,
        timeout: float = RENDER_TIMEOUT_S,
        nice: int = NICE,
        settle: float = SETTLE_S,
        max_wait: float = MAX_BATCH_WAIT_S,
        python: str = sys.executable,
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dataset_dir, self.prefix, self.mode, self.out = dataset_dir, prefix, mode, out
        self.timeout, self.nice, self.python = timeout, nice, python
        self.settle, self.max_wait = settle, max_wait
        self._popen, self._clock = popen, clock
        self.pending: list[int] = []
        self._oldest_at = self._newest_at = 0.0  # when the oldest and the newest pending iteration were seen
        self.queued_up_to = 0  # iteration 0 (the initial references) is not previewed
        self.child: subprocess.Popen[bytes] | None = None
        self._running: list[int] = []
        self._started = 0.0
        self.renders: list[dict[str, Any]] = []  # what ran: iterations, seconds, outcome

    def finished(self, iteration: int) -> None:
        """RELION has finished ``iteration`` (and so every one before it)."""
        if iteration > self.queued_up_to:
            now = self._clock()
            if not self.pending:
                self._oldest_at = now
            self._newest_at = now
            self.pending += range(self.queued_up_to + 1, iteration + 1)
            self.queued_up_to = iteration

    def _due(self) -> bool:
        now = self._clock()
        return bool(self.pending) and (now - self._newest_at >= self.settle or now - self._oldest_at >= self.max_wait)

    def poll(self) -> None:
        """Reap a finished (or overdue) renderer; start the next one if iterations wait."""
        if self.child is not None:
            code = self.child.poll()
            if code is None and self._clock() - self._started <= self.timeout:
                return
            if code is None:
                _stop(self.child)
                self._done(f"timed out after {self.timeout:g} s (killed)")
            else:
                self._done("ok" if code == 0 else f"failed (exit {code})")
        if self._due():
            iterations, self.pending = self.pending, []
            argv = render_command(self.dataset_dir, self.prefix, self.mode, iterations, self.out, python=self.python, nice=self.nice)
            try:
                self.child = _start(argv, self.out, self._popen)
            except OSError as exc:
                log_line(self.out, f"watcher: could not start the renderer for iterations {iterations}: {exc}")
                return
            self._running, self._started = iterations, self._clock()

    def _done(self, outcome: str) -> None:
        seconds = round(self._clock() - self._started, 3)
        self.renders.append({"iterations": self._running, "seconds": seconds, "outcome": outcome})
        if outcome != "ok":
            log_line(self.out, f"watcher: previews of iterations {self._running} {outcome} after {seconds:g} s")
        self.child = None

    def close(self) -> None:
        """Stop a renderer still running (the job is ending; the archive hook renders what is missing)."""
        if self.child is not None and self.child.poll() is None:
            _stop(self.child)
            self._done("stopped: the watcher is ending")
        elif self.child is not None:
            self.poll()


# -- the archive hook's side -----------------------------------------------------------------


def read_index(out: Path) -> dict[str, Any] | None:
    """index.json as written by the renderer, or None when there is none or it cannot be read."""
    try:
        index = json.loads((out / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("previews"), list) else None


def rendered_iterations(out: Path) -> set[int]:
    """The iterations whose full set index.json lists (an iteration's history plot is written last)."""
    index = read_index(out) or {"previews": []}
    return {e["iteration"] for e in index["previews"] if isinstance(e, dict) and e.get("kind") == "history" and isinstance(e.get("iteration"), int)}


def has_iteration(out: Path, iteration: int) -> bool:
    return iteration in rendered_iterations(out)


class FinalRender:
    """The previews the watcher missed, rendered by the archive hook: the final iteration first."""

    def __init__(self, child: subprocess.Popen[bytes], out: Path, iterations: list[int], clock: Callable[[], float] = time.monotonic) -> None:
        self.child, self.out, self.iterations, self._clock = child, out, iterations, clock
        self.iteration = iterations[0]
        self.started = clock()

    @classmethod
    def start(
        cls, dataset_dir: Path, prefix: str, mode: str, out: Path, *, python: str = sys.executable,
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
    ) -> FinalRender | None:
        """Start rendering the finished iterations index.json lacks, the last one first; None when none is."""
        from gateway.relion.results import (
            read_progress,  # the watcher's own reader: cheap, no numpy
        )

        try:
            iteration = int(read_progress(dataset_dir, prefix, mode).get("iteration") or 0)
        except (OSError, ValueError) as exc:
            log_line(out, f"archive: cannot tell the last iteration: {exc}")
            return None
        done = rendered_iterations(out)
        missing = [n for n in (iteration, *range(1, iteration)) if n >= 1 and n not in done]
        if not missing:
            return None
        try:
            child = _start(render_command(dataset_dir, prefix, mode, missing, out, python=python), out, popen)
        except OSError as exc:
            log_line(out, f"archive: could not start the renderer: {exc}")
            return None
        return cls(child, out, missing)

    def wait(self, timeout: float = RENDER_TIMEOUT_S) -> bool:
        """Wait for the render (at most ``timeout`` seconds from its start); True if it succeeded."""
        remaining = max(0.0, timeout - (self._clock() - self.started))
        try:
            code = self.child.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            _stop(self.child)
            log_line(self.out, f"archive: previews of iterations {self.iterations} timed out after {timeout:g} s (killed)")
            return False
        if code != 0:
            log_line(self.out, f"archive: previews of iterations {self.iterations} failed (exit {code})")
        return code == 0


def preview_dir(log_dir: str | os.PathLike[str]) -> Path:
    return Path(log_dir) / PREVIEWS_DIR
