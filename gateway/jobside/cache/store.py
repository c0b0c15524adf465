"""DatasetCache: link a valid entry into a workspace, or fill it once under its key's lock."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.jobside.cache import trees
from gateway.jobside.cache.entries import (
    Corrupt,
    discard,
    in_use,
    load,
    scan_entries,
    touch_last_used,
    verify,
    write_entry,
)
from gateway.jobside.cache.eviction import evict, sweep
from gateway.jobside.cache.locks import QUOTA_LOCK, Held, acquire, lock_path
from gateway.jobside.cache.model import (
    CacheError,
    CacheFull,
    CacheKey,
    CacheUse,
    EntryInfo,
)

log = logging.getLogger(__name__)


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

    def use(self, key: CacheKey, dest: Path, fill: Callable[[Path], dict[str, Any]]) -> CacheUse:
        """Make ``dest`` hold ``key``'s extracted tree: hard links to a valid entry, else fill one.

        ``fill(tree_dir)`` downloads and extracts the object into the empty directory
        ``tree_dir``; whatever it raises propagates, and nothing of that fill is left in the
        cache. CacheFull (before any fill) and CacheError mean: stage without the cache.
        """
        dest = Path(dest)
        created_dest = trees.check_dest(dest, self.root)
        try:
            self._ensure_layout()
            started = time.monotonic()
            with acquire(lock_path(self.locks_dir, key.name), self.lock_timeout_s):
                return self._use_locked(key, dest, fill, time.monotonic() - started)
        except BaseException:
            if created_dest:
                shutil.rmtree(dest, ignore_errors=True)
            raise

    def entries(self) -> list[EntryInfo]:
        """List the entries, least recently used first (a snapshot, without locks)."""
        return [
            EntryInfo(
                name=entry.name,
                url=entry.info["url"] if entry.info else "",
                bytes=entry.bytes,
                last_used=entry.last_used,
                in_use=in_use(entry.path),
                complete=entry.info is not None,
            )
            for entry in scan_entries(self.entries_dir)
        ]

    def evict_unused(self, need_bytes: int) -> tuple[str, ...]:
        """Evict least recently used entries that are not in use until ``need_bytes`` more fit.

        It evicts as much as it can even when that is not enough; returns the evicted names.
        """
        self._ensure_layout()
        with self._quota_lock():
            evicted, _ = evict(self, need_bytes, all_or_nothing=False)
        return evicted

    def _use_locked(self, key: CacheKey, dest: Path, fill: Callable[[Path], dict[str, Any]], waited: float) -> CacheUse:
        name = key.name
        entry = self.entries_dir / name
        refetched: str | None = None
        if os.path.lexists(entry):
            info = load(entry)
            if info is None:
                refetched = "incomplete"
            else:
                try:
                    tree = verify(entry, info, key)
                except Corrupt as exc:
                    refetched = f"corrupt: {exc}"
                else:
                    linked = trees.link(entry / "tree", tree, dest, self.root)
                    touch_last_used(entry)
                    log.info("dataset cache hit %s (%s): %d files linked", name[:12], key.url, linked)
                    return CacheUse(True, key, entry, linked, int(info["extracted_bytes"]), None, None, (), waited)
            # Under this key's lock nobody else can be linking or filling it: safe to replace.
            log.warning("dataset cache entry %s (%s) is %s: removing it and filling again", name[:12], key.url, refetched)
            discard(name, entry, self.tmp_dir)
        return self._fill(key, dest, fill, refetched, waited)

    def _fill(
        self, key: CacheKey, dest: Path, fill: Callable[[Path], dict[str, Any]], refetched: str | None, waited: float
    ) -> CacheUse:
        name = key.name
        entry = self.entries_dir / name
        sweep(self, name)
        # The extracted size is unknown before the fill: make room for the object's size (an
        # estimate; cryo-EM data barely compresses) and check again with the real size after.
        with self._quota_lock():
            evicted, fits = evict(self, key.size, all_or_nothing=True)
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
            trees.rmtree(work)  # whatever fill raised: nothing of it stays in the cache
            raise
        try:
            tree = trees.check_fill(work, tree_dir)
            kept = tree.bytes <= self.quota_bytes
            if not kept:
                # Never kept, however much is evicted; the download is not wasted: move it in.
                log.info("dataset %s: %d extracted bytes exceed the cache quota of %d: not cached", key.url, tree.bytes, self.quota_bytes)
            else:
                trees.freeze(tree_dir, tree)
                write_entry(work, key, record, tree)
                with self._quota_lock():
                    # Under the quota lock, so two fillers of different keys cannot both take the
                    # last free space.
                    more, kept = evict(self, tree.bytes, all_or_nothing=True)
                    evicted += more
                    if kept:
                        os.rename(work, entry)  # atomic: the entry appears complete or not at all
                if not kept:
                    log.info("dataset %s: no room for %d bytes in the cache (entries in use): not cached", key.url, tree.bytes)
                    trees.thaw(tree_dir, tree)
            if not kept:
                trees.move_into(tree_dir, dest)
                trees.rmtree(work)
                return CacheUse(False, key, entry, 0, tree.bytes, record, refetched, evicted, waited, kept=False)
        except OSError as exc:
            # After the fill, an OSError is the cache's own problem (permissions, space, NFS).
            vanished = not os.path.lexists(work)
            trees.rmtree(work)
            if vanished:
                raise CacheError(f"the fill's temporary directory {work} vanished (removed as stale?)") from exc
            raise CacheError(f"cannot store {key.url} in dataset cache {self.root}: {exc}") from exc
        except BaseException:  # a CacheError from the checks included
            trees.rmtree(work)
            raise
        linked = trees.link(entry / "tree", tree, dest, self.root)
        log.info("dataset cache filled %s (%s): %d bytes, %d files linked", name[:12], key.url, tree.bytes, linked)
        return CacheUse(False, key, entry, linked, tree.bytes, record, refetched, evicted, waited)

    def _quota_lock(self) -> Held:
        return acquire(lock_path(self.locks_dir, QUOTA_LOCK), self.lock_timeout_s)

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
