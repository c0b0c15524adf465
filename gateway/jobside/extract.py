"""Safe streaming extraction of a dataset tarball.

Python's ``data`` filter is the floor: on 3.11 before 3.11.13 it has link-based bypasses
(CVE-2025-4517 and friends, shared notes), and cryo-EM inputs need only files and directories,
so anything else is refused. A size quota and a member count are checked on each header before
its data is read, so a tar bomb stops at once. Extraction goes into ``<dest>.partial`` and is
renamed only when complete; on any error the partial tree is removed.

Filters run too late for one kind of bomb: tarfile reads the data of a pax header (``x``, ``g``,
Solaris ``X``) or a GNU long name/link (``L``, ``K``) into memory, and decodes it, while it builds
the *next* member's TarInfo, before any filter sees anything (a 200 MB pax record held 600 MB;
a few thousand pax headers in a row end in RecursionError, one recursive call per header).
BoundedTarInfo checks those headers before their data is read.
"""
from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

# The largest data an extended header (pax x/g/X, GNU L/K) may hold. Real ones hold a path of at
# most PATH_MAX (4096) bytes plus a few short records (mtime, uid, comment), well under 8 KiB;
# 64 KiB leaves room for any of them and bounds what tarfile holds per header.
MAX_EXTENDED_HEADER_BYTES = 64 * 1024
# The most extended headers in a row before a member. Real archives have at most three (a
# global ``g`` from git archive, an ``x``, or GNU tar's ``K`` + ``L``); each one is one recursive
# call in tarfile, so a bound also keeps far below the recursion limit.
MAX_EXTENDED_HEADER_CHAIN = 8
# All global (``g``) headers together: their records accumulate for the whole archive and are
# copied into every later member, so they are bounded as one total, not per header.
MAX_GLOBAL_HEADER_BYTES = MAX_EXTENDED_HEADER_BYTES

_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_GNU_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_HEADER_KINDS = {
    tarfile.XHDTYPE: "pax extended header",
    tarfile.XGLTYPE: "pax global header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link header",
    tarfile.GNUTYPE_SPARSE: "GNU sparse header",
}


class UnsafeArchiveError(tarfile.FilterError):
    """A member was refused; the message names it and the rule."""

    def __init__(self, member: tarfile.TarInfo, rule: str) -> None:
        super().__init__(member)
        self.tarinfo = member
        self.rule = rule

    def __str__(self) -> str:
        return f"refused archive member {self.tarinfo.name!r}: {self.rule}"


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized or endless extended headers before their data is read.

    ``_proc_member`` is private tarfile API, but it is the only hook that runs after a header's
    512 bytes are parsed and before its data is read; tarfile documents it as the method a subclass
    overrides (see the comment above it in tarfile.py), and tests/unit/test_extract.py pins the
    behaviour on this Python. The chain depth and the global-header total live on the TarFile,
    the one object that spans the recursion.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        kind = _HEADER_KINDS.get(self.type)
        if kind is None:
            return super()._proc_member(tarfile_)
        where = f"{kind} at byte {self.offset}"
        if self.type == tarfile.GNUTYPE_SPARSE:
            # Sparse maps are read block by block with no bound (and cryo-EM data is never sparse).
            raise UnsafeArchiveError(self, f"{where}: GNU sparse members are not allowed (create the tarball without --sparse)")
        if self.size > MAX_EXTENDED_HEADER_BYTES:
            raise UnsafeArchiveError(
                self, f"{where} holds {self.size} bytes, over the {MAX_EXTENDED_HEADER_BYTES}-byte limit for extended headers"
            )
        if self.type == tarfile.XGLTYPE:
            total = getattr(tarfile_, "_gateway_global_bytes", 0) + self.size
            if total > MAX_GLOBAL_HEADER_BYTES:
                raise UnsafeArchiveError(
                    self, f"{where}: global headers hold {total} bytes in all, over the {MAX_GLOBAL_HEADER_BYTES}-byte limit"
                )
            tarfile_._gateway_global_bytes = total  # type: ignore[attr-defined]
        depth = getattr(tarfile_, "_gateway_chain", 0) + 1
        if depth > MAX_EXTENDED_HEADER_CHAIN:
            raise UnsafeArchiveError(
                self, f"{where}: more than {MAX_EXTENDED_HEADER_CHAIN} extended headers in a row before one member"
            )
        tarfile_._gateway_chain = depth  # type: ignore[attr-defined]
        try:
            # Reads this header's data, then the next header (recursively, back into this method).
            return super()._proc_member(tarfile_)
        finally:
            tarfile_._gateway_chain = depth - 1  # type: ignore[attr-defined]

    # GNU sparse 0.0/0.1/1.0 arrive as pax records naming the *next* member sparse; 1.0 then reads
    # a sparse map of any length from that member's data. Refuse all three like an "S" header.
    def _proc_gnusparse_00(self, next: tarfile.TarInfo, pax_headers: dict[str, str], buf: bytes) -> None:
        raise UnsafeArchiveError(next, "GNU sparse members are not allowed (create the tarball without --sparse)")

    def _proc_gnusparse_01(self, next: tarfile.TarInfo, pax_headers: dict[str, str]) -> None:
        raise UnsafeArchiveError(next, "GNU sparse members are not allowed (create the tarball without --sparse)")

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str], tarfile_: tarfile.TarFile) -> None:
        raise UnsafeArchiveError(next, "GNU sparse members are not allowed (create the tarball without --sparse)")


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
        with tarfile.open(fileobj=stream, mode="r|gz", tarinfo=BoundedTarInfo) as archive:
            # next() rather than iteration: TarFile keeps every member it has read in .members
            # (with its pax records), even in stream mode, and iteration indexes that list; only
            # links would need it, and those are refused, so each member is dropped once extracted.
            while (member := archive.next()) is not None:
                archive.extract(member, partial, filter=strict)
                archive.members.clear()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)
    return strict
