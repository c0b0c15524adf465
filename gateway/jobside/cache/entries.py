"""A cache entry: its entry.json (written after a fill, loaded and checked before a use), the
verification of its tree against that manifest, its listing and its removal."""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.jobside.cache.model import CacheError, CacheKey
from gateway.jobside.cache.trees import FILE_MODE, File, Tree, rmtree, scan, touch

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
NAME = re.compile(r"[0-9a-f]{64}")


class Corrupt(Exception):
    """An entry failed verification; the message says what was found."""


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    info: dict[str, Any] | None
    last_used: float

    @property
    def bytes(self) -> int:
        return int(self.info["extracted_bytes"]) if self.info else 0


def _is_relative_path(value: object) -> bool:
    if not isinstance(value, str) or not value:
        return False
    # Split by hand: PurePosixPath would quietly normalise "a/./b" and "a//b".
    return "\x00" not in value and all(part not in ("", ".", "..") for part in value.split("/"))


def _valid_info(info: object) -> bool:
    """Whether a parsed entry.json has every field this package relies on, of the right type."""
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


def load(entry: Path) -> dict[str, Any] | None:
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


def verify(entry: Path, info: dict[str, Any], key: CacheKey) -> Tree:
    """Stat every file of the entry against its manifest; raise Corrupt on any difference.

    Only size, mtime_ns, mode and type are compared, never ctime: a hard link into a
    workspace (and the chmod of a fill) changes ctime, not the data.
    """
    if (info["url"], info["etag"], info["size"]) != (key.url, key.bare_etag, key.size):
        raise Corrupt(f"entry.json describes {info['url']} etag {info['etag']} size {info['size']}, not this key")
    tree = entry / "tree"
    try:
        if not stat.S_ISDIR(os.lstat(tree).st_mode):
            raise Corrupt("tree: not a directory")
        dirs, found, others = scan(tree)
    except OSError as exc:
        raise Corrupt(f"tree: {exc}") from exc
    files = []
    for item in info["manifest"]:
        path = item["path"]
        st = found.pop(path, None)
        if st is None:
            raise Corrupt(f"{path}: not a regular file" if path in others or path in dirs else f"{path}: missing")
        if st.st_size != item["size"]:
            raise Corrupt(f"{path}: size {st.st_size} != {item['size']}")
        if st.st_mtime_ns != item["mtime_ns"]:
            raise Corrupt(f"{path}: mtime_ns {st.st_mtime_ns} != {item['mtime_ns']}")
        # Not required for the data to be intact, but a writable cache file means someone
        # (the owning account) opened it up for writing.
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            raise Corrupt(f"{path}: mode {stat.S_IMODE(st.st_mode):o} != {FILE_MODE:o}")
        files.append(File(path, st.st_size, st.st_mtime_ns, FILE_MODE))
    if others:
        raise Corrupt(f"{min(others)}: not a regular file or directory")
    if found:
        raise Corrupt(f"{min(found)}: not in the manifest")
    if dirs != sorted(info["dirs"]):
        extra = sorted(set(dirs) ^ set(info["dirs"]))
        raise Corrupt(f"{extra[0] if extra else 'tree'}: directories differ from the manifest")
    return Tree(dirs, files)


def write_entry(work: Path, key: CacheKey, record: dict[str, Any], tree: Tree) -> None:
    """Write entry.json and last_used next to the fill's tree/ in ``work``."""
    sha256 = record.get("sha256")
    members = record.get("members")
    info = {
        "format": ENTRY_FORMAT,
        "url": key.url,
        "etag": key.bare_etag,
        "size": key.size,
        "sha256": sha256 if isinstance(sha256, str) else None,
        # The manifest's sum, not the fill's word for it: the quota counts what is on disk.
        "extracted_bytes": tree.bytes,
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
    touch(work / "last_used")


def touch_last_used(entry: Path) -> None:
    try:
        touch(entry / "last_used")
    except OSError as exc:  # only the LRU order suffers
        log.warning("cannot update %s: %s", entry / "last_used", exc)


def scan_entries(entries_dir: Path) -> list[Entry]:
    """The entries, least recently used first; ``info`` None for an incomplete one."""
    found = []
    try:
        names = sorted(os.listdir(entries_dir))
    except FileNotFoundError:
        return []
    for name in names:
        if not NAME.fullmatch(name):
            continue
        path = entries_dir / name
        try:
            last_used = os.lstat(path / "last_used").st_mtime
        except OSError:
            try:
                last_used = os.lstat(path).st_mtime
            except OSError:
                continue
        found.append(Entry(name, path, load(path), last_used))
    found.sort(key=lambda entry: (entry.last_used, entry.name))
    return found


def in_use(entry: Path) -> bool:
    """In use: some file of the tree has another link, i.e. a workspace still holds it."""
    try:
        _, files, _ = scan(entry / "tree")
    except OSError:
        return False
    return any(st.st_nlink > 1 for st in files.values())


def discard(name: str, entry: Path, tmp_dir: Path) -> None:
    """Remove an entry (its lock held): first rename it out of entries/, then delete it."""
    if os.path.islink(entry) or not entry.is_dir():
        entry.unlink(missing_ok=True)
        return
    gone = Path(tempfile.mkdtemp(prefix=f"{name}.gone-", dir=tmp_dir))
    try:
        os.chmod(entry, 0o700)  # moving a directory to another parent rewrites its ".."
        # The rename is atomic, so no one sees a half-deleted entry with its entry.json.
        os.rename(entry, gone / "entry")
    except OSError as exc:
        rmtree(gone)
        raise CacheError(f"cannot remove dataset cache entry {entry}: {exc}") from exc
    try:
        rmtree(gone)
    except OSError as exc:  # out of entries/ already; the next filler's sweep retries
        log.warning("cannot delete %s: %s", gone, exc)
