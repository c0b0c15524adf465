"""Issue 16 "Stage each dataset once": the job-side dataset cache against staging from S3 every time.

Run: `.venv/bin/python -m bench.cache [--quick]` from the repository root, with the local stack up
(`relion-gateway stack status`: the S3 server and bucket `relion-local`). It prints the table and
one JSON line and writes `bench/results/cache.json` (the layout `bench/run.py` writes). About five
minutes on the 2-core development machine; `--quick` (a ~105 MB dataset, one repeat) about 15 s.

Set-up: the synthetic RELION-like dataset of bench/datapath.py (8 float32-noise .mrcs stacks, a
particles.star of 100,000 rows and 5 small .star files, 1,056 MB; `--quick`: 105 MB, 10,000 rows),
packed and uploaded by the gateway's own `pack_and_upload` (`tar -C <root> -- . | pigz -6`, so the
tarball's root is the dataset's, as a job's `--i particles.star` expects). The job side reaches S3
through a small adapter over `S3Storage` (HEAD for `dataset_info`, one streaming GET for
`open_stream` and `open_parent_output`) that counts requests and the body bytes read and uploaded.
Everything lives under one temp dir in /var/tmp (cache, workspaces and source on one file system,
as hard links need) and `s3://relion-local/bench/cache-<id>/`; both are removed at the end.

1. Stage-in, cold vs hit (goal: hit < 5% of cold, 0 bytes read from S3 on a hit).
   Cold: `stage_dataset` with an empty cache (a fresh cache root each run): HEAD, GET, strict
   extract into the cache's fill dir, freeze, entry.json, hard links into the workspace. Hit: the
   same call into another workspace with the first cold run's cache: HEAD, stat-verify the entry,
   hard links. Reference: `stage_in` without a cache (what the fill adds). Each timed run starts
   after os.sync(); cold and plain alternate; 3 repeats (3 hits each), medians (`--quick`: once).
2. Extra disk of a hit: the file system's used bytes (statvfs, after os.sync()) right before and
   after each hit, and the st_blocks x 512 of the hit workspace's files with st_nlink == 1 (every
   dataset file should be a link into the cache). Baseline: the same figures for `stage_in`.
   The file system is shared with the S3 server and other test runs, so statvfs deltas carry noise.
3. A chain's stage-in. The parent is a fake 2D job: `Class2D/run_it025_data.star` (the dataset's
   particles with `_rlnClassNumber` over 3 classes and the usual 2D columns), `run_it025_model.star`
   and `run_it025_classes.mrcs`, archived as the hook does (`pack_and_upload` of `Class2D` to
   `<parent>/output.tar.gz`) and put into the cache as a hook would: `DatasetCache.use` with a fill
   that moves the parent workspace's `Class2D` into the entry. Gateway: `stage_dataset` (hit) +
   `stage_parent` (hit; writes `parent/particles.star` with classes 1 and 2). Baseline, what a user
   does today: `write_subset` of the same classes, `pack_and_upload` of that STAR with the stacks it
   names (hard-linked into a staging dir, no copy), then a cold `stage_dataset` of the new tarball.
   Also timed: the chain when the parent's output is not cached (`stage_parent` GETs the small
   output.tar.gz and fills the entry; today's path, since the archive hook fills no entry yet).
   Times and bytes moved through S3 (up + down) for each.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import mrcfile
import numpy

from bench.common import (
    RESULTS_DIR,
    Context,
    goal_met,
    machine_cpu_seconds,
    ratio_text,
    remove_s3_prefix,
    restore_environment,
    row,
)
from bench.datapath import make_dataset, tree_bytes
from gateway.jobs.spec import PARENT_STAR, ChainInput
from gateway.jobside.archive import pack_and_upload
from gateway.jobside.cache import CacheKey, DatasetCache
from gateway.jobside.cache.trees import rmtree
from gateway.jobside.chain import stage_parent
from gateway.jobside.stage_in import stage_dataset, stage_in
from gateway.relion.star import StarBlock, loop_block, read_star, write_star
from gateway.relion.subset import job_outputs, write_subset
from gateway.storage.base import ObjectInfo, S3Location, parse_s3_url
from gateway.storage.s3 import S3Storage, make_s3_client

log = logging.getLogger(__name__)

NAME = "cache"
TITLE = "Stage each dataset once: dataset cache hit vs cold stage-in, disk, chained stage-in"

MB = 1e6
QUOTA = 1 << 40
MAX_MEMBERS = 100_000
HIT_GOAL = 0.05  # the issue: a hit takes < 5% of a cold stage-in
DISK_GOAL = 0.01  # "~0": a hit adds < 1% of the dataset to the file system
CLASSES = 3
SELECT = (1, 2)
OUTPUT_PREFIX = "Class2D/run"
ITERATION = 25


class CountingStream:
    """A read/close stream that adds every byte read to ``counter[field]``."""

    def __init__(self, stream: IO[bytes], counter: CountingS3, field: str) -> None:
        self._stream, self._counter, self._field = stream, counter, field

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self._counter.add(self._field, len(chunk))
        return chunk

    def close(self) -> None:
        self._stream.close()


class CountingS3:
    """The job side's storage on S3Storage (what BrokeredStorage offers stage-in), counting traffic."""

    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage
        self.parent_output: S3Location | None = None  # what open_parent_output streams
        self._lock = threading.Lock()
        self.counts = {"heads": 0, "gets": 0, "get_bytes": 0, "puts": 0, "put_bytes": 0}

    def add(self, field: str, amount: int) -> None:
        with self._lock:
            self.counts[field] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def dataset_info(self, location: S3Location) -> ObjectInfo:
        self.add("heads", 1)
        return self.storage.head(location)

    def open_stream(self, location: S3Location) -> tuple[IO[bytes], ObjectInfo]:
        self.add("gets", 1)
        body, info = self.storage.open_stream(location)
        return CountingStream(body, self, "get_bytes"), info  # type: ignore[return-value]

    def open_parent_output(self) -> tuple[IO[bytes], ObjectInfo]:
        if self.parent_output is None:
            raise RuntimeError("no parent output set")
        return self.open_stream(self.parent_output)

    def upload_stream(self, stream: IO[bytes], location: S3Location, *, size_hint: int | None = None) -> None:
        self.add("puts", 1)
        self.storage.upload_stream(CountingStream(stream, self, "put_bytes"), location, size_hint=size_hint)  # type: ignore[arg-type]


