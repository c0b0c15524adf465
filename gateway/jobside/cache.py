"""A job-side dataset cache on storage the compute nodes share (``[job] cache_dir``).

The first job that needs a dataset fills an entry (downloads and extracts it once); later jobs
hard-link the entry's files into their workspace: no copy, and no job ever writes into the cache.

Layout under ``root``::

    entries/<name>/tree/        the extracted files (files 0444, directories 0555)
    entries/<name>/entry.json   url, etag, size, sha256, extracted_bytes, members, created_at, manifest
    entries/<name>/last_used    its mtime orders eviction (least recently used first)
    locks/<name>.lock           one POSIX record lock per entry; locks/quota.lock for the quota
    tmp/<name>.fill-<random>/   fills in progress; tmp/<name>.gone-<random>/ entries being removed

``<name>`` is :attr:`CacheKey.name`. An entry appears in ``entries/`` only by one atomic rename of
a finished fill, so an entry without a readable entry.json is incomplete and never used.

The limit of the protection: cached files are 0444 and owned by the account that filled them, so
a job cannot write through its links, but a job running as that same account could chmod a linked
file and then write it. The cache must therefore be partitioned per job account (the caller
passes ``root = cache_dir/<account>``), so one account can only ever damage its own jobs' data;
verification on every use catches what such a change leaves behind (size, mtime, mode, extra or
missing files), not a deliberate rewrite that restores size, mode and mtime. Per-account
partitions are also what Linux's ``fs.protected_hardlinks`` needs: only a file's owner may
hard-link a file it cannot write.

The quota counts the extracted bytes of complete entries. Before a fill the cache makes room for
the object's size (the extracted size is not known yet) and raises CacheFull, before any
download, when even evicting every unused entry would not make room: the caller then stages
straight into the workspace. After the fill it makes room for the real size; a tree that still
does not fit (bigger than the quota, or the space is held by entries in use) is not cached but
moved into the workspace (``CacheUse.kept`` False), since it is downloaded already. Entries are
evicted only when that makes room, never for a fill that cannot be kept anyway.

Standard library only: this runs in the jobs under ``python -I``.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
FILE_MODE = 0o444
DIR_MODE = 0o555
_NAME = re.compile(r"[0-9a-f]{64}")
_QUOTA_LOCK = "quota"


class CacheError(Exception):
    """The cache cannot be used (not a problem with the dataset); stage without the cache."""


class CacheFull(CacheError):
    """The entry cannot fit even after evicting every unused entry; stage without the cache."""


class _Corrupt(Exception):
    """An entry failed verification; the message says what was found."""


@dataclass(frozen=True)
class CacheKey:
    """One S3 object version: an entry is reused only for the same url, ETag and size."""

    url: str
    etag: str
    size: int

    def __post_init__(self) -> None:
        # The name hashes "url\netag\nsize": a newline inside a field would make two keys collide.
        if "\n" in self.url or "\n" in self.etag:
            raise ValueError("a cache key's url and etag may not contain a newline")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"a cache key's size must be a non-negative integer, not {self.size!r}")

    @property
    def bare_etag(self) -> str:
        """The ETag without the quotes S3 puts around it (HEAD and GET may differ in quoting)."""
        return self.etag.strip('"')

    @property
    def name(self) -> str:
        """The entry's directory name: sha256 hex of ``url\\netag\\nsize``."""
        canonical = f"{self.url}\n{self.bare_etag}\n{self.size}"
        return hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class CacheUse:
    """What :meth:`DatasetCache.use` did.

    ``kept`` is False when the fill was not kept in the cache (its extracted tree is bigger than
    the quota, or no room could be made after the fill): the tree was then moved (renamed) into
    ``dest`` instead of linked, ``linked_files`` is 0 and ``entry`` does not exist.
    """

    hit: bool
    key: CacheKey
    entry: Path
    linked_files: int
    bytes: int
    fill: dict[str, Any] | None
    refetched: str | None
    evicted: tuple[str, ...]
    waited_s: float
    kept: bool = True


@dataclass(frozen=True)
class EntryInfo:
    """One entry as :meth:`DatasetCache.entries` saw it (a snapshot, taken without locks)."""

    name: str
    url: str
    bytes: int
    last_used: float
    in_use: bool
    complete: bool


