"""The job-side dataset cache: one fill per object, hard links after, verified on every use."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import pytest

from gateway.jobside.cache import (
    CacheError,
    CacheFull,
    CacheKey,
    DatasetCache,
    eviction,
    locks,
)
from gateway.jobside.extract import extract_stream

FORK = multiprocessing.get_context("fork")
DATASET = {"particles.star": b"data_\nloop_\n", "Movies/a.mrcs": b"A" * 20, "Movies/sub/b.mrcs": b"B" * 7}


def key_for(label: str, size: int = 10) -> CacheKey:
    return CacheKey(f"s3://bucket/{label}.tar.gz", f'"etag-{label}"', size)


def counting_fill(counter: Path, files: dict[str, bytes] = DATASET, *, sleep_s: float = 0.0) -> Callable[[Path], dict[str, Any]]:
    """A fill that writes ``files`` and appends one line to ``counter`` per call."""

    def fill(tree: Path) -> dict[str, Any]:
        with counter.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(sleep_s)
        for relative, data in files.items():
            (tree / relative).parent.mkdir(parents=True, exist_ok=True)
            (tree / relative).write_bytes(data)
        total = sum(len(data) for data in files.values())
        return {"sha256": "f" * 64, "bytes": total, "extracted_bytes": total, "members": len(files)}

    return fill


def calls(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def tree_of(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def never(tree: Path) -> dict[str, Any]:
    raise AssertionError("fill must not be called")


@pytest.fixture
def cache(tmp_path: Path) -> DatasetCache:
    (tmp_path / "cache").mkdir()  # [job] cache_dir; the per-account root below it is made on use
    return DatasetCache(tmp_path / "cache" / "account", 10_000, lock_timeout_s=5)


def test_key_name_is_sha256_of_url_bare_etag_and_size() -> None:
    key = CacheKey("s3://bucket/data.tar.gz", '"abc"', 42)
    assert key.name == hashlib.sha256(b"s3://bucket/data.tar.gz\nabc\n42").hexdigest()
    assert CacheKey("s3://bucket/data.tar.gz", "abc", 42).name == key.name  # quotes do not matter
    assert CacheKey("s3://bucket/data.tar.gz", "abc", 43).name != key.name
    with pytest.raises(ValueError, match="newline"):
        CacheKey("s3://bucket/a\nb", "abc", 1)


def test_miss_fills_once_then_hits_link_the_same_read_only_files(cache: DatasetCache, tmp_path: Path) -> None:
    counter, key = tmp_path / "calls", key_for("one")
    first = cache.use(key, tmp_path / "ws1" / "dataset", counting_fill(counter))
    assert (first.hit, first.kept, first.refetched, first.linked_files) == (False, True, None, 3)
    assert first.fill is not None and first.fill["sha256"] == "f" * 64
    assert first.entry == cache.root / "entries" / key.name
    assert first.bytes == sum(len(data) for data in DATASET.values())

    entry_tree = first.entry / "tree"
    for relative in DATASET:
        cached, linked = entry_tree / relative, tmp_path / "ws1" / "dataset" / relative
        assert linked.stat().st_ino == cached.stat().st_ino  # a hard link, not a copy
        assert stat.S_IMODE(cached.stat().st_mode) == 0o444
    assert stat.S_IMODE((entry_tree / "Movies").stat().st_mode) == 0o555
    assert stat.S_IMODE(entry_tree.stat().st_mode) == 0o555
    # The workspace's directories are the job's own, writable: RELION writes next to the data.
    assert (tmp_path / "ws1" / "dataset" / "Movies").stat().st_mode & stat.S_IWUSR
    assert (tmp_path / "ws1" / "dataset" / "Movies").stat().st_ino != (entry_tree / "Movies").stat().st_ino

    info = json.loads((first.entry / "entry.json").read_text())
    assert (info["url"], info["etag"], info["size"], info["sha256"]) == (key.url, "etag-one", 10, "f" * 64)
    assert {item["path"]: item["size"] for item in info["manifest"]} == {name: len(data) for name, data in DATASET.items()}
    assert info["extracted_bytes"] == first.bytes and info["members"] == 3
    before = (first.entry / "last_used").stat().st_mtime_ns

    (tmp_path / "ws2").mkdir()  # an existing empty dest is fine
    second = cache.use(key, tmp_path / "ws2", never)
    assert (second.hit, second.fill, second.linked_files, second.refetched) == (True, None, 3, None)
    assert calls(counter) == 1
    assert tree_of(tmp_path / "ws2") == tree_of(tmp_path / "ws1" / "dataset") == DATASET
    assert (tmp_path / "ws2" / "particles.star").stat().st_nlink == 3
    assert (first.entry / "last_used").stat().st_mtime_ns > before
    assert os.listdir(cache.root / "tmp") == []


def test_fill_with_the_real_extractor(cache: DatasetCache, tmp_path: Path) -> None:
    from tests.unit.test_stage_dataset import tarball

    buffer = io.BytesIO(tarball(DATASET))

    def fill(tree: Path) -> dict[str, Any]:
        buffer.seek(0)
        counts = extract_stream(buffer, tree, quota_bytes=10_000, max_members=10)
        return {"extracted_bytes": counts.total_bytes, "members": counts.members}

    used = cache.use(key_for("tar"), tmp_path / "ws", fill)
    assert used.linked_files == 3 and tree_of(tmp_path / "ws") == DATASET
    # extract_stream works in tree.partial beside tree/; only tree/ and the entry's files remain.
    assert set(os.listdir(used.entry)) == {"entry.json", "last_used", "tree"}
    assert cache.use(key_for("tar"), tmp_path / "ws2", never).hit


def _writable(path: Path) -> None:
    path.chmod(0o755 if path.is_dir() else 0o644)


def _truncate(tree: Path) -> None:
    _writable(tree / "Movies" / "a.mrcs")
    (tree / "Movies" / "a.mrcs").write_bytes(b"A" * 10)


def _same_size_new_mtime(tree: Path) -> None:
    target = tree / "Movies" / "a.mrcs"
    _writable(target)
    target.write_bytes(b"Z" * 20)
    os.utime(target, ns=(1, 1))


def _symlink(tree: Path) -> None:
    _writable(tree / "Movies")
    (tree / "Movies" / "a.mrcs").unlink()
    (tree / "Movies" / "a.mrcs").symlink_to(tree / "particles.star")


def _delete(tree: Path) -> None:
    _writable(tree / "Movies")
    (tree / "Movies" / "a.mrcs").unlink()


def _extra(tree: Path) -> None:
    _writable(tree / "Movies")
    (tree / "Movies" / "extra.mrcs").write_bytes(b"?")


def _chmod_writable(tree: Path) -> None:
    _writable(tree / "Movies" / "a.mrcs")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "corrupt: Movies/a.mrcs: size 10 != 20"),
        (_same_size_new_mtime, "corrupt: Movies/a.mrcs: mtime_ns 1 != "),
        (_symlink, "corrupt: Movies/a.mrcs: not a regular file"),
        (_delete, "corrupt: Movies/a.mrcs: missing"),
        (_extra, "corrupt: Movies/extra.mrcs: not in the manifest"),
        (_chmod_writable, "corrupt: Movies/a.mrcs: mode 644 != 444"),
    ],
)
def test_a_damaged_entry_is_detected_and_refilled(
    cache: DatasetCache, tmp_path: Path, damage: Callable[[Path], None], reason: str
) -> None:
    counter, key = tmp_path / "calls", key_for("damaged")
    first = cache.use(key, tmp_path / "ws1", counting_fill(counter))
    damage(first.entry / "tree")

    again = cache.use(key, tmp_path / "ws2", counting_fill(counter))
    assert again.hit is False and calls(counter) == 2
    assert again.refetched is not None and again.refetched.startswith(reason)
    assert tree_of(tmp_path / "ws2") == DATASET
    # The refill is a valid entry again, and a later use hits it.
    assert cache.use(key, tmp_path / "ws3", never).hit
    assert sorted(os.listdir(cache.root / "tmp")) == []


def test_an_entry_without_entry_json_is_never_used(cache: DatasetCache, tmp_path: Path) -> None:
    key = key_for("incomplete")
    stale = cache.root / "entries" / key.name / "tree"
    stale.mkdir(parents=True)
    (stale / "particles.star").write_bytes(b"stale")
    used = cache.use(key, tmp_path / "ws", counting_fill(tmp_path / "calls"))
    assert (used.hit, used.refetched) == (False, "incomplete")
    assert tree_of(tmp_path / "ws") == DATASET  # the fill's data, not the leftover


def test_an_unreadable_entry_json_is_incomplete(cache: DatasetCache, tmp_path: Path) -> None:
    key = key_for("garbled")
    cache.use(key, tmp_path / "ws1", counting_fill(tmp_path / "calls"))
    entry_json = cache.root / "entries" / key.name / "entry.json"
    entry_json.chmod(0o644)
    entry_json.write_text("{not json")
    used = cache.use(key, tmp_path / "ws2", counting_fill(tmp_path / "calls"))
    assert (used.hit, used.refetched) == (False, "incomplete") and calls(tmp_path / "calls") == 2


def test_a_dead_fillers_tmp_dir_is_never_used_and_is_swept(cache: DatasetCache, tmp_path: Path) -> None:
    key, other = key_for("dead"), key_for("other-dead")
    cache.use(key_for("layout"), tmp_path / "ws0", counting_fill(tmp_path / "c0"))
    for name in (key.name, other.name):  # finished-looking fills whose filler died before the rename
        left = cache.root / "tmp" / f"{name}.fill-abc123"
        (left / "tree").mkdir(parents=True)
        (left / "tree" / "particles.star").write_bytes(b"leftover")
        (left / "entry.json").write_text(json.dumps({"url": key.url}))
    used = cache.use(key, tmp_path / "ws", counting_fill(tmp_path / "calls"))
    assert used.hit is False and calls(tmp_path / "calls") == 1
    assert tree_of(tmp_path / "ws") == DATASET
    assert os.listdir(cache.root / "tmp") == []  # both swept: this key's, and the other key's (lock free)


def _hold_lock(path: Path, ready: Any, release: Any) -> None:
    held = locks.acquire(path, 5)
    ready.set()
    release.wait(10)
    held.release()


class LockHolder:
    """Another process holding one of the cache's lock files until the block ends."""

    def __init__(self, path: Path) -> None:
        self.ready, self.release = FORK.Event(), FORK.Event()
        self.process = FORK.Process(target=_hold_lock, args=(path, self.ready, self.release))

    def __enter__(self) -> Self:
        self.process.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.process.join(5)


