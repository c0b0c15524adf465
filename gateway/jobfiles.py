"""The one way the gateway reads a file a job wrote: below the log root, never through a job's symlink.

A job's log directory belongs to the job's account (gateway.jobs.dirs), and the job is hostile
code's neighbour: it can replace ``main-<id>.err``, ``progress.json`` or ``metadata.json`` with a
symlink to a file only the gateway may read (its callback key, its store) and wait for the gateway
to read it back into a job's message or a log download. So every component below the gateway's
log root is opened with O_NOFOLLOW, relative to the directory above it, the file must be a regular
file of bounded size, and a FIFO planted under the name cannot hang the reader (O_NONBLOCK).
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

# Far above any log, progress or metadata file a job writes; a larger one is not read at all.
MAX_JOB_FILE_BYTES = 64 * 1024 * 1024


def split_below(log_root: Path | None, path: Path) -> tuple[Path, tuple[str, ...]]:
    """The gateway's own directory to start from and the job's components below it.

    Records from before a change of [paths] log_root keep their old directory: its last three
    components (<user>/<job_id>/<file>) are the job's, as make_job_dirs made them.
    """
    if log_root is not None and path.is_relative_to(log_root):
        return log_root, path.relative_to(log_root).parts
    depth = min(3, len(path.parts) - 1)  # a shallow path (tests, odd records): as deep as it goes
    return path.parents[depth - 1], path.parts[-depth:]


def read_job_file(log_root: Path | None, path: Path, limit: int = MAX_JOB_FILE_BYTES) -> bytes | None:
    """``path``'s bytes, or None when it is missing, not a regular file, too large or behind a symlink."""
    root, below = split_below(log_root, path)
    if not below:
        return None
    fds: list[int] = []
    try:
        # O_PATH: a directory is only walked through, which needs search (x), not read, permission;
        # the job side reads its own files below a log root that others may only traverse (0711).
        fds.append(os.open(root, os.O_PATH | os.O_DIRECTORY))
        for part in below[:-1]:
            fds.append(os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        fds.append(os.open(below[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1]))
        info = os.fstat(fds[-1])
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            log.warning("%s is not a regular file of at most %d bytes: not read", path, limit)
            return None
        with os.fdopen(fds[-1], "rb", closefd=False) as stream:
            data = stream.read(limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None  # not there (yet, or any more), or a symlink where a directory or the file should be
    finally:
        for opened in reversed(fds):
            os.close(opened)


def read_job_text(log_root: Path | None, path: Path, limit: int = MAX_JOB_FILE_BYTES) -> str | None:
    data = read_job_file(log_root, path, limit)
    return None if data is None else data.decode(errors="replace")
