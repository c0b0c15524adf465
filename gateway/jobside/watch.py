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
from pathlib import Path
from typing import Any, Callable

from gateway.jobside.preview_runner import PREVIEWS_DIR, PreviewLauncher
from gateway.relion.results import read_progress

log = logging.getLogger(__name__)


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
) -> None:
    """Poll the output directory; on each change write ``progress_file`` and call ``report``.

    ``previews``: True renders into ``<progress_file's directory>/previews`` (not with ``once``),
    False renders nothing, or a PreviewLauncher of the caller's.
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
    try:
        while keep_going():
            try:
                progress = dict(read_progress(dataset_dir, output_prefix, mode))
            except (OSError, ValueError) as exc:  # a half-written file: try again next time
                log.debug("progress not readable yet: %s", exc)
                progress = {}
            if progress and progress != last:
                progress["iterations_planned"] = iterations_planned
                progress["updated_at"] = time.time()
                tmp = progress_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(progress, sort_keys=True))
                tmp.replace(progress_file)  # atomic: the poller never reads half a file
                report(progress)
                last = {k: v for k, v in progress.items() if k not in ("iterations_planned", "updated_at")}
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
