"""Safe streaming extraction of a dataset tarball.

Python's ``data`` filter is the floor: on 3.11 before 3.11.13 it has link-based bypasses
(CVE-2025-4517 and friends, shared notes), and cryo-EM inputs need only files and directories,
so anything else is refused. A size quota and a member count are checked on each header before
its data is read, so a tar bomb stops at once. Extraction goes into ``<dest>.partial`` and is
renamed only when complete; on any error the partial tree is removed.
"""
from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


class UnsafeArchiveError(tarfile.FilterError):
    """A member was refused; the message names it and the rule."""

    def __init__(self, member: tarfile.TarInfo, rule: str) -> None:
        super().__init__(member)
        self.tarinfo = member
        self.rule = rule

    def __str__(self) -> str:
        return f"refused archive member {self.tarinfo.name!r}: {self.rule}"


class StrictFilter:
    """Apply tarfile.data_filter, allow only regular files and directories, enforce the quota."""

    def __init__(self, quota_bytes: int, max_members: int) -> None:
        self.quota_bytes = quota_bytes
        self.max_members = max_members
        self.total_bytes = 0
        self.members = 0

    def __call__(self, member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
        self.members += 1
        if self.members > self.max_members:
            raise UnsafeArchiveError(member, f"more than {self.max_members} members (stage-in member limit)")
        if not (member.isreg() or member.isdir()):
            raise UnsafeArchiveError(member, "only regular files and directories are allowed (no links, devices or FIFOs)")
        filtered = tarfile.data_filter(member, dest_path)
        self.total_bytes += filtered.size
        if self.total_bytes > self.quota_bytes:
            raise UnsafeArchiveError(member, f"dataset exceeds the stage-in quota of {self.quota_bytes} bytes")
        return filtered


def extract_stream(stream: IO[bytes], dest: Path, *, quota_bytes: int, max_members: int) -> StrictFilter:
    """Extract a gzip tar stream into ``dest`` atomically; return the filter with its counts."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a leftover from an earlier, interrupted attempt
    partial.mkdir(parents=True)
    strict = StrictFilter(quota_bytes, max_members)
    try:
        # "r|gz": a forward-only stream, so nothing is written to disk but the extracted files.
        with tarfile.open(fileobj=stream, mode="r|gz") as archive:
            for member in archive:
                archive.extract(member, partial, filter=strict)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)
    return strict