@dataclass(frozen=True)
class _File:
    path: str
    size: int
    mtime_ns: int
    mode: int


@dataclass(frozen=True)
class _Tree:
    dirs: list[str]
    files: list[_File]


@dataclass(frozen=True)
class _Entry:
    name: str
    path: Path
    info: dict[str, Any] | None
    last_used: float

    @property
    def bytes(self) -> int:
        return int(self.info["extracted_bytes"]) if self.info else 0


# --- locks -------------------------------------------------------------------------------------
# POSIX record locks (fcntl.lockf) work across nodes on NFS through lockd, unlike flock on some NFS
# setups. But they belong to the *process*: a second lock from another thread of the same process
# succeeds at once, and closing *any* descriptor of the file drops all of the process's locks on
# it. So each lock file also has one threading.Lock per process, taken first: threads exclude each
# other through it, and a lock file is never opened (nor closed) by a thread of a process that
# already holds it.

_table_guard = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}


def _reset_after_fork() -> None:
    # Record locks are not inherited by a child process, so neither is the table's view of them.
    global _table_guard
    _table_guard = threading.Lock()
    _thread_locks.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def _thread_lock(key: str) -> threading.Lock:
    with _table_guard:
        return _thread_locks.setdefault(key, threading.Lock())


class _Held:
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


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise CacheError(f"cannot open lock {path}: {exc}") from exc


def _lock_errno_is_busy(exc: OSError) -> bool:
    return exc.errno in (errno.EACCES, errno.EAGAIN)


def _lock_failed(path: Path, exc: OSError) -> CacheError:
    hint = " (on NFS: is lockd running?)" if exc.errno == errno.ENOLCK else ""
    return CacheError(f"cannot lock {path}: {exc}{hint}")


def _acquire(path: Path, timeout_s: float) -> _Held:
    """Take ``path``'s lock exclusively, polling until ``timeout_s``; CacheError names the lock."""
    deadline = time.monotonic() + timeout_s
    thread_lock = _thread_lock(os.path.realpath(path))
    if not thread_lock.acquire(timeout=max(timeout_s, 0.0)):
        raise CacheError(f"timed out after {timeout_s:g} s waiting for lock {path} (held by this process)")
    fd = -1
    try:
        fd = _open_lock(path)
        delay = 0.01
        while True:
            try:
                # Non-blocking and polled: a blocking F_SETLKW cannot time out, and on NFS a lost
                # lockd reply would hang the job for ever.
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return _Held(path, fd, thread_lock)
            except OSError as exc:
                if not _lock_errno_is_busy(exc):
                    raise _lock_failed(path, exc) from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CacheError(f"timed out after {timeout_s:g} s waiting for lock {path}")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        thread_lock.release()
        raise


def _try_acquire(path: Path) -> _Held | None:
    """Take ``path``'s lock if nobody (no process, no thread of this one) holds it; else None."""
    thread_lock = _thread_lock(os.path.realpath(path))
    if not thread_lock.acquire(blocking=False):
        return None
    try:
        fd = _open_lock(path)
    except BaseException:
        thread_lock.release()
        raise
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        # Closing is safe: the thread lock proves this process held no lock on the file.
        os.close(fd)
        thread_lock.release()
        if _lock_errno_is_busy(exc):
            return None
        raise _lock_failed(path, exc) from exc
    return _Held(path, fd, thread_lock)


def _held_here(path: Path) -> bool:
    """Whether a thread of this process holds ``path``'s lock (so its holder is alive)."""
    return _thread_lock(os.path.realpath(path)).locked()


# --- trees -------------------------------------------------------------------------------------


def _scan(tree: Path) -> tuple[list[str], dict[str, os.stat_result], list[str]]:
    """Walk ``tree`` without following links: (directories, regular files' lstat, anything else)."""
    dirs: list[str] = []
    files: dict[str, os.stat_result] = {}
    others: list[str] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(tree / relative if relative else tree) as listing:
            for item in listing:
                child = f"{relative}/{item.name}" if relative else item.name
                if item.is_dir(follow_symlinks=False):
                    dirs.append(child)
                    pending.append(child)
                elif item.is_file(follow_symlinks=False):
                    files[child] = item.stat(follow_symlinks=False)
                else:
                    others.append(child)
    dirs.sort()  # a parent sorts before everything below it, so mkdir can follow this order
    return dirs, files, others