def test_a_tmp_dir_whose_lock_is_held_elsewhere_is_kept_until_idle_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = DatasetCache(tmp_path / "cache", 10_000, lock_timeout_s=2)
    cache.use(key_for("layout"), tmp_path / "ws0", counting_fill(tmp_path / "c0"))
    busy = key_for("busy")
    working = cache.root / "tmp" / f"{busy.name}.fill-live"
    (working / "tree").mkdir(parents=True)
    with LockHolder(cache.root / "locks" / f"{busy.name}.lock"):
        cache.use(key_for("a"), tmp_path / "ws1", counting_fill(tmp_path / "c1"))
        assert working.exists()  # a live filler's work

        # ctime cannot be set back by hand, so pretend an hour has passed since the last change.
        real_ctime = eviction.newest_ctime
        monkeypatch.setattr(eviction, "newest_ctime", lambda path: real_ctime(path) - 3600)
        cache.use(key_for("b"), tmp_path / "ws2", counting_fill(tmp_path / "c2"))
        assert not working.exists()  # nothing changed in it for longer than lock_timeout_s


def test_a_lock_held_too_long_is_a_cache_error_naming_it(tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path / "cache", 10_000, lock_timeout_s=0.3)
    key = key_for("slow")
    cache.use(key_for("layout"), tmp_path / "ws0", counting_fill(tmp_path / "c0"))
    lock = cache.root / "locks" / f"{key.name}.lock"
    with LockHolder(lock), pytest.raises(CacheError, match=f"waiting for lock {lock}"):
        cache.use(key, tmp_path / "ws", never)
    assert not (tmp_path / "ws").exists()  # the dest it made is gone again


