"""What leaves the cache: least recently used entries that no workspace links, when room is needed,
and what dead processes left behind (fills, removals, entries without entry.json)."""
from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.jobside.cache.entries import (
    NAME,
    Entry,
    discard,
    in_use,
    load,
    scan_entries,
)
from gateway.jobside.cache.locks import Held, held_here, lock_path, try_acquire
from gateway.jobside.cache.trees import rmtree, scan

if TYPE_CHECKING:
    from gateway.jobside.cache.store import DatasetCache

log = logging.getLogger(__name__)


def evict(cache: DatasetCache, need_bytes: int, *, all_or_nothing: bool) -> tuple[tuple[str, ...], bool]:
    """Evict LRU entries not in use until need_bytes fit; the quota lock must be held.

    Candidates are those whose lock is free right now (non-blocking: an entry someone is
    using or filling is skipped, and eviction never waits). With ``all_or_nothing`` nothing is
    removed unless that makes room: entries are not thrown away for a fill that cannot be
    kept anyway. Returns (evicted names, whether need_bytes fit now).
    """
    entries = [entry for entry in scan_entries(cache.entries_dir) if entry.info is not None]
    total = sum(entry.bytes for entry in entries)
    chosen: list[tuple[Entry, Held]] = []
    try:
        for entry in entries:
            if total + need_bytes <= cache.quota_bytes:
                break
            held = try_acquire(lock_path(cache.locks_dir, entry.name))
            if held is None:
                continue
            current = load(entry.path)  # it may have changed since the listing
            if current is None:  # gone or broken since: it no longer counts
                held.release()
                total -= entry.bytes
                continue
            if in_use(entry.path):
                held.release()
                total += int(current["extracted_bytes"]) - entry.bytes
                continue
            chosen.append((entry, held))
            total -= entry.bytes
        fits = total + need_bytes <= cache.quota_bytes
        evicted: list[str] = []
        if fits or not all_or_nothing:
            for entry, _ in chosen:
                discard(entry.name, entry.path, cache.tmp_dir)
                evicted.append(entry.name)
                url = entry.info["url"] if entry.info else ""
                log.info("dataset cache evicted %s (%s, %d bytes)", entry.name[:12], url, entry.bytes)
        return tuple(evicted), fits
    finally:
        for _, held in chosen:
            held.release()


def newest_ctime(path: Path) -> float:
    """The newest ctime in a tree: tarfile backdates mtimes to the archive's, but not ctimes."""
    top = os.lstat(path)
    newest = top.st_ctime
    if stat.S_ISDIR(top.st_mode):
        dirs, files, _ = scan(path)
        for relative in dirs:
            newest = max(newest, os.lstat(path / relative).st_ctime)
        for info in files.values():
            newest = max(newest, info.st_ctime)
    return newest


def sweep(cache: DatasetCache, own: str) -> None:
    """Remove what dead processes left: fills and removals in tmp/, entries without entry.json.

    ``own`` is the name of the entry whose lock the caller holds.
    """
    try:
        children = sorted(os.listdir(cache.tmp_dir))
    except FileNotFoundError:
        return
    for child in children:
        name = child.split(".", 1)[0]
        if not NAME.fullmatch(name):
            continue
        path = cache.tmp_dir / child
        if name == own:
            # This call holds the key's lock, so whoever made this is gone.
            _remove_stale(path, "its filler is gone")
            continue
        lock = lock_path(cache.locks_dir, name)
        held = try_acquire(lock)
        if held is not None:
            with held:
                _remove_stale(path, "its lock is free")
        elif not held_here(lock):
            # Held by another process, maybe one whose lock NFS forgot: treat it as dead
            # when nothing in the tree changed for lock_timeout_s.
            try:
                idle = time.time() - newest_ctime(path)
            except OSError:
                continue
            if idle > cache.lock_timeout_s:
                _remove_stale(path, f"nothing changed for {idle:.0f} s")
    for name in sorted(os.listdir(cache.entries_dir)):
        entry = cache.entries_dir / name
        if not NAME.fullmatch(name) or name == own or os.path.lexists(entry / "entry.json"):
            continue  # an unreadable entry.json is left to that key's next use()
        held = try_acquire(lock_path(cache.locks_dir, name))
        if held is None:
            continue
        with held:
            if not os.path.lexists(entry / "entry.json"):  # checked again under its lock
                log.warning("removing incomplete dataset cache entry %s", entry)
                discard(name, entry, cache.tmp_dir)


def _remove_stale(path: Path, why: str) -> None:
    log.warning("removing stale %s (%s)", path, why)
    try:
        rmtree(path)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