def _is_relative_path(value: object) -> bool:
    if not isinstance(value, str) or not value:
        return False
    # Split by hand: PurePosixPath would quietly normalise "a/./b" and "a//b".
    return "\x00" not in value and all(part not in ("", ".", "..") for part in value.split("/"))


def _valid_info(info: object) -> bool:
    """Whether a parsed entry.json has every field this module relies on, of the right type."""
    if not isinstance(info, dict):
        return False
    if not (isinstance(info.get("url"), str) and isinstance(info.get("etag"), str)):
        return False
    if not all(isinstance(info.get(field), int) for field in ("size", "extracted_bytes")):
        return False
    manifest, dirs = info.get("manifest"), info.get("dirs")
    if not isinstance(manifest, list) or not isinstance(dirs, list):
        return False
    for item in manifest:
        if not isinstance(item, dict) or not _is_relative_path(item.get("path")):
            return False
        if not all(isinstance(item.get(field), int) for field in ("size", "mtime_ns")):
            return False
    return all(_is_relative_path(directory) for directory in dirs)


def _newest_ctime(path: Path) -> float:
    """The newest ctime in a tree: tarfile backdates mtimes to the archive's, but not ctimes."""
    top = os.lstat(path)
    newest = top.st_ctime
    if stat.S_ISDIR(top.st_mode):
        dirs, files, _ = _scan(path)
        for relative in dirs:
            newest = max(newest, os.lstat(path / relative).st_ctime)
        for info in files.values():
            newest = max(newest, info.st_ctime)
    return newest


