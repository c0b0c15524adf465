"""File trees in the cache: scanned without following links, frozen read-only, linked or moved into a
workspace, and removed even where they are read-only."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.jobside.cache.model import CacheError

FILE_MODE = 0o444
DIR_MODE = 0o555


@dataclass(frozen=True)
class File:
    path: str
    size: int
    mtime_ns: int
    mode: int


@dataclass(frozen=True)
class Tree:
    dirs: list[str]
    files: list[File]

    @property
    def bytes(self) -> int:
        return sum(item.size for item in self.files)


def scan(tree: Path) -> tuple[list[str], dict[str, os.stat_result], list[str]]:
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


def rmtree(path: Path) -> None:
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


def empty(directory: Path) -> None:
    with os.scandir(directory) as listing:
        children = [Path(item.path) for item in listing]
    for child in children:
        rmtree(child)


def touch(path: Path) -> None:
    # Explicit nanosecond times, not UTIME_NOW: the kernel stamps "now" with a coarse clock (a
    # tick, 1-4 ms), which would tie entries used in quick succession in the LRU order.
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now), follow_symlinks=False)
    except FileNotFoundError:
        path.touch(mode=0o600)
        os.utime(path, ns=(now, now), follow_symlinks=False)


def check_dest(dest: Path, cache_root: Path) -> bool:
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
    cache_probe = cache_root if cache_root.exists() else cache_root.parent
    # Checked before any download: hard links cannot cross file systems, and the caller had
    # better stream straight into the workspace than fill a cache it cannot link from.
    if cache_probe.exists() and os.stat(probe).st_dev != os.stat(cache_probe).st_dev:
        raise CacheError(f"dataset cache {cache_root} and workspace {dest} are on different file systems: cannot hard-link")
    if st is None:
        dest.mkdir(parents=True)
        return True
    return False


def check_fill(work: Path, tree_dir: Path) -> Tree:
    """Describe what fill left; refuse anything but regular files and directories."""
    for item in os.listdir(work):
        if item != "tree":
            rmtree(work / item)  # e.g. an extractor's leftover; only tree/ becomes the entry
    if not os.path.lexists(tree_dir) or not stat.S_ISDIR(os.lstat(tree_dir).st_mode):
        raise CacheError(f"the fill left no directory at {tree_dir}")
    dirs, found, others = scan(tree_dir)
    if others:
        # The extractor refuses links and devices; a fill that made one is not cached.
        raise CacheError(f"the fill left {min(others)}, which is neither a regular file nor a directory")
    linked = sorted(path for path, st in found.items() if st.st_nlink != 1)
    if linked:
        # "In use" means "a file has more than one link"; a tree with its own hard links
        # would look in use for ever and never be evicted.
        raise CacheError(f"the fill left {linked[0]} with {found[linked[0]].st_nlink} hard links")
    return Tree(dirs, [File(path, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) for path, st in sorted(found.items())])


def freeze(tree_dir: Path, tree: Tree) -> None:
    # Read-only for everyone: a job's link to a 0444 file it does not own cannot be written.
    for item in tree.files:
        os.chmod(tree_dir / item.path, FILE_MODE)
    for directory in tree.dirs:
        os.chmod(tree_dir / directory, DIR_MODE)
    os.chmod(tree_dir, DIR_MODE)


def thaw(tree_dir: Path, tree: Tree) -> None:
    """Undo freeze for a tree that goes to the job instead: its own, writable files."""
    os.chmod(tree_dir, 0o755)
    for directory in tree.dirs:
        os.chmod(tree_dir / directory, 0o755)
    for item in tree.files:
        os.chmod(tree_dir / item.path, item.mode)


def move_into(tree_dir: Path, dest: Path) -> None:
    """Hand a tree that is not cached to the job by rename (dest is absent or empty)."""
    try:
        os.rename(tree_dir, dest)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise CacheError(f"cannot move {tree_dir} to {dest}: different file systems") from exc
        raise CacheError(f"cannot move {tree_dir} to {dest}: {exc}") from exc


def link(source: Path, tree: Tree, dest: Path, cache_root: Path) -> int:
    """Recreate the tree's directories in dest (writable, the job's) and hard-link each file."""
    try:
        for directory in tree.dirs:
            # Ordinary directories owned by the job: RELION writes its outputs next to the data.
            os.mkdir(dest / directory)
        for item in tree.files:
            # follow_symlinks=False: link what is there (verified a regular file), never a target.
            os.link(source / item.path, dest / item.path, follow_symlinks=False)
    except OSError as exc:
        empty(dest)  # leave dest as it came, so the caller can stage into it instead
        if exc.errno == errno.EXDEV:
            # No silent copy: a copy would double the disk use the cache exists to save.
            raise CacheError(
                f"cannot hard-link from dataset cache {cache_root} into {dest}: they are on different file systems"
            ) from exc
        raise CacheError(f"cannot hard-link {exc.filename} into {dest}: {exc}") from exc
    return len(tree.files)
