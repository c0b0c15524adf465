"""The completion hook: pack the output, upload it with metadata.json and the logs, then clean up.

It runs as its own Slurm job with ``--dependency=afterany:<main>``, so it runs whatever the main
job's fate. The workspace is deleted only after the uploaded archive's size has been verified; any
S3 failure leaves the workspace in place and the hook exits non-zero (gateway state
``archive_failed``), so an output is never lost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

from gateway.jobs.phases import Phases
from gateway.jobs.spec import JobSpec
from gateway.jobs.states import auto_continues
from gateway.jobside.gpus import RECORD_NAME as GPU_RECORD_NAME
from gateway.jobside.preview_runner import INDEX_FIELDS, INDEX_NAME, NAME_PATTERN, FinalRender, log_line, preview_dir, read_index
from gateway.process import CommandError
from gateway.relion.logs import error_line, rank_hosts_in
from gateway.slurm.backend import SchedulerBackend, SlurmJobInfo
from gateway.storage.base import HashingReader, JobStorage, S3Location, StorageError, parse_s3_url

log = logging.getLogger(__name__)

METADATA_SCHEMA_VERSION = 1
T = TypeVar("T")


class ArchiveError(Exception):
    """The output could not be archived safely; the workspace was kept."""


# GNU tar exits 1 (the archive itself is whole) when a file changed while it was read. Once the
# main job has ended nothing should write there, but a job whose node Slurm declared dead may still
# be running on it, cut off from slurmctld but not from the shared file system (the node-cut test
# saw RELION write two more iterations while its hook packed them). Pack again after a pause; the
# last try keeps what it read and names the files in metadata.json.
_TAR_CHANGED = re.compile(r"^tar: (.+): file changed as we read it$", re.MULTILINE)
PACK_ATTEMPTS = 3
PACK_SETTLE_S = 5.0


class OutputChanging(CommandError):
    """tar read files that were being written (exit 1); ``paths`` names them."""

    def __init__(self, argv: list[str], stderr: str, paths: list[str]) -> None:
        super().__init__(argv, 1, "", stderr, "files changed while they were packed")
        self.paths = paths


def retry(action: Callable[[], T], *, what: str, attempts: int = 4, first_delay: float = 2.0) -> T:
    """Retry an S3 action with exponential backoff (2, 4, 8 s by default)."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except StorageError as exc:
            if attempt == attempts:
                raise
            log.warning("%s failed (attempt %d/%d), retrying in %.0f s: %s", what, attempt, attempts, delay, exc)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def pack_and_upload(
    storage: JobStorage,
    source_root: Path,
    member: str,
    location: S3Location,
    *,
    compressor: str = "pigz",
    timeout: float = 6 * 3600,
    keep_changed: bool = False,
) -> dict[str, Any]:
    """Stream ``tar -cf - member | <compressor> -6`` into a multipart upload; return bytes and sha256.

    GNU tar plus pigz is ~3x faster than Python's gzip on this path (shared notes), and streaming
    needs no temporary archive on disk. Files that changed while tar read them raise
    OutputChanging, unless ``keep_changed``: then the result names them (``changed_while_packed``).
    """
    size_hint = sum(p.stat().st_size for p in (source_root / member).rglob("*") if p.is_file())
    tar_argv = ["tar", "-cf", "-", "-C", str(source_root), "--", member]
    compress_argv = [compressor, "-6", "-c"]
    tar = subprocess.Popen(tar_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdout is not None
    try:
        packer = subprocess.Popen(compress_argv, stdin=tar.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        tar.kill()
        tar.wait(timeout=30)
        raise CommandError(compress_argv, None, "", str(exc), "could not be started") from exc
    tar.stdout.close()  # the compressor owns the pipe now; tar gets SIGPIPE if the compressor dies
    assert packer.stdout is not None
    hashing = HashingReader(packer.stdout)
    try:
        storage.upload_stream(hashing, location, size_hint=size_hint)
    finally:
        # An upload error must not leave the producers blocked on a full pipe.
        packer.stdout.close()
        for proc, argv in ((packer, compress_argv), (tar, tar_argv)):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
                raise CommandError(argv, None, "", "", f"timed out after {timeout:g} s")
    packed: dict[str, Any] = {"bytes": hashing.bytes, "sha256": hashing.sha256.hexdigest(), "uncompressed_bytes": size_hint}
    for proc, argv in ((tar, tar_argv), (packer, compress_argv)):
        if proc.returncode != 0:
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            changed = _TAR_CHANGED.findall(stderr) if proc is tar and proc.returncode == 1 else []
            if not changed:
                raise CommandError(argv, proc.returncode, "", stderr)
            if not keep_changed:
                raise OutputChanging(argv, stderr, changed)
            packed["changed_while_packed"] = changed
    return packed


def pack_settled(storage: JobStorage, source_root: Path, member: str, location: S3Location, *, compressor: str,
                 settle_s: float = PACK_SETTLE_S) -> dict[str, Any]:
    """pack_and_upload, again after ``settle_s`` while files change under it (see _TAR_CHANGED)."""
    for attempt in range(1, PACK_ATTEMPTS + 1):
        try:
            return pack_and_upload(storage, source_root, member, location, compressor=compressor,
                                   keep_changed=attempt == PACK_ATTEMPTS)
        except OutputChanging as exc:
            log.warning("the output changed while it was packed (%s; attempt %d/%d): packing it again in %g s",
                        ", ".join(exc.paths[:5]), attempt, PACK_ATTEMPTS, settle_s)
            time.sleep(settle_s)
    raise AssertionError("unreachable")


def list_files(root: Path) -> list[dict[str, Any]]:
    return [
        {"path": str(p.relative_to(root)), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


def wait_for_final_state(scheduler: SchedulerBackend, slurm_id: str, *, timeout: float = 30.0) -> SlurmJobInfo | None:
    """The main job has ended when this hook starts, but its sacct record can lag ~1 s."""
    deadline = time.monotonic() + timeout
    info: SlurmJobInfo | None = None
    while True:
        info = scheduler.status([slurm_id]).get(slurm_id)
        if (info and info.state.is_terminal and info.source == "sacct") or time.monotonic() > deadline:
            return info
        time.sleep(1.0)


def phase_timings(accepted_at: float, phases: Phases, archive_started: float, archive_ended: float) -> dict[str, float | None]:
    """Seconds spent queued, staging, running and archiving (the latest run's, if Slurm requeued the job)."""
    staging = phases.last_time("staging")
    running = phases.last_time("running")
    finished = phases.last_time("finished")

    def span(a: float | None, b: float | None) -> float | None:
        return round(b - a, 3) if a is not None and b is not None else None

    return {
        "queued": span(accepted_at, staging),
        "staging": span(staging, running),
        "running": span(running, finished),
        "archiving": span(archive_started, archive_ended),
    }


def _read_json(path: Path) -> Any:
    """A job-side record such as gpus.json, or None: a missing or torn one never stops the archive."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def upload_previews(storage: JobStorage, out: Path, destination: S3Location, *, retry_delay: float = 2.0) -> list[dict[str, Any]]:
    """Upload every PNG index.json lists to ``<destination>/previews/<name>``, then the index itself.

    Return the index's entries with their ``url``. Previews are a convenience: one that is missing,
    has changed since it was indexed or cannot be uploaded is left out (and said in render.log),
    never a reason for ``archive_failed``; the uploaded index.json lists exactly what was uploaded.
    """
    index = read_index(out)
    if index is None:
        return []
    uploaded: list[dict[str, Any]] = []
    for entry in index["previews"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            continue
        path = out / name
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            log_line(out, f"archive: {name} changed after it was indexed; not uploaded")
            continue
        location = destination.child(f"previews/{name}")
        try:
            retry(lambda: _put(storage, data, location, "image/png"), what=f"preview upload {name}", first_delay=retry_delay)
        except StorageError as exc:
            log_line(out, f"archive: {name} not uploaded: {exc}")
            continue
        uploaded.append({**{k: entry.get(k) for k in INDEX_FIELDS}, "url": location.url})
    document = {
        "schema_version": index.get("schema_version"),
        "updated_at": index.get("updated_at"),
        "previews": [{k: e[k] for k in INDEX_FIELDS} for e in uploaded],
    }
    body = (json.dumps(document, indent=2) + "\n").encode()
    try:
        retry(lambda: _put(storage, body, destination.child(f"previews/{INDEX_NAME}"), "application/json"), what="preview index upload", first_delay=retry_delay)
    except StorageError as exc:
        log_line(out, f"archive: {INDEX_NAME} not uploaded: {exc}")
    return uploaded


def _put(storage: JobStorage, data: bytes, location: S3Location, content_type: str) -> None:
    put_bytes = getattr(storage, "put_bytes", None)  # both stores have it; the protocol does not require it
    if put_bytes is not None:
        put_bytes(data, location, content_type)
    else:
        import io

        storage.upload_stream(io.BytesIO(data), location, size_hint=len(data))


def attempt_summaries(job: JobSpec, main: SlurmJobInfo | None, results: dict[str, Any], input_record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every attempt of the job: the earlier ones as the gateway recorded them, then this one."""
    current = dataclasses.replace(
        job.attempt,
        main_slurm_id=main.job_id if main else job.main_slurm_id,
        archive_slurm_id=job.archive_slurm_id,
        slurm_state=main.raw_state if main else "",
        exit_code=main.exit_code if main else None,
        last_iteration=results.get("last_iteration"),
        workspace=str(input_record.get("workspace") or job.attempt.workspace),
    )
    return [a.to_dict() for a in (*job.attempts[:-1], current)]


def final_outputs(dataset_dir: Path, job: JobSpec) -> dict[str, Any] | None:
    """The job's final outputs as a chained child will read them (gateway.relion.subset), or None."""
    from gateway.relion.subset import SubsetError, job_outputs

    try:
        return job_outputs(dataset_dir, job.output_prefix, job.mode).to_dict()
    except (SubsetError, OSError) as exc:  # e.g. an auto-refine that did not converge: no child can start from it
        log.info("no outputs to chain from: %s", exc)
        return None


def _parent_record(job: JobSpec, input_record: dict[str, Any]) -> dict[str, Any] | None:
    if job.chain is None:
        return None
    staged = input_record.get("parent") or {}
    return {
        "job_id": job.chain.parent_job_id,
        "mode": job.chain.parent_mode,
        "select_classes": list(job.chain.select_classes) if job.chain.select_classes is not None else None,
        "ref_class": job.chain.ref_class,
        "particles": staged.get("particles", job.chain.particles),
        "star": staged.get("star"),
        "from_cache": bool((staged.get("cache") or {}).get("hit")),
    }


def cache_output(cache_root: Path, quota_bytes: int, output: dict[str, Any], dataset_dir: Path, output_dir: str, scratch: Path) -> None:
    """Leave the archived output in the dataset cache, keyed by the output.tar.gz just uploaded.

    A chained child then links these files instead of downloading the archive. The tree is moved,
    not copied (the workspace is deleted next); any failure only means the child downloads.
    """
    from gateway.jobside.cache import CacheError, CacheKey, DatasetCache

    def fill(tree: Path) -> dict[str, Any]:
        target = tree / output_dir
        target.parent.mkdir(parents=True, exist_ok=True)
        (dataset_dir / output_dir).rename(target)
        return {"bytes": output["bytes"], "sha256": output["sha256"], "members": len(output["files"])}

    try:
        DatasetCache(cache_root, quota_bytes).use(CacheKey(output["url"], str(output["etag"] or ""), int(output["bytes"])), scratch, fill)
    except (CacheError, OSError, ValueError) as exc:
        log.warning("output not cached for chained jobs: %s", exc)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def run_archive(
    job: JobSpec,
    main_slurm_id: str,
    *,
    storage: JobStorage,
    scheduler: SchedulerBackend,
    compressor: str = "pigz",
    summarize: Callable[[Path, str, str], dict[str, Any]] | None = None,
    accounting: Callable[[str], dict[str, str]] | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    retry_delay: float = 2.0,
    render_previews: bool = True,
    preview_timeout: float = 300.0,
    cache_root: Path | None = None,
    cache_quota_bytes: int = 0,
) -> dict[str, Any]:
    """Archive one job's output; return metadata.json's content. Raise ArchiveError if not safe.

    With ``render_previews``, the previews the watcher missed (the last iteration's first) are
    rendered in a child process while the output is packed, and every preview is uploaded.
    """
    started = time.time()
    log_dir = Path(job.log_dir)
    workspace = Path(job.workspace_dir)
    dataset_dir = workspace / "dataset"
    destination = parse_s3_url(job.output_url)

    main = wait_for_final_state(scheduler, main_slurm_id)
    results: dict[str, Any] = {}
    if summarize is not None and dataset_dir.is_dir():
        try:
            results = summarize(dataset_dir, job.output_prefix, job.mode)
        except Exception as exc:  # a corrupt STAR file must not stop the output from being saved
            log.exception("could not parse RELION results")
            results = {"error": str(exc)}

    previews_out = preview_dir(log_dir)
    final_render = None
    if render_previews and dataset_dir.is_dir():
        final_render = FinalRender.start(dataset_dir, job.output_prefix, job.mode, previews_out)

    output: dict[str, Any] | None = None
    output_root = dataset_dir / job.output_dir
    if output_root.is_dir():
        archive_location = destination.child("output.tar.gz")
        packed = retry(
            lambda: pack_settled(storage, dataset_dir, job.output_dir, archive_location, compressor=compressor,
                                 settle_s=retry_delay * 2.5),
            what="output upload",
            first_delay=retry_delay,
        )
        remote = retry(lambda: storage.head(archive_location), what="output verification", first_delay=retry_delay)
        if remote.size != packed["bytes"]:
            raise ArchiveError(f"{archive_location.url} holds {remote.size} bytes, {packed['bytes']} were sent")
        output = {
            "url": archive_location.url,
            "bytes": packed["bytes"],
            "uncompressed_bytes": packed["uncompressed_bytes"],
            "sha256": packed["sha256"],
            "etag": remote.etag,
            "files": list_files(output_root),
        }
        if packed.get("changed_while_packed"):
            log.warning("kept an archive whose files changed while they were packed: %s", ", ".join(packed["changed_while_packed"]))
            output["changed_while_packed"] = packed["changed_while_packed"]

    if final_render is not None:
        final_render.wait(preview_timeout)  # its failure is in render.log; the archive goes on
    previews = upload_previews(storage, previews_out, destination, retry_delay=retry_delay) if render_previews else []

    logs: list[str] = []
    for path in sorted(log_dir.glob("main-*")):
        if path.is_symlink() or not path.is_file():
            # Slurm writes regular files; anything else was put there by the job, not a log to keep.
            log.warning("not uploading %s: not a regular file", path)
            continue
        location = destination.child(f"logs/{path.name}")
        retry(lambda: storage.upload_file(str(path), location), what=f"log upload {path.name}", first_delay=retry_delay)
        logs.append(location.url)

    input_record_path = log_dir / "input.json"
    input_record = json.loads(input_record_path.read_text()) if input_record_path.exists() else {"url": job.dataset_s3_url}
    usage: dict[str, str] = {}
    if accounting is not None:
        try:
            usage = accounting(main_slurm_id)
        except Exception as exc:  # accounting is nice to have; never a reason to lose the output
            log.warning("no accounting for %s: %s", main_slurm_id, exc)
    hosts = rank_hosts_in(log_dir / f"main-{main_slurm_id}.out")
    error = ""
    if main is None or main.state.value != "COMPLETED":
        error = error_line(log_dir / f"main-{main_slurm_id}.err")
    flags = job.flags
    ended = time.time()
    gpus = _read_json(log_dir / GPU_RECORD_NAME)
    metadata: dict[str, Any] = {
        "schema_version": METADATA_SCHEMA_VERSION,
        "job": {
            "job_id": job.job_id,
            "user_id": job.user_id,
            "workspace_id": job.workspace_id,
            "mode": job.mode,
            "accepted_at": _iso(job.accepted_at),
        },
        "request": job.request,
        "resources": {
            **(job.resources.as_dict() if job.resources else {}),
            "pool": flags.get("pool"),
            # What ran, from sacct (text, as sacct prints it); the record's own "nodes" is the plan.
            "nodes": usage.get("nodes"),
            "planned_nodes": job.resources.nodes if job.resources else None,
            "node_list": usage.get("node_list"),
            "gpus": gpus,
            "rank_hosts": [{"rank": h.rank, "host": h.host} for h in hosts],
            "hosts": sorted({h.host for h in hosts}),
        },
        "slurm": {
            "main_job_id": main_slurm_id,
            "archive_job_id": job.archive_slurm_id,
            "state": main.raw_state if main else None,
            "exit_code": main.exit_code if main else None,
            "signal": main.signal if main else None,
            "start": main.start if main else None,
            "end": main.end if main else None,
            "elapsed": main.elapsed if main else None,
            "total_cpu": usage.get("total_cpu"),
            "cpu_time_allocated": usage.get("cpu_time_allocated"),
        },
        "relion": {
            "version": results.get("relion_version"),
            # The command RELION ran: the template appends the --gpu string gpu-layout built.
            "command": [*job.relion_command, *(["--gpu", str(gpus["device_string"])] if gpus and gpus.get("device_string") else [])],
            "error": error or None,
            "results": results,
        },
        "input": input_record,
        "output": output,
        "logs": logs,
        "previews": previews,
        "timings": phase_timings(job.accepted_at, Phases.read(log_dir), started, ended),
        "attempts": attempt_summaries(job, main, results, input_record),
        # What a chained child may take from this job (its final data.star, model, class maps).
        "outputs": final_outputs(dataset_dir, job) if output else None,
        "parent": _parent_record(job, input_record),
        # The gateway will continue this job by itself (auto_continue): the next attempt starts from
        # this workspace instead of staging the dataset and this output in again.
        "workspace_kept": bool(
            auto_continues(job.auto_continue, job.attempt.number, main.state if main else None)
            and (results.get("last_iteration") or 0) >= 1
        ),
    }
    (log_dir / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    retry(lambda: storage.put_json(metadata, destination.child("metadata.json")), what="metadata upload", first_delay=retry_delay)

    if report is not None:
        report(metadata)  # the gateway hears of it at once; the poller would find it anyway
    if metadata["workspace_kept"]:
        log.info("archived %s to %s; workspace kept for the next attempt", job.job_id, destination.url)
        return metadata
    if cache_root is not None and output is not None:
        cache_output(cache_root, cache_quota_bytes, output, dataset_dir, job.output_dir, workspace / "cached-output")
    # Only now, with the archive verified and metadata stored, is the workspace disposable.
    shutil.rmtree(workspace, ignore_errors=True)
    log.info("archived %s to %s", job.job_id, destination.url)
    return metadata