def _rmtree(path: Path) -> None:
    """Remove a tree even where it is read-only (cache trees are 0555); never follow a link."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        path.unlink(missing_ok=True)
        return
    # rmtree needs write permission on each directory to delete its children.
    pending = [path]
    while pending:
        directory = pending.pop()
        try:
            os.chmod(directory, 0o700)
        except OSError:
            pass  # not ours, or gone: rmtree reports what really stops it
        try:
            with os.scandir(directory) as listing:
                pending.extend(Path(item.path) for item in listing if item.is_dir(follow_symlinks=False))
        except OSError:
            continue

    def ignore_vanished(function: Callable[..., Any], failed: str, info: Any) -> None:
        # Two cleaners (a stale-tmp sweep and the remover itself) may race over the same tree.
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    shutil.rmtree(path, onerror=ignore_vanished)


def _touch(path: Path) -> None:
    # Explicit nanosecond times, not UTIME_NOW: the kernel stamps "now" with a coarse clock (a
    # tick, 1-4 ms), which would tie entries used in quick succession in the LRU order.
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now), follow_symlinks=False)
    except FileNotFoundError:
        path.touch(mode=0o600)
        os.utime(path, ns=(now, now), follow_symlinks=False)


class DatasetCache:
    """A size-bounded cache of extracted datasets, shared by jobs of one account across nodes."""

    def __init__(self, root: Path, quota_bytes: int, *, lock_timeout_s: float = 3600.0) -> None:
        if quota_bytes < 0:
            raise ValueError(f"quota_bytes must be >= 0, not {quota_bytes}")
        if lock_timeout_s <= 0:
            raise ValueError(f"lock_timeout_s must be > 0, not {lock_timeout_s}")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.lock_timeout_s = lock_timeout_s
        self.entries_dir = self.root / "entries"
        self.locks_dir = self.root / "locks"
        self.tmp_dir = self.root / "tmp"

    # --- public --------------------------------------------------------------------------------

    def use(self, key: CacheKey, dest: Path, fill: Callable[[Path], dict[str, Any]]) -> CacheUse:
        """Make ``dest`` hold ``key``'s extracted tree: hard links to a valid entry, else fill one.

        ``fill(tree_dir)`` downloads and extracts the object into the empty directory
        ``tree_dir``; whatever it raises propagates, and nothing of that fill is left in the
        cache. CacheFull (before any fill) and CacheError mean: stage without the cache.
        """
        dest = Path(dest)
        created_dest = self._check_dest(dest)
        try:
            self._ensure_layout()
            name = key.name
            started = time.monotonic()
            held = _acquire(self._lock_path(name), self.lock_timeout_s)
            waited = time.monotonic() - started
            try:
                return self._use_locked(key, dest, fill, waited)
            finally:
                held.release()
        except BaseException:
            if created_dest:
                shutil.rmtree(dest, ignore_errors=True)
            raise

    def entries(self) -> list[EntryInfo]:
        """List the entries, least recently used first (a snapshot, without locks)."""
        listed = []
        for entry in self._scan_entries():
            listed.append(
                EntryInfo(
                    name=entry.name,
                    url=entry.info["url"] if entry.info else "",
                    bytes=entry.bytes,
                    last_used=entry.last_used,
                    in_use=self._in_use(entry.path),
                    complete=entry.info is not None,
                )
            )
        return listed

    def evict_unused(self, need_bytes: int) -> tuple[str, ...]:
        """Evict least recently used entries that are not in use until ``need_bytes`` more fit.

        It evicts as much as it can even when that is not enough; returns the evicted names.
        """
        self._ensure_layout()
        quota = _acquire(self._lock_path(_QUOTA_LOCK), self.lock_timeout_s)
        try:
            evicted, _ = self._evict(need_bytes, all_or_nothing=False)
        finally:
            quota.release()
        return evicted

    # --- use() in steps ------------------------------------------------------------------------

    def _use_locked(self, key: CacheKey, dest: Path, fill: Callable[[Path], dict[str, Any]], waited: float) -> CacheUse:
        name = key.name
        entry = self.entries_dir / name
        refetched: str | None = None
        if os.path.lexists(entry):
            info = self._load(entry)
            if info is None:
                refetched = "incomplete"
            else:
                try:
                    tree = self._verify(entry, info, key)
                except _Corrupt as exc:
                    refetched = f"corrupt: {exc}"
                else:
                    linked = self._link(entry / "tree", tree, dest)
                    self._touch_last_used(entry)
                    log.info("dataset cache hit %s (%s): %d files linked", name[:12], key.url, linked)
                    return CacheUse(True, key, entry, linked, int(info["extracted_bytes"]), None, None, (), waited)
            # Under this key's lock nobody else can be linking or filling it: safe to replace.
            log.warning("dataset cache entry %s (%s) is %s: removing it and filling again", name[:12], key.url, refetched)
            self._discard(name, entry)
        return self._fill(key, dest, fill, refetched, waited)

    def _fill(
        self, key: CacheKey, dest: Path, fill: Callable[[Path], dict[str, Any]], refetched: str | None, waited: float
    ) -> CacheUse:
        name = key.name
        entry = self.entries_dir / name
        self._sweep(name)
        # The extracted size is unknown before the fill: make room for the object's size (an
        # estimate; cryo-EM data barely compresses) and check again with the real size after.
        quota = _acquire(self._lock_path(_QUOTA_LOCK), self.lock_timeout_s)
        try:
            evicted, fits = self._evict(key.size, all_or_nothing=True)
        finally:
            quota.release()
        if not fits:
            # Before any download: the caller streams straight into the workspace instead, which
            # costs the same and never writes past the quota on the shared file system.
            why = "bigger than the quota" if key.size > self.quota_bytes else "entries in use fill the quota"
            raise CacheFull(f"dataset cache {self.root} cannot hold {key.url} ({key.size} bytes): {why} of {self.quota_bytes} bytes")
        try:
            work = Path(tempfile.mkdtemp(prefix=f"{name}.fill-", dir=self.tmp_dir))
        except OSError as exc:
            raise CacheError(f"cannot start a fill in {self.tmp_dir}: {exc}") from exc
        tree_dir = work / "tree"
        try:
            tree_dir.mkdir()
            record = dict(fill(tree_dir))
        except BaseException:
            _rmtree(work)  # whatever fill raised: nothing of it stays in the cache
            raise
        try:
            tree, sizes = self._check_fill(work, tree_dir)
            extracted = sum(sizes)
            if extracted > self.quota_bytes:
                # Never kept, however much is evicted; the download is not wasted: move it in.
                log.info("dataset %s: %d extracted bytes exceed the cache quota of %d: not cached", key.url, extracted, self.quota_bytes)
                self._move_into(tree_dir, dest)
                _rmtree(work)
                return CacheUse(False, key, entry, 0, extracted, record, refetched, evicted, waited, kept=False)
            self._freeze(tree_dir, tree)
            self._write_entry(work, key, record, tree, extracted)
            quota = _acquire(self._lock_path(_QUOTA_LOCK), self.lock_timeout_s)
            try:
                # Under the quota lock, so two fillers of different keys cannot both take the
                # last free space.
                more, fits = self._evict(extracted, all_or_nothing=True)
                evicted += more
                if fits:
                    os.rename(work, entry)  # atomic: the entry appears complete or not at all
            finally:
                quota.release()
            if not fits:
                log.info("dataset %s: no room for %d bytes in the cache (entries in use): not cached", key.url, extracted)
                self._thaw(tree_dir, tree)
                self._move_into(tree_dir, dest)
                _rmtree(work)
                return CacheUse(False, key, entry, 0, extracted, record, refetched, evicted, waited, kept=False)
        except CacheError:
            _rmtree(work)
            raise
        except OSError as exc:
            # After the fill, an OSError is the cache's own problem (permissions, space, NFS).
            vanished = not os.path.lexists(work)
            _rmtree(work)
            if vanished:
                raise CacheError(f"the fill's temporary directory {work} vanished (removed as stale?)") from exc
            raise CacheError(f"cannot store {key.url} in dataset cache {self.root}: {exc}") from exc
        except BaseException:
            _rmtree(work)
            raise
        linked = self._link(entry / "tree", tree, dest)
        log.info("dataset cache filled %s (%s): %d bytes, %d files linked", name[:12], key.url, extracted, linked)
        return CacheUse(False, key, entry, linked, extracted, record, refetched, evicted, waited)

    # --- checks --------------------------------------------------------------------------------

    def _check_dest(self, dest: Path) -> bool:
        """Refuse a dest that is not absent or an empty directory; return True if one was made."""
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise ValueError(f"{dest} exists and is not a directory")
            with os.scandir(dest) as listing:
                occupied = any(True for _ in listing)
            if occupied:
                raise ValueError(f"{dest} is not empty")
        probe = dest if st is not None else dest.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        cache_probe = self.root if self.root.exists() else self.root.parent
        # Checked before any download: hard links cannot cross file systems, and the caller had
        # better stream straight into the workspace than fill a cache it cannot link from.
        if cache_probe.exists() and os.stat(probe).st_dev != os.stat(cache_probe).st_dev:
            raise CacheError(f"dataset cache {self.root} and workspace {dest} are on different file systems: cannot hard-link")
        if st is None:
            dest.mkdir(parents=True)
            return True
        return False

    def _ensure_layout(self) -> None:
        if not self.root.parent.is_dir():
            # A missing cache_dir is an unmounted shared file system far more often than a wish
            # for a node-local cache: refuse rather than fill the node's own disk.
            raise CacheError(f"dataset cache directory {self.root.parent} does not exist (is the shared file system mounted?)")
        try:
            for directory in (self.root, self.entries_dir, self.locks_dir, self.tmp_dir):
                # 0700: another account has no business reading this account's datasets; the jobs
                # reach the files through their own links, not through these directories.
                directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot set up dataset cache {self.root}: {exc}") from exc

    def _lock_path(self, name: str) -> Path:
        # Lock files are never removed: a process may be waiting on the old inode, and would hold
        # a lock nobody else sees once a new file took the name.
        return self.locks_dir / f"{name}.lock"

    def _load(self, entry: Path) -> dict[str, Any] | None:
        """The entry's entry.json, or None when it is missing, unreadable or malformed."""
        try:
            if not stat.S_ISDIR(os.lstat(entry).st_mode):
                return None
            fd = os.open(entry / "entry.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as handle:
                info = json.loads(handle.read())
        except (OSError, ValueError):
            return None
        return info if _valid_info(info) else None

    def _verify(self, entry: Path, info: dict[str, Any], key: CacheKey) -> _Tree:
        """Stat every file of the entry against its manifest; raise _Corrupt on any difference.

        Only size, mtime_ns, mode and type are compared, never ctime: a hard link into a
        workspace (and the chmod of a fill) changes ctime, not the data.
        """
        if (info["url"], info["etag"], info["size"]) != (key.url, key.bare_etag, key.size):
            raise _Corrupt(f"entry.json describes {info['url']} etag {info['etag']} size {info['size']}, not this key")
        tree = entry / "tree"
        try:
            if not stat.S_ISDIR(os.lstat(tree).st_mode):
                raise _Corrupt("tree: not a directory")
            dirs, found, others = _scan(tree)
        except OSError as exc:
            raise _Corrupt(f"tree: {exc}") from exc
        files = []
        for item in info["manifest"]:
            path = item["path"]
            st = found.pop(path, None)
            if st is None:
                raise _Corrupt(f"{path}: not a regular file" if path in others or path in dirs else f"{path}: missing")
            if st.st_size != item["size"]:
                raise _Corrupt(f"{path}: size {st.st_size} != {item['size']}")
            if st.st_mtime_ns != item["mtime_ns"]:
                raise _Corrupt(f"{path}: mtime_ns {st.st_mtime_ns} != {item['mtime_ns']}")
            # Not required for the data to be intact, but a writable cache file means someone
            # (the owning account) opened it up for writing.
            if stat.S_IMODE(st.st_mode) != FILE_MODE:
                raise _Corrupt(f"{path}: mode {stat.S_IMODE(st.st_mode):o} != {FILE_MODE:o}")
            files.append(_File(path, st.st_size, st.st_mtime_ns, FILE_MODE))
        if others:
            raise _Corrupt(f"{min(others)}: not a regular file or directory")
        if found:
            raise _Corrupt(f"{min(found)}: not in the manifest")
        if dirs != sorted(info["dirs"]):
            extra = sorted(set(dirs) ^ set(info["dirs"]))
            raise _Corrupt(f"{extra[0] if extra else 'tree'}: directories differ from the manifest")
        return _Tree(dirs, files)

    def _check_fill(self, work: Path, tree_dir: Path) -> tuple[_Tree, list[int]]:
        """Describe what fill left; refuse anything but regular files and directories."""
        for item in os.listdir(work):
            if item != "tree":
                _rmtree(work / item)  # e.g. an extractor's leftover; only tree/ becomes the entry
        if not os.path.lexists(tree_dir) or not stat.S_ISDIR(os.lstat(tree_dir).st_mode):
            raise CacheError(f"the fill left no directory at {tree_dir}")
        dirs, found, others = _scan(tree_dir)
        if others:
            # The extractor refuses links and devices; a fill that made one is not cached.
            raise CacheError(f"the fill left {min(others)}, which is neither a regular file nor a directory")
        linked = sorted(path for path, st in found.items() if st.st_nlink != 1)
        if linked:
            # "In use" means "a file has more than one link"; a tree with its own hard links
            # would look in use for ever and never be evicted.
            raise CacheError(f"the fill left {linked[0]} with {found[linked[0]].st_nlink} hard links")
        files = [_File(path, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) for path, st in sorted(found.items())]
        return _Tree(dirs, files), [item.size for item in files]

    # --- filling -------------------------------------------------------------------------------

    def _freeze(self, tree_dir: Path, tree: _Tree) -> None:
        # Read-only for everyone: a job's link to a 0444 file it does not own cannot be written.
        for item in tree.files:
            os.chmod(tree_dir / item.path, FILE_MODE)
        for directory in tree.dirs:
            os.chmod(tree_dir / directory, DIR_MODE)
        os.chmod(tree_dir, DIR_MODE)

    def _thaw(self, tree_dir: Path, tree: _Tree) -> None:
        """Undo _freeze for a tree that goes to the job instead: its own, writable files."""
        os.chmod(tree_dir, 0o755)
        for directory in tree.dirs:
            os.chmod(tree_dir / directory, 0o755)
        for item in tree.files:
            os.chmod(tree_dir / item.path, item.mode)

    def _write_entry(self, work: Path, key: CacheKey, record: dict[str, Any], tree: _Tree, extracted: int) -> None:
        sha256 = record.get("sha256")
        members = record.get("members")
        info = {
            "format": ENTRY_FORMAT,
            "url": key.url,
            "etag": key.bare_etag,
            "size": key.size,
            "sha256": sha256 if isinstance(sha256, str) else None,
            # The manifest's sum, not the fill's word for it: the quota counts what is on disk.
            "extracted_bytes": extracted,
            "members": members if isinstance(members, int) else len(tree.files) + len(tree.dirs),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "dirs": tree.dirs,
            "manifest": [{"path": item.path, "size": item.size, "mtime_ns": item.mtime_ns} for item in tree.files],
        }
        path = work / "entry.json"
        with open(path, "x", encoding="utf-8") as handle:
            json.dump(info, handle, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())  # the rename publishes it: it must be whole by then
        os.chmod(path, FILE_MODE)
        _touch(work / "last_used")

    def _move_into(self, tree_dir: Path, dest: Path) -> None:
        """Hand a tree that is not cached to the job by rename (dest is absent or empty)."""
        try:
            os.rename(tree_dir, dest)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise CacheError(f"cannot move {tree_dir} to {dest}: different file systems") from exc
            raise CacheError(f"cannot move {tree_dir} to {dest}: {exc}") from exc

    def _link(self, source: Path, tree: _Tree, dest: Path) -> int:
        """Recreate the tree's directories in dest (writable, the job's) and hard-link each file."""
        try:
            for directory in tree.dirs:
                # Ordinary directories owned by the job: RELION writes its outputs next to the data.
                os.mkdir(dest / directory)
            for item in tree.files:
                # follow_symlinks=False: link what is there (verified a regular file), never a target.
                os.link(source / item.path, dest / item.path, follow_symlinks=False)
        except OSError as exc:
            self._empty(dest)  # leave dest as it came, so the caller can stage into it instead
            if exc.errno == errno.EXDEV:
                # No silent copy: a copy would double the disk use the cache exists to save.
                raise CacheError(
                    f"cannot hard-link from dataset cache {self.root} into {dest}: they are on different file systems"
                ) from exc
            raise CacheError(f"cannot hard-link {exc.filename} into {dest}: {exc}") from exc
        return len(tree.files)

    @staticmethod
    def _empty(dest: Path) -> None:
        with os.scandir(dest) as listing:
            children = [Path(item.path) for item in listing]
        for child in children:
            _rmtree(child)

    def _touch_last_used(self, entry: Path) -> None:
        try:
            _touch(entry / "last_used")
        except OSError as exc:  # only the LRU order suffers
            log.warning("cannot update %s: %s", entry / "last_used", exc)

    # --- removal and eviction ------------------------------------------------------------------

    def _discard(self, name: str, entry: Path) -> None:
        """Remove an entry (its lock held): first rename it out of entries/, then delete it."""
        if os.path.islink(entry) or not entry.is_dir():
            entry.unlink(missing_ok=True)
            return
        gone = Path(tempfile.mkdtemp(prefix=f"{name}.gone-", dir=self.tmp_dir))
        try:
            os.chmod(entry, 0o700)  # moving a directory to another parent rewrites its ".."
            # The rename is atomic, so no one sees a half-deleted entry with its entry.json.
            os.rename(entry, gone / "entry")
        except OSError as exc:
            _rmtree(gone)
            raise CacheError(f"cannot remove dataset cache entry {entry}: {exc}") from exc
        try:
            _rmtree(gone)
        except OSError as exc:  # out of entries/ already; the next filler's sweep retries
            log.warning("cannot delete %s: %s", gone, exc)

    def _scan_entries(self) -> list[_Entry]:
        found = []
        try:
            names = sorted(os.listdir(self.entries_dir))
        except FileNotFoundError:
            return []
        for name in names:
            if not _NAME.fullmatch(name):
                continue
            path = self.entries_dir / name
            try:
                last_used = os.lstat(path / "last_used").st_mtime
            except OSError:
                try:
                    last_used = os.lstat(path).st_mtime
                except OSError:
                    continue
            found.append(_Entry(name, path, self._load(path), last_used))
        found.sort(key=lambda entry: (entry.last_used, entry.name))
        return found

    @staticmethod
    def _in_use(entry: Path) -> bool:
        """In use: some file of the tree has another link, i.e. a workspace still holds it."""
        try:
            _, files, _ = _scan(entry / "tree")
        except OSError:
            return False
        return any(st.st_nlink > 1 for st in files.values())

    def _evict(self, need_bytes: int, *, all_or_nothing: bool) -> tuple[tuple[str, ...], bool]:
        """Evict LRU entries not in use until need_bytes fit; the quota lock must be held.

        Candidates are those whose lock is free right now (non-blocking: an entry someone is
        using or filling is skipped, and eviction never waits). With ``all_or_nothing`` nothing is
        removed unless that makes room: entries are not thrown away for a fill that cannot be
        kept anyway. Returns (evicted names, whether need_bytes fit now).
        """
        entries = [entry for entry in self._scan_entries() if entry.info is not None]
        total = sum(entry.bytes for entry in entries)
        chosen: list[tuple[_Entry, _Held]] = []
        try:
            for entry in entries:
                if total + need_bytes <= self.quota_bytes:
                    break
                held = _try_acquire(self._lock_path(entry.name))
                if held is None:
                    continue
                current = self._load(entry.path)  # it may have changed since the listing
                if current is None:  # gone or broken since: it no longer counts
                    held.release()
                    total -= entry.bytes
                    continue
                if self._in_use(entry.path):
                    held.release()
                    total += int(current["extracted_bytes"]) - entry.bytes
                    continue
                chosen.append((entry, held))
                total -= entry.bytes
            fits = total + need_bytes <= self.quota_bytes
            evicted: list[str] = []
            if fits or not all_or_nothing:
                for entry, _ in chosen:
                    self._discard(entry.name, entry.path)
                    evicted.append(entry.name)
                    log.info("dataset cache evicted %s (%s, %d bytes)", entry.name[:12], entry.info["url"] if entry.info else "", entry.bytes)
            return tuple(evicted), fits
        finally:
            for _, held in chosen:
                held.release()

    def _sweep(self, own: str) -> None:
        """Remove what dead processes left: fills and removals in tmp/, entries without entry.json."""
        try:
            children = sorted(os.listdir(self.tmp_dir))
        except FileNotFoundError:
            return
        for child in children:
            name = child.split(".", 1)[0]
            if not _NAME.fullmatch(name):
                continue
            path = self.tmp_dir / child
            if name == own:
                # This call holds the key's lock, so whoever made this is gone.
                self._remove_stale(path, "its filler is gone")
                continue
            lock = self._lock_path(name)
            held = _try_acquire(lock)
            if held is not None:
                try:
                    self._remove_stale(path, "its lock is free")
                finally:
                    held.release()
            elif not _held_here(lock):
                # Held by another process, maybe one whose lock NFS forgot: treat it as dead
                # when nothing in the tree changed for lock_timeout_s.
                try:
                    idle = time.time() - _newest_ctime(path)
                except OSError:
                    continue
                if idle > self.lock_timeout_s:
                    self._remove_stale(path, f"nothing changed for {idle:.0f} s")
        for name in sorted(os.listdir(self.entries_dir)):
            entry = self.entries_dir / name
            if not _NAME.fullmatch(name) or name == own or os.path.lexists(entry / "entry.json"):
                continue  # an unreadable entry.json is left to that key's next use()
            held = _try_acquire(self._lock_path(name))
            if held is None:
                continue
            try:
                if not os.path.lexists(entry / "entry.json"):  # checked again under its lock
                    log.warning("removing incomplete dataset cache entry %s", entry)
                    self._discard(name, entry)
            finally:
                held.release()

    @staticmethod
    def _remove_stale(path: Path, why: str) -> None:
        log.warning("removing stale %s (%s)", path, why)
        try:
            _rmtree(path)
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)

