"""Follow RELION's output files while it runs and report progress (iteration k of N, resolution).

After each finished iteration (but the initial references, it000) the watcher also starts the
preview renderer (gateway/jobside/preview_runner.py) in a process of its own, so that numpy,
mrcfile and Pillow never live in this one; it writes ``<log_dir>/previews/`` (next to
``progress.json``). The watcher never waits for it: a slow or failing render changes nothing for
RELION or the job.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gateway.jobside.preview_runner import PREVIEWS_DIR, PreviewLauncher
from gateway.relion.results import read_progress

log = logging.getLogger(__name__)


@dataclass
class IterationClock:
    """When each finished iteration was first seen, for the time-per-iteration estimate.

    Only iterations this watcher saw appear count: a continuation's first iteration was finished
    by an earlier attempt, and the time the job waited in the queue is nobody's iteration time.
    """

    seen: dict[int, float] = field(default_factory=dict)

    def saw(self, iteration: int, at: float) -> None:
        self.seen.setdefault(iteration, at)

    def seconds_per_iteration(self) -> float | None:
        if len(self.seen) < 2:
            return None
        first, last = min(self.seen), max(self.seen)
        return (self.seen[last] - self.seen[first]) / (last - first)

    def estimate(self, iteration: int, planned: int | None, deadline: float | None, now: float) -> dict[str, Any]:
        """Progress fields: the time per iteration and whether the rest fits before ``deadline``.

        Without a planned count (auto-refine runs until it converges) only the next iteration is
        judged. RELION's iteration times grow as the resolution does, so a "fits" is a lower
        bound on the time needed, never a promise.
        """
        per_iteration = self.seconds_per_iteration()
        if per_iteration is None:
            return {}
        fields_: dict[str, Any] = {"seconds_per_iteration": round(per_iteration, 1)}
        remaining = max(planned - iteration, 0) if planned is not None else 1
        finish = self.seen[max(self.seen)] + remaining * per_iteration
        fields_["estimated_finish_at"] = round(finish, 1)
        if deadline is None:
            return fields_
        fields_["time_limit_at"] = deadline
        fields_["fits_time_limit"] = finish <= deadline
        if finish > deadline and remaining:
            what = f"the remaining {remaining} iterations" if planned is not None else "the next iteration"
            fields_["time_warning"] = (
                f"at {_duration(per_iteration)} per iteration {what} need {_duration(remaining * per_iteration)}, "
                f"but the time limit ends the job in {_duration(max(deadline - now, 0))}"
            )
        return fields_


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# Fields the watcher adds to what RELION's files say: not a reason to report again.
_DERIVED = frozenset(
    {"iterations_planned", "updated_at", "seconds_per_iteration", "estimated_finish_at", "time_limit_at", "fits_time_limit", "time_warning"}
)


def _previous_estimate(progress_file: Path) -> dict[str, Any]:
    try:
        previous = json.loads(progress_file.read_text())
    except (OSError, ValueError):
        return {}
    value = previous.get("seconds_per_iteration") if isinstance(previous, dict) else None
    return {"seconds_per_iteration": value} if isinstance(value, (int, float)) else {}


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the loop, so the renderer it started is stopped too


def watch(
    dataset_dir: Path,
    output_prefix: str,
    mode: str,
    *,
    progress_file: Path,
    report: Callable[[dict[str, Any]], object],
    interval: float = 2.0,
    iterations_planned: int | None = None,
    keep_going: Callable[[], bool] | None = None,
    once: bool = False,
    previews: PreviewLauncher | bool = True,
    deadline: float | None = None,
) -> None:
    """Poll the output directory; on each change write ``progress_file`` and call ``report``.

    ``previews``: True renders into ``<progress_file's directory>/previews`` (not with ``once``),
    False renders nothing, or a PreviewLauncher of the caller's. ``deadline`` (epoch seconds, when
    Slurm's time limit ends the job) adds the time-per-iteration estimate and its warning.
    """
    parent = os.getppid()
    keep_going = keep_going or (lambda: os.getppid() == parent)  # stop when the job script is gone
    launcher: PreviewLauncher | None
    if isinstance(previews, PreviewLauncher):
        launcher = previews
    elif previews and not once:
        launcher = PreviewLauncher(dataset_dir, output_prefix, mode, progress_file.parent / PREVIEWS_DIR)
    else:
        launcher = None
    previous_handler = None
    if launcher is not None and threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    last: dict[str, Any] | None = None
    clock = IterationClock()
    # The final --once report starts a fresh clock: keep the running watcher's last estimate.
    carried = _previous_estimate(progress_file) if once else {}
    try:
        while keep_going():
            try:
                progress = dict(read_progress(dataset_dir, output_prefix, mode))
            except (OSError, ValueError) as exc:  # a half-written file: try again next time
                log.debug("progress not readable yet: %s", exc)
                progress = {}
            if progress and progress != last:
                now = time.time()
                if isinstance(progress.get("iteration"), int):
                    clock.saw(progress["iteration"], now)
                    progress.update(clock.estimate(progress["iteration"], iterations_planned, deadline, now) or carried)
                progress["iterations_planned"] = iterations_planned
                progress["updated_at"] = now
                tmp = progress_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(progress, sort_keys=True))
                tmp.replace(progress_file)  # atomic: the poller never reads half a file
                report(progress)
                last = {k: v for k, v in progress.items() if k not in _DERIVED}
            if launcher is not None:
                if isinstance(progress.get("iteration"), int):
                    launcher.finished(progress["iteration"])
                launcher.poll()
            if once:
                return
            time.sleep(interval)
    finally:
        if launcher is not None:
            launcher.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