def _use_in_child(root: Path, counter: Path, dest: Path, events: dict[str, Any], results: Any) -> None:
    def fill(tree: Path) -> dict[str, Any]:
        events["filling"].set()
        assert events["finish"].wait(10)
        return counting_fill(counter)(tree)

    events["about_to_use"].set()
    used = DatasetCache(root, 10_000, lock_timeout_s=10).use(key_for("shared"), dest, fill)
    results.put((dest.name, used.hit, used.waited_s, used.linked_files))


def test_two_processes_at_once_fill_only_once(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    root, counter, results = tmp_path / "cache" / "account", tmp_path / "calls", FORK.Queue()
    shared = {"filling": FORK.Event(), "finish": FORK.Event()}
    children = []
    for name in ("first", "second"):
        events = {**shared, "about_to_use": FORK.Event()}
        child = FORK.Process(target=_use_in_child, args=(root, counter, tmp_path / name, events, results))
        child.start()
        children.append(child)
        # The first is inside its fill before the second calls use(); the second then has
        # 0.3 s to reach the lock before the fill may finish: the two overlap for certain.
        assert (shared["filling"] if name == "first" else events["about_to_use"]).wait(10)
    time.sleep(0.3)
    shared["finish"].set()
    outcomes = {result[0]: result[1:] for result in (results.get(timeout=15) for _ in children)}
    for child in children:
        child.join(5)
        assert child.exitcode == 0
    assert calls(counter) == 1  # POSIX locks across processes: one filler
    assert outcomes["first"][0] is False and outcomes["first"][2] == 3
    hit, waited, linked = outcomes["second"]
    assert (hit, linked) == (True, 3)
    assert waited > 0.2  # it waited for the filler's lock, then hit
    assert tree_of(tmp_path / "first") == tree_of(tmp_path / "second") == DATASET


def test_a_fill_that_raises_leaves_nothing(cache: DatasetCache, tmp_path: Path) -> None:
    def broken(tree: Path) -> dict[str, Any]:
        (tree / "half.mrcs").write_bytes(b"x" * 100)
        raise ConnectionResetError("S3 went away")

    with pytest.raises(ConnectionResetError, match="S3 went away"):
        cache.use(key_for("broken"), tmp_path / "ws", broken)
    assert os.listdir(cache.root / "entries") == []
    assert os.listdir(cache.root / "tmp") == []
    assert not (tmp_path / "ws").exists()
    # The lock was released and the next try fills.
    assert cache.use(key_for("broken"), tmp_path / "ws", counting_fill(tmp_path / "calls")).linked_files == 3


def _fill_bytes(count: int) -> Callable[[Path], dict[str, Any]]:
    def fill(tree: Path) -> dict[str, Any]:
        (tree / "data.mrcs").write_bytes(b"x" * count)
        return {"extracted_bytes": count}

    return fill


def _release(workspace: Path) -> None:
    """What the archive hook does at the end of a job: remove the workspace and its links."""
    for path in sorted(workspace.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    workspace.rmdir()


def test_least_recently_used_unused_entries_are_evicted_first(tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path / "cache", 100)
    names = {}
    for label in ("a", "b", "c"):
        names[label] = cache.use(key_for(label, 30), tmp_path / label, _fill_bytes(30)).key.name
        _release(tmp_path / label)
    cache.use(key_for("a", 30), tmp_path / "a-again", never)  # a is now the most recently used
    _release(tmp_path / "a-again")

    used = cache.use(key_for("d", 30), tmp_path / "d", _fill_bytes(30))
    assert used.evicted == (names["b"],)  # 90 + 30 > 100: one goes, the least recently used
    listed = {entry.name: entry for entry in cache.entries()}
    assert set(listed) == {names["a"], names["c"], used.key.name}
    assert listed[used.key.name].in_use and not listed[names["a"]].in_use
    assert all(entry.complete for entry in listed.values())
    assert [entry.name for entry in cache.entries()][-1] == used.key.name  # LRU order, newest last

    assert cache.evict_unused(100) == (names["c"], names["a"])  # evicts what it can, LRU first
    assert [entry.name for entry in cache.entries()] == [used.key.name]  # d is linked from ./d


def test_an_entry_still_linked_from_a_workspace_is_not_evicted(tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path / "cache", 100)
    idle = cache.use(key_for("idle", 30), tmp_path / "finished-job", _fill_bytes(30))
    _release(tmp_path / "finished-job")
    held = cache.use(key_for("held", 60), tmp_path / "running-job", _fill_bytes(60))
    assert (tmp_path / "running-job" / "data.mrcs").stat().st_nlink == 2
    with pytest.raises(CacheFull, match="entries in use"):
        cache.use(key_for("new", 60), tmp_path / "ws", never)  # before any download
    # Evicting the idle entry would not have made room, so it was not thrown away for nothing.
    assert [entry.name for entry in cache.entries()] == [idle.key.name, held.key.name]
    assert not (tmp_path / "ws").exists()
    assert cache.evict_unused(100) == (idle.key.name,)  # the explicit call evicts what it can
    assert [entry.name for entry in cache.entries()] == [held.key.name]

    # The object's size understated the tree: no room after the fill, so it is moved, not cached.
    used = cache.use(key_for("understated", 10), tmp_path / "ws", _fill_bytes(60))
    assert (used.kept, used.hit, used.linked_files, used.bytes, used.evicted) == (False, False, 0, 60, ())
    assert (tmp_path / "ws" / "data.mrcs").stat().st_nlink == 1
    assert (tmp_path / "ws" / "data.mrcs").stat().st_mode & stat.S_IWUSR  # the job's own file
    assert [entry.name for entry in cache.entries()] == [held.key.name]
    assert os.listdir(cache.root / "tmp") == []


def test_an_entry_bigger_than_the_quota_is_not_kept(tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path / "cache", 100)
    idle = cache.use(key_for("idle", 40), tmp_path / "idle", _fill_bytes(40))
    _release(tmp_path / "idle")
    used = cache.use(key_for("huge", 10), tmp_path / "ws", _fill_bytes(150))
    assert (used.kept, used.hit, used.bytes, used.linked_files) == (False, False, 150, 0)
    assert used.fill == {"extracted_bytes": 150}
    assert (tmp_path / "ws" / "data.mrcs").read_bytes() == b"x" * 150
    assert not used.entry.exists() and os.listdir(cache.root / "tmp") == []
    # Nothing was evicted for an entry that could never be kept.
    assert [entry.name for entry in cache.entries()] == [idle.key.name]


def test_a_cross_device_link_is_a_cache_error_not_a_copy(
    cache: DatasetCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = key_for("exdev")
    cache.use(key, tmp_path / "ws1", counting_fill(tmp_path / "calls"))

    def cross_device(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(args[0]))

    monkeypatch.setattr(os, "link", cross_device)
    (tmp_path / "ws2").mkdir()
    with pytest.raises(CacheError, match="different file systems"):
        cache.use(key, tmp_path / "ws2", never)
    assert os.listdir(tmp_path / "ws2") == []  # left empty for staging without the cache
    monkeypatch.undo()
    assert cache.use(key, tmp_path / "ws2", never).hit  # the entry itself is intact


def _other_file_system(path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != path.stat().st_dev:
        return shm
    return None


def test_a_workspace_on_another_file_system_is_refused_before_any_fill(tmp_path: Path) -> None:
    other = _other_file_system(tmp_path)
    if other is None:
        pytest.skip("no second writable file system here")
    cache = DatasetCache(tmp_path / "cache", 10_000)
    dest = other / f"relion-gateway-cache-test-{os.getpid()}"
    with pytest.raises(CacheError, match="different file systems"):
        cache.use(key_for("elsewhere"), dest, never)
    assert not dest.exists()


def test_a_dest_that_is_not_empty_is_refused(cache: DatasetCache, tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        cache.use(key_for("x"), tmp_path / "ws", never)
    assert os.listdir(tmp_path / "ws") == ["mine.txt"]


def test_a_missing_cache_dir_is_a_cache_error(tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path / "not-mounted" / "account", 10_000)
    with pytest.raises(CacheError, match="is the shared file system mounted"):
        cache.use(key_for("x"), tmp_path / "ws", never)
    assert not (tmp_path / "not-mounted").exists()


def test_entry_json_counts_the_tree_itself(cache: DatasetCache, tmp_path: Path) -> None:
    # The quota counts what is on disk, whatever the fill reports (here: nothing at all).
    def fill(tree: Path) -> dict[str, Any]:
        (tree / "map.mrc").write_bytes(b"M" * 50)
        return {}

    used = cache.use(key_for("plain"), tmp_path / "ws", fill)
    info = json.loads((used.entry / "entry.json").read_text())
    assert (info["extracted_bytes"], info["members"], info["sha256"]) == (50, 1, None)
