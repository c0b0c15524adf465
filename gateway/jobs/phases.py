"""The one reader of the main job's ``phases`` file.

The job script appends "<phase> <epoch seconds>" as it goes (staging, running, finished). The
poller reads it to tell staging from running; the archive hook reads it for metadata.json's
timings. A requeued job's script runs again and appends again, so the last stamp of a phase is
the current run's. A line cut short (the script killed mid-write) keeps its phase with no time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.jobfiles import read_job_text

PHASES_FILE = "phases"


@dataclass(frozen=True)
class Phases:
    stamps: tuple[tuple[str, float | None], ...] = ()

    @classmethod
    def read(cls, log_dir: Path, log_root: Path | None = None) -> "Phases":
        """The phases file of ``log_dir``, read as a job file (the job's account owns it)."""
        text = read_job_text(log_root, log_dir / PHASES_FILE)
        return cls.parse(text or "")

    @classmethod
    def parse(cls, text: str) -> "Phases":
        stamps = []
        for line in text.splitlines():
            name, _, stamp = line.partition(" ")
            try:
                stamps.append((name, float(stamp)))
            except ValueError:
                stamps.append((name, None))
        return cls(tuple(stamps))

    @property
    def last(self) -> str | None:
        return self.stamps[-1][0] if self.stamps else None

    def count(self, name: str) -> int:
        """More than one "staging": the script ran again (Slurm requeued the job)."""
        return sum(1 for phase, _ in self.stamps if phase == name)

    def last_time(self, name: str) -> float | None:
        """When the latest run stamped ``name`` (None: never, or the line was cut short)."""
        return next((t for phase, t in reversed(self.stamps) if phase == name), None)
