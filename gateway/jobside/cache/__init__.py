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

The modules: model (the public values), locks, trees (file trees), entries (entry.json and
verification), eviction (and the sweep of dead processes' leftovers), store (DatasetCache).

Standard library only: this runs in the jobs under ``python -I``.
"""
from __future__ import annotations

from gateway.jobside.cache.model import (
    CacheError,
    CacheFull,
    CacheKey,
    CacheUse,
    EntryInfo,
)
from gateway.jobside.cache.store import DatasetCache

__all__ = ["CacheError", "CacheFull", "CacheKey", "CacheUse", "DatasetCache", "EntryInfo"]