def seconds_list(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in runs)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (tar, pigz)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def used_bytes(path: Path) -> int:
    """The file system's used bytes (what df shows), after flushing dirty data."""
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def private_bytes(root: Path) -> tuple[int, int, int]:
    """(allocated bytes of files with st_nlink == 1, files, directories) under ``root``."""
    allocated = files = dirs = 0
    for directory, subdirs, names in os.walk(root):
        dirs += len(subdirs)
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            files += 1
            if st.st_nlink == 1:
                allocated += st.st_blocks * 512
    return allocated, files, dirs


def write_parent_output(dataset: Path, seed: int = 16) -> None:
    """A finished 2D classification's final iteration under ``dataset/Class2D`` (K=3)."""
    blocks = read_star(dataset / "particles.star")
    particles = blocks["particles"]
    rng = random.Random(seed)
    extra = ["rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnNormCorrection",
             "rlnLogLikeliContribution", "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples"]
    rows = [
        {**row, "rlnClassNumber": str(rng.randint(1, CLASSES)), "rlnAnglePsi": f"{rng.uniform(-180, 180):.6f}",
         "rlnOriginXAngst": f"{rng.uniform(-5, 5):.6f}", "rlnOriginYAngst": f"{rng.uniform(-5, 5):.6f}",
         "rlnNormCorrection": "1.000000", "rlnLogLikeliContribution": f"{rng.uniform(1e5, 2e5):.6e}",
         "rlnMaxValueProbDistribution": f"{rng.random():.6f}", "rlnNrOfSignificantSamples": str(rng.randint(1, 40))}
        for row in particles.loop
    ]
    out = dataset / "Class2D"
    out.mkdir()
    base = f"{Path(OUTPUT_PREFIX).name}_it{ITERATION:03d}"
    write_star(out / f"{base}_data.star", [blocks["optics"], StarBlock(name="particles", labels=particles.labels + extra, loop=rows)])
    general = StarBlock(name="model_general", values={
        "rlnReferenceDimensionality": "2", "rlnDataDimensionality": "2", "rlnOriginalImageSize": "256",
        "rlnCurrentResolution": "12.500000", "rlnCurrentImageSize": "256", "rlnNrClasses": str(CLASSES),
        "rlnNrGroups": "1", "rlnTau2FudgeFactor": "2.000000", "rlnPixelSize": "1.000000",
    })
    classes = loop_block("model_classes", [
        {"rlnReferenceImage": f"{k:06d}@{OUTPUT_PREFIX}_it{ITERATION:03d}_classes.mrcs", "rlnClassDistribution": f"{1 / CLASSES:.6f}",
         "rlnAccuracyRotations": "2.500000", "rlnAccuracyTranslationsAngst": "0.800000", "rlnEstimatedResolution": "12.500000"}
        for k in range(1, CLASSES + 1)
    ])
    write_star(out / f"{base}_model.star", [general, classes])
    with mrcfile.new(out / f"{base}_classes.mrcs", overwrite=True) as stack:
        stack.set_data(numpy.zeros((CLASSES, 256, 256), dtype=numpy.float32))


