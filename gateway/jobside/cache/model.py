"""The dataset cache's public values: its key, what a use did, an entry as listed, and its errors."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CacheError(Exception):
    """The cache cannot be used (not a problem with the dataset); stage without the cache."""


class CacheFull(CacheError):
    """The entry cannot fit even after evicting every unused entry; stage without the cache."""


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
