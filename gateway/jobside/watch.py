"""Follow RELION's output files while it runs and report progress (iteration k of N, resolution)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from gateway.relion.results import read_progress

log = logging.getLogger(__name__)


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
) -> None:
    """Poll the output directory; on each change write ``progress_file`` and call ``report``."""
    parent = os.getppid()
    keep_going = keep_going or (lambda: os.getppid() == parent)  # stop when the job script is gone
    last: dict[str, Any] | None = None
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
        if once:
            return
        time.sleep(interval)