class Bench:
    def __init__(self, ctx: Context) -> None:
        from gateway.stack import stack_status

        self.ctx = ctx
        self.repeats = 1 if ctx.quick else 3
        self.hits_per_repeat = 1 if ctx.quick else 3
        status = stack_status()
        if not status.get("all_up"):
            raise RuntimeError("the stack is not up: run `relion-gateway stack up` first")
        self.bucket = str(status["s3"]["bucket"])
        env = {k: v for k, v in status["environment"].items() if not k.startswith("GATEWAY_")}
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # boto3's standard chain
        self.storage = S3Storage(make_s3_client(str(status["s3"]["endpoint_url"]), str(status["s3"]["region"])))
        self.s3 = CountingS3(self.storage)
        self.prefix = f"bench/cache-{uuid.uuid4().hex[:8]}"
        self.tmp = Path(tempfile.mkdtemp(prefix="relion-gateway-bench-cache-", dir="/var/tmp"))
        self.source = self.tmp / "source"
        self.cache = self.tmp / "cache"  # the hit runs' cache: the first cold run fills it
        self._serial = 0
        self.details: dict[str, Any] = {"prefix": self.prefix, "tmp": str(self.tmp), "endpoint": status["s3"]["endpoint_url"]}
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def location(self, name: str) -> S3Location:
        return S3Location(self.bucket, f"{self.prefix}/{name}")

    def workspace(self, label: str) -> Path:
        """A fresh workspace's dataset dir (absent; stage-in makes it)."""
        self._serial += 1
        return self.tmp / "ws" / f"{label}-{self._serial}" / "dataset"

    def stage(self, url: str, dest: Path, cache: Path | None) -> dict[str, Any]:
        if cache is None:
            return stage_in(self.s3, url, dest, quota_bytes=QUOTA, max_members=MAX_MEMBERS)
        return stage_dataset(self.s3, url, dest, quota_bytes=QUOTA, max_members=MAX_MEMBERS, cache_root=cache, cache_quota_bytes=4 * self.size + 10**9)

    def timed(self, fn: Callable[[], Any]) -> dict[str, Any]:
        """``fn`` after os.sync(): wall seconds, S3 traffic, the file system's used-bytes delta."""
        used0 = used_bytes(self.tmp)
        counts0 = self.s3.snapshot()
        busy0, own0 = machine_cpu_seconds()[0], own_cpu_seconds()
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
        busy, own = machine_cpu_seconds()[0] - busy0, own_cpu_seconds() - own0
        counts = delta(counts0, self.s3.snapshot())
        # other_cpu_s: the rest of the machine meanwhile (the S3 server serving this run included).
        return {"seconds": round(seconds, 4), "s3": counts, "used_delta": used_bytes(self.tmp) - used0,
                "own_cpu_s": round(own, 2), "other_cpu_s": round(max(0.0, busy - own), 2), "result": result}

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self) -> None:
        frames, lines = (50, 10_000) if self.ctx.quick else (500, 100_000)
        started = time.perf_counter()
        self.size = make_dataset(self.source, frames, lines)
        made = time.perf_counter() - started
        packed = pack_and_upload(self.s3, self.source, ".", self.location("dataset.tar.gz"))
        self.url = self.location("dataset.tar.gz").url
        self.object_bytes = packed["bytes"]
        self.ctx.log(f"  dataset {self.size / MB:,.1f} MB made in {made:.1f} s, uploaded as {self.object_bytes / MB:,.1f} MB "
                     f"in {time.perf_counter() - started - made:.1f} s")
        self.details["dataset"] = {"bytes": self.size, "object_bytes": self.object_bytes, "files": sum(1 for p in self.source.rglob("*") if p.is_file()),
                                   "particles": lines, "url": self.url}

    # -- 1 and 2: cold vs hit, disk ----------------------------------------------------------------

    def cold(self, i: int) -> dict[str, Any]:
        cache = self.cache if i == 0 else self.tmp / f"cold-cache-{i}"
        dest = self.workspace("cold")
        run = self.timed(lambda: self.stage(self.url, dest, cache))
        if run["result"]["cache"]["hit"] or run["result"]["extracted_bytes"] != self.size:
            raise RuntimeError(f"cold run {i} was not a fill of {self.size} bytes: {run['result']}")
        shutil.rmtree(dest.parent)
        if cache != self.cache:
            rmtree(cache)
        return run

    def plain(self, i: int) -> dict[str, Any]:
        dest = self.workspace("plain")
        run = self.timed(lambda: self.stage(self.url, dest, None))
        run["private"] = private_bytes(dest)
        shutil.rmtree(dest.parent)
        return run

    def hit(self) -> dict[str, Any]:
        dest = self.workspace("hit")
        run = self.timed(lambda: self.stage(self.url, dest, self.cache))
        record = run["result"]
        if not record["cache"]["hit"] or record["extracted_bytes"] != self.size:
            raise RuntimeError(f"expected a cache hit of {self.size} bytes: {record}")
        run["private"] = private_bytes(dest)
        run["workspace_du"] = tree_bytes(dest)
        shutil.rmtree(dest.parent)
        return run

    def cold_vs_hit(self) -> None:
        runs: dict[str, list[dict[str, Any]]] = {"cold": [], "plain": [], "hit": []}
        for i in range(self.repeats):
            for name in (["cold", "plain"] if i % 2 == 0 else ["plain", "cold"]):
                runs[name].append(self.cold(i) if name == "cold" else self.plain(i))
                self.ctx.log(f"    {name}: {runs[name][-1]['seconds']:.2f} s")
            for _ in range(self.hits_per_repeat):
                runs["hit"].append(self.hit())
                self.ctx.log(f"    hit: {runs['hit'][-1]['seconds'] * 1000:.1f} ms, {runs['hit'][-1]['s3']['get_bytes']} bytes read")
        self.details["stage_in"] = {name: [{k: v for k, v in r.items() if k != "result"} | {"record": r["result"]} for r in rs] for name, rs in runs.items()}
        med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
        cold, hit, plain = med["cold"], med["hit"], med["plain"]
        self.cold_other = statistics.median(r["other_cpu_s"] for r in runs["cold"])
        size = f"{self.size / MB:,.0f} MB"
        hit_record = runs["hit"][0]["result"]
        self.rows += [
            row(f"stage-in ({size})", "ms, cache hit into another workspace (HEAD, stat-verify the entry, hard links)", round(1000 * hit, 2),
                unit="ms", goal=("<", round(1000 * HIT_GOAL * cold, 1)), baseline=round(1000 * cold, 1), baseline_label="cold: empty cache (GET, extract, fill)",
                note=f"medians of {len(runs['hit'])} hits and {len(runs['cold'])} cold runs (each cold run a fresh cache root); "
                f"hits {min(r['seconds'] for r in runs['hit']) * 1000:.1f} to {max(r['seconds'] for r in runs['hit']) * 1000:.1f} ms, "
                f"{hit_record['cache']['linked_files']} files linked; goal: < {HIT_GOAL:.0%} of cold"),
            row(f"stage-in ({size})", "hit / cold", round(100 * hit / cold, 3), unit="%", goal=("<", 100 * HIT_GOAL)),
            row(f"stage-in ({size})", "bytes read from S3 by a hit", float(max(r["s3"]["get_bytes"] for r in runs["hit"])), unit="B",
                goal=("<=", 0), baseline=float(statistics.median(r["s3"]["get_bytes"] for r in runs["cold"])), baseline_label="cold",
                note=f"a hit makes {max(r['s3']['heads'] for r in runs['hit'])} HEAD and {max(r['s3']['gets'] for r in runs['hit'])} GET requests "
                "(the HEAD gives the ETag and size of the cache key)"),
            row(f"stage-in ({size})", "seconds, cold with the cache (extract into the fill dir, freeze, entry.json, link)", round(cold, 3), unit="s",
                baseline=round(plain, 3), baseline_label="stage_in without a cache",
                note=f"what filling the cache adds to the first job: {cold - plain:+.2f} s ({cold / plain - 1:+.1%}); "
                f"cold runs {seconds_list(runs['cold'])} s, no-cache runs {seconds_list(runs['plain'])} s"),
        ]
        used = [r["used_delta"] for r in runs["hit"]]
        private = max(r["private"][0] for r in runs["hit"])
        plain_used = statistics.median(r["used_delta"] for r in runs["plain"])
        _, files, dirs = runs["hit"][0]["private"]
        self.rows += [
            row("stage-in disk", "extra disk of a hit: file system used bytes after − before (statvfs, after sync)", round(statistics.median(used) / MB, 3),
                unit="MB", goal=("<=", round(DISK_GOAL * self.size / MB, 1)), baseline=round(plain_used / MB, 1), baseline_label="stage_in without a cache",
                note=f"per hit {', '.join(f'{u / 1024:+.0f}' for u in used)} KiB (shared file system: the S3 server and other test runs write there too); "
                f"a cold fill added {statistics.median(r['used_delta'] for r in runs['cold']) / MB:,.1f} MB (the entry); goal: < {DISK_GOAL:.0%} of the dataset"),
            row("stage-in disk", "bytes of the hit workspace's files with st_nlink == 1 (st_blocks × 512)", float(private), unit="B", goal=("<=", 0),
                baseline=float(max(r["private"][0] for r in runs["plain"])), baseline_label="stage_in without a cache",
                note=f"the hit workspace holds {files} files, all hard links into the entry, and {dirs + 1} directories of its own "
                "(the dataset dir and those below it: the job's, writable)"),
        ]
        self.figures = {"cold_s": cold, "hit_s": hit, "plain_s": plain, "hit_over_cold": hit / cold,
                        "hit_s3_bytes": max(r["s3"]["get_bytes"] for r in runs["hit"]), "hit_used_delta_bytes": statistics.median(used),
                        "hit_nlink1_bytes": private}

    # -- 3: a chain ------------------------------------------------------------------------------

    def parent(self, name: str) -> ChainInput:
        """Archive the parent's Class2D as ``<name>/output.tar.gz`` and describe it as the gateway would."""
        location = self.location(f"{name}/output.tar.gz")
        pack_and_upload(self.storage, self.source, "Class2D", location)
        info = self.storage.head(location)
        return ChainInput(parent_job_id=f"job_2d_benchcache_{name}", parent_mode="2d", outputs=self.outputs.to_dict(),
                          output_url=location.url, output_etag=info.etag, output_bytes=info.size, select_classes=SELECT,
                          particles=sum(self.outputs.class_particles[n] for n in SELECT))

    def put_parent(self, chain: ChainInput) -> dict[str, Any]:
        """Put the parent's output into the cache as its archive hook would: move the workspace's tree in."""
        workspace = self.workspace("parent")
        self.stage(self.url, workspace, self.cache)  # the parent ran on the cached dataset
        shutil.copytree(self.source / "Class2D", workspace / "Class2D")  # what RELION wrote there

        def fill(tree: Path) -> dict[str, Any]:
            os.rename(workspace / "Class2D", tree / "Class2D")
            return {"bytes": chain.output_bytes, "members": sum(1 for _ in (tree / "Class2D").iterdir()) + 1}

        started = time.perf_counter()
        use = DatasetCache(self.cache, 4 * self.size + 10**9).use(
            CacheKey(chain.output_url, chain.output_etag, chain.output_bytes), workspace.parent / "archived", fill)
        seconds = time.perf_counter() - started
        shutil.rmtree(workspace.parent)  # the hook deletes the workspace
        return {"seconds": round(seconds, 4), "kept": use.kept, "linked_files": use.linked_files, "bytes": use.bytes}

    def chained(self, chain: ChainInput, label: str) -> dict[str, Any]:
        dest = self.workspace(label)
        self.s3.parent_output = parse_s3_url(chain.output_url)

        def go() -> dict[str, Any]:
            dataset = self.stage(self.url, dest, self.cache)
            parent = stage_parent(self.s3, dest, chain, quota_bytes=QUOTA, max_members=MAX_MEMBERS, cache_root=self.cache,
                                  cache_quota_bytes=4 * self.size + 10**9)
            return {"dataset": dataset, "parent": parent}

        run = self.timed(go)
        record = run["result"]
        if not record["dataset"]["cache"]["hit"] or record["parent"]["particles"] != chain.particles or not (dest / PARENT_STAR).is_file():
            raise RuntimeError(f"chained stage-in did not give {chain.particles} particles from the cache: {record}")
        shutil.rmtree(dest.parent)
        return run

    def subset_tarball(self, i: int) -> dict[str, Any]:
        """Today's way: the subset STAR and the stacks it names as a new tarball, uploaded, then staged cold."""
        staging = self.tmp / f"upload-{i}"
        location = self.location(f"subset-{i}.tar.gz")
        dest = self.workspace("subset")
        cache = self.tmp / f"subset-cache-{i}"
        parts: dict[str, float] = {}

        def go() -> dict[str, Any]:
            started = time.perf_counter()
            subset = write_subset(self.source, self.outputs, SELECT, f"subset-{i}.star")
            staging.mkdir()
            os.rename(self.source / subset.star, staging / "particles.star")
            for stack in subset.image_stacks:
                (staging / stack).parent.mkdir(parents=True, exist_ok=True)
                os.link(self.source / stack, staging / stack)  # the stacks themselves, no copy on disk
            parts["write_subset_s"] = time.perf_counter() - started
            packed = pack_and_upload(self.s3, staging, ".", location)
            parts["pack_upload_s"] = time.perf_counter() - started - parts["write_subset_s"]
            staged = self.stage(location.url, dest, cache)
            parts["stage_in_s"] = time.perf_counter() - started - parts["write_subset_s"] - parts["pack_upload_s"]
            return {"subset": {"particles": subset.particles, "image_stacks": len(subset.image_stacks)}, "packed": packed, "staged": staged}

        run = self.timed(go)
        run["parts"] = {k: round(v, 3) for k, v in parts.items()}
        shutil.rmtree(staging)
        shutil.rmtree(dest.parent)
        rmtree(cache)
        self.storage.client.delete_object(Bucket=self.bucket, Key=location.key)
        return run

    def chain(self) -> None:
        write_parent_output(self.source)
        self.outputs = job_outputs(self.source, OUTPUT_PREFIX, "2d")
        self.ctx.log(f"  parent 2D output: classes {self.outputs.class_particles}, selecting {SELECT}")
        uncached = [self.parent(f"uncached-{i}") for i in range(self.repeats)]  # a new key each: never in the cache
        chain = self.parent("parent")
        put = self.put_parent(chain)
        runs: dict[str, list[dict[str, Any]]] = {"cached": [], "uncached": [], "tarball": []}
        for i in range(self.repeats):
            order = ["cached", "uncached", "tarball"]
            order = order[i % 3:] + order[: i % 3]
            for name in order:
                if name == "tarball":
                    runs[name].append(self.subset_tarball(i))
                else:
                    runs[name].append(self.chained(chain if name == "cached" else uncached[i], name))
                self.ctx.log(f"    chain {name}: {runs[name][-1]['seconds']:.3f} s, S3 {runs[name][-1]['s3']}")
        self.details["chain"] = {"parent_output_bytes": chain.output_bytes, "put_into_cache": put, "class_particles": self.outputs.class_particles,
                                 "select_classes": list(SELECT), "particles": chain.particles,
                                 "runs": {n: [{k: v for k, v in r.items() if k != "result"} | {"record": r["result"]} for r in rs] for n, rs in runs.items()}}
        med = {n: statistics.median(r["seconds"] for r in rs) for n, rs in runs.items()}
        moved = {n: statistics.median(r["s3"]["get_bytes"] + r["s3"]["put_bytes"] for r in rs) for n, rs in runs.items()}
        tar = runs["tarball"][0]
        parts = {k: statistics.median(r["parts"][k] for r in runs["tarball"]) for k in tar["parts"]}
        # The chain's own split: the dataset's hit, then stage_parent (link the parent's output, write_subset).
        split = {part: statistics.median(r["result"][part]["seconds"] for r in runs["cached"]) for part in ("dataset", "parent")}
        group = f"chain ({len(SELECT)} of {CLASSES} classes, {chain.particles:,} particles)"
        label = "subset STAR + stacks as a new tar.gz, uploaded, staged cold"
        self.rows += [
            row(group, "seconds, chained stage-in: stage_dataset (hit) + stage_parent (cache hit, writes parent/particles.star)", round(med["cached"], 3),
                unit="s", baseline=round(med["tarball"], 2), baseline_label=label,
                note=f"medians of {self.repeats}; stage_dataset {split['dataset']:.3f} s, stage_parent {split['parent']:.3f} s "
                "(linking the parent's output, then write_subset reads the parent's data.star, writes the subset, reads it back and "
                f"checks every stack it names); baseline parts: write_subset {parts['write_subset_s']:.2f} s, pack_and_upload "
                f"{parts['pack_upload_s']:.2f} s ({tar['result']['subset']['image_stacks']} stacks, {tar['result']['packed']['bytes'] / MB:,.0f} MB), "
                f"cold stage-in {parts['stage_in_s']:.2f} s; putting the parent's output into the cache (the hook's move fill) took {put['seconds'] * 1000:.0f} ms"),
            row(group, "bytes through S3 (up + down)", float(moved["cached"]), unit="B", baseline=float(moved["tarball"]), baseline_label=label,
                note=f"the chain makes {max(r['s3']['heads'] for r in runs['cached'])} HEAD and {max(r['s3']['gets'] for r in runs['cached'])} GET requests"),
            row(group, "seconds, chained stage-in with the parent's output not cached (stage_parent GETs output.tar.gz, fills the entry)",
                round(med["uncached"], 3), unit="s", baseline=round(med["tarball"], 2), baseline_label=label,
                note=f"today's path while the archive hook fills no entry: {moved['uncached'] / MB:,.1f} MB read (the parent's output.tar.gz, "
                f"{chain.output_bytes / MB:,.1f} MB: the final iteration's files only; a real 2D job archives every iteration)"),
        ]
        self.figures |= {"chain_cached_s": med["cached"], "chain_uncached_s": med["uncached"], "subset_tarball_s": med["tarball"],
                         "chain_cached_s3_bytes": moved["cached"], "chain_uncached_s3_bytes": moved["uncached"], "subset_tarball_s3_bytes": moved["tarball"]}

    # -- the whole run ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        rmtree(self.tmp)
        try:
            remove_s3_prefix(self.storage, self.bucket, self.prefix + "/")
            self.ctx.log(f"  removed {self.tmp} and s3://{self.bucket}/{self.prefix}/")
        except Exception as exc:  # cleanup must not hide the result
            self.ctx.log(f"  S3 cleanup failed, remove s3://{self.bucket}/{self.prefix}/ by hand: {exc}")
        restore_environment(self._saved_env)

    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            self.ctx.log("  stage-in, cold vs hit:")
            self.cold_vs_hit()
            self.ctx.log("  chained stage-in:")
            self.chain()
        finally:
            self.cleanup()
        self.details["figures"] = self.figures
        self.notes += [
            (f"Dataset: {self.details['dataset']['files']} files, {self.size / MB:,.1f} MB (bench/datapath.py's make_dataset), "
             f"a {self.object_bytes / MB:,.1f} MB tar.gz made by pack_and_upload; S3 through S3Storage (credentials, one streaming GET); "
             "temp dirs under /var/tmp, the S3 server's data on the same file system."),
            ("Every timed run starts after os.sync(); the machine is shared (2 cores, other test runs): each run in cache.json gives its "
             f"own_cpu_s and the other_cpu_s the rest of the machine took meanwhile (median over the cold runs {self.cold_other:.1f} CPU s)."),
        ]
        return {"rows": self.rows, "details": self.details, "notes": self.notes}


def run(ctx: Context) -> dict[str, Any]:
    return Bench(ctx).run()


def main(argv: list[str] | None = None) -> int:
    from bench.run import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~105 MB dataset and one repeat (figures not comparable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx = Context(quick=args.quick, log=lambda message: print(message, flush=True))
    started = time.time()
    print(f"== {NAME}: {TITLE}", flush=True)
    result = run(ctx)
    for item in result["rows"]:
        item["passed"] = goal_met(item["value"], item["goal"])
        item["ratio"] = ratio_text(item["value"], item["baseline"], item["goal"])
    document = {"name": NAME, "title": TITLE, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "duration_s": round(time.time() - started, 1), "quick": args.quick, "error": None,
                "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}, **result}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{NAME}.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    print()
    print(table([document]))
    print(json.dumps({"bench": NAME, "quick": args.quick, "dataset_bytes": result["details"]["dataset"]["bytes"],
                      **{k: round(v, 4) if isinstance(v, float) else v for k, v in result["details"]["figures"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
