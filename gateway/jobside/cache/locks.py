"""The cache's locks: a POSIX record lock per lock file, behind a thread lock per process.

POSIX record locks (fcntl.lockf) work across nodes on NFS through lockd, unlike flock on some NFS
setups. But they belong to the *process*: a second lock from another thread of the same process
succeeds at once, and closing *any* descriptor of the file drops all of the process's locks on
it. So each lock file also has one threading.Lock per process, taken first: threads exclude each
other through it, and a lock file is never opened (nor closed) by a thread of a process that
already holds it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Self

from gateway.jobside.cache.model import CacheError

QUOTA_LOCK = "quota"

_table_guard = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}


def _reset_after_fork() -> None:
    # Record locks are not inherited by a child process, so neither is the table's view of them.
    global _table_guard
    _table_guard = threading.Lock()
    _thread_locks.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def lock_path(locks_dir: Path, name: str) -> Path:
    """The lock file of entry ``name`` (or of the quota: QUOTA_LOCK) in ``locks_dir``."""
    # Lock files are never removed: a process may be waiting on the old inode, and would hold
    # a lock nobody else sees once a new file took the name.
    return locks_dir / f"{name}.lock"


def _thread_lock(path: Path) -> threading.Lock:
    key = os.path.realpath(path)
    with _table_guard:
        return _thread_locks.setdefault(key, threading.Lock())


class Held:
    """A lock file held by this process: the thread lock and the record lock on ``fd``."""

    def __init__(self, path: Path, fd: int, thread_lock: threading.Lock) -> None:
        self.path = path
        self._fd = fd
        self._thread_lock = thread_lock

    def release(self) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._thread_lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise CacheError(f"cannot open lock {path}: {exc}") from exc


def _record_lock(path: Path, fd: int) -> bool:
    """One try at the record lock: True if taken, False if another process holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        hint = " (on NFS: is lockd running?)" if exc.errno == errno.ENOLCK else ""
        raise CacheError(f"cannot lock {path}: {exc}{hint}") from exc
    return True


def _lock_file(path: Path, thread_lock: threading.Lock, deadline: float | None, timeout_s: float) -> Held | None:
    """With ``thread_lock`` held: take the record lock, polling until ``deadline`` (None: try once).

    On any outcome but a Held, the descriptor is closed and ``thread_lock`` released. Closing is
    safe: the thread lock proves this process held no lock on the file.
    """
    held = None
    fd = -1
    try:
        fd = _open_lock(path)
        delay = 0.01
        # Non-blocking and polled: a blocking F_SETLKW cannot time out, and on NFS a lost lockd
        # reply would hang the job for ever.
        while not _record_lock(path, fd):
            if deadline is None:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CacheError(f"timed out after {timeout_s:g} s waiting for lock {path}")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
        held = Held(path, fd, thread_lock)
        return held
    finally:
        if held is None:
            if fd >= 0:
                os.close(fd)
            thread_lock.release()


def acquire(path: Path, timeout_s: float) -> Held:
    """Take ``path``'s lock exclusively, polling until ``timeout_s``; CacheError names the lock."""
    deadline = time.monotonic() + timeout_s
    thread_lock = _thread_lock(path)
    if not thread_lock.acquire(timeout=max(timeout_s, 0.0)):
        raise CacheError(f"timed out after {timeout_s:g} s waiting for lock {path} (held by this process)")
    held = _lock_file(path, thread_lock, deadline, timeout_s)
    assert held is not None  # with a deadline it returns a Held or raises
    return held


def try_acquire(path: Path) -> Held | None:
    """Take ``path``'s lock if nobody (no process, no thread of this one) holds it; else None."""
    thread_lock = _thread_lock(path)
    if not thread_lock.acquire(blocking=False):
        return None
    return _lock_file(path, thread_lock, None, 0.0)


def held_here(path: Path) -> bool:
    """Whether a thread of this process holds ``path``'s lock (so its holder is alive)."""
    return _thread_lock(path).locked()
