"""`python -m gateway.jobside ...`: the steps the rendered sbatch scripts run on the compute node.

Every byte these processes hold counts against the job's --mem (and the progress watcher lives as
long as RELION), so each command imports only what it uses: requests for the gateway's presigned
S3 URLs (a job holds no S3 credentials and loads no boto3); never Flask, SQLAlchemy or gunicorn
(``python -m gateway`` would import them all: the watcher took 78 MB RSS that way, 31 MB this way).
The templates run these commands isolated (``python -I``) and from ``/``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gateway.relion.modes import MODES  # a constant only: no RELION parsing is imported

if TYPE_CHECKING:
    from gateway.jobside.brokered import BrokeredStorage

log = logging.getLogger(__name__)


@click.group("job")
def job_group() -> None:
    """Steps run inside the Slurm jobs (stage-in, archive); not for interactive use."""


def _gateway_storage(callback_url: str, job_id: str, output_url: str = "") -> "BrokeredStorage":
    """S3 through presigned URLs the gateway signs for this job (its token is in the environment)."""
    from gateway.callbacks import TOKEN_ENV
    from gateway.jobside.brokered import BrokeredStorage, GatewayLink

    link = GatewayLink(callback_url, job_id, os.environ.get(TOKEN_ENV, ""))
    link.preflight()  # the job's first step: an unreachable gateway is said at once, by address
    return BrokeredStorage(link, output_url)


def clear_earlier_run(dest: Path) -> bool:
    """Empty the job's dataset directory if an earlier run of this same attempt left it full: Slurm
    re-ran the script (a requeue after a node or controller failure, or the gateway's release of a
    job held after a failed launch). The attempt starts again from scratch, as its message says;
    the dataset is staged again, and the cache refuses a directory that is not empty. True if it did."""
    if dest.is_symlink() or not dest.is_dir() or not any(dest.iterdir()):
        return False
    import shutil

    log.warning("%s holds an earlier run of this job (Slurm ran its script again): starting from scratch", dest)
    shutil.rmtree(dest)
    return True


@job_group.command("stage-in")
@click.option("--url", required=True, help="s3://bucket/key of the dataset .tar.gz")
@click.option("--dest", required=True, type=click.Path(path_type=Path), help="directory to extract into")
@click.option("--record", type=click.Path(path_type=Path), help="write what was staged (JSON) here")
@click.option("--job-id", required=True, help="the gateway job (its token is in RELION_GATEWAY_JOB_TOKEN)")
@click.option("--callback-url", required=True, help="the gateway's API base URL: it presigns the dataset's GET")
@click.option("--quota-bytes", type=int, required=True, help="refuse a dataset larger than this when extracted")
@click.option("--max-members", type=int, required=True, help="refuse an archive with more members")
@click.option("--star", default=None, help="the --i STAR file: it and every image stack it names must exist")
@click.option("--require", "required", multiple=True, help="another input file that must exist (repeatable)")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="this account's dataset cache ([job] cache_dir)")
@click.option("--cache-quota-bytes", type=int, default=0, help="the cache's size limit")
@click.option("--job-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="job.json: a chained job's parent")
@click.option("--continue-from", default="", help="a continuation: the optimiser file (relative to DEST) RELION continues from")
@click.option("--output-dir", default="", help="with --continue-from: RELION's output directory (relative to DEST)")
def stage_in_command(
    url: str,
    dest: Path,
    record: Path | None,
    job_id: str,
    callback_url: str,
    quota_bytes: int,
    max_members: int,
    star: str | None,
    required: tuple[str, ...],
    cache_dir: Path | None,
    cache_quota_bytes: int,
    job_file: Path | None,
    continue_from: str,
    output_dir: str,
) -> None:
    """Stream the dataset from S3, extract it safely into DEST and check the inputs RELION will read.

    A continuation (--continue-from) uses the workspace an earlier attempt left when it is still
    there (the hook keeps it for an automatic continuation); otherwise it stages the dataset and
    the job's archived output again.
    """
    from gateway.jobs.spec import JobSpec
    from gateway.jobside.chain import stage_parent
    from gateway.jobside.stage_in import restore_output, stage_dataset, write_record
    from gateway.relion.subset import SubsetError
    from gateway.relion.inputs import MissingInputError, check_inputs
    from gateway.storage.base import StorageError

    try:
        if continue_from and (dest / continue_from).is_file():
            staged: dict[str, object] = {"url": url, "workspace": "kept", "bytes": 0}
        else:
            storage = _gateway_storage(callback_url, job_id)
            rerun = clear_earlier_run(dest)
            staged = stage_dataset(
                storage, url, dest, quota_bytes=quota_bytes, max_members=max_members, cache_root=cache_dir, cache_quota_bytes=cache_quota_bytes
            )
            if rerun:
                staged["rerun"] = True
            chain = JobSpec.load(job_file).chain if job_file else None
            if chain is not None:
                # The parent's output beside its dataset, and this job's --i written from it.
                staged["parent"] = stage_parent(
                    storage, dest, chain, quota_bytes=quota_bytes, max_members=max_members, cache_root=cache_dir, cache_quota_bytes=cache_quota_bytes
                )
            if continue_from:
                staged["workspace"] = "restored"
                staged["restored_output"] = restore_output(storage, dest, output_dir, quota_bytes=quota_bytes, max_members=max_members)
        if continue_from:
            staged["continue_from"] = continue_from
            if not (dest / continue_from).is_file():
                raise MissingInputError(f"{continue_from} (the iteration to continue from) is not in the earlier attempt's output")
        if star:
            staged["checked"] = check_inputs(dest, star, required)
    except (StorageError, tarfile.TarError, MissingInputError, SubsetError, ValueError, OSError) as exc:
        # tarfile.TarError covers our strict filter, the data filter's refusals and corrupt archives.
        # One line on stderr that the gateway shows as the job's message.
        click.echo(f"stage-in failed: {exc}", err=True)
        sys.exit(2)
    if record:
        write_record(staged, record)


@job_group.command("watch")
@click.option("--dir", "dataset_dir", required=True, type=click.Path(path_type=Path), help="RELION's working directory")
@click.option("--prefix", required=True, help="RELION's --o")
@click.option("--mode", required=True, type=click.Choice(MODES))
@click.option("--job-id", required=True)
@click.option("--progress-file", required=True, type=click.Path(path_type=Path))
@click.option("--iterations", type=int, default=None, help="--iter, if set")
@click.option("--callback-url", default="", help="the gateway's API base URL for signed events")
@click.option("--interval", type=float, default=2.0, show_default=True)
@click.option("--once", is_flag=True, help="report the current progress once and exit")
@click.option("--deadline", type=float, default=None, help="when Slurm's time limit ends the job (epoch seconds)")
def watch_command(
    dataset_dir: Path,
    prefix: str,
    mode: str,
    job_id: str,
    progress_file: Path,
    iterations: int | None,
    callback_url: str,
    interval: float,
    once: bool,
    deadline: float | None,
) -> None:
    """Report RELION's progress while it runs (runs in the background of the main job)."""
    from gateway.callbacks import post_event
    from gateway.jobside.watch import watch

    watch(
        dataset_dir,
        prefix,
        mode,
        progress_file=progress_file,
        report=lambda progress: post_event(callback_url, job_id, "progress", progress),
        interval=interval,
        iterations_planned=iterations,
        once=once,
        deadline=deadline,
    )


@job_group.command("previews")
@click.option("--dir", "dataset_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="RELION's working directory")
@click.option("--prefix", required=True, help="RELION's --o")
@click.option("--mode", required=True, type=click.Choice(MODES))
@click.option("--iteration", "iterations", required=True, multiple=True, type=click.IntRange(min=0), help="a finished iteration (repeatable)")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="<log_dir>/previews: the PNGs and index.json")
@click.option("--nice", type=click.IntRange(0, 19), default=0, show_default=True, help="lower this process's priority first")
def previews_command(dataset_dir: Path, prefix: str, mode: str, iterations: tuple[int, ...], out: Path, nice: int) -> None:
    """Render the PNG previews of finished iterations from RELION's output (started by the watcher)."""
    import json
    import resource
    import signal
    import time

    if nice:
        os.nice(nice)
    for threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(threads, "1")  # before numpy loads: no BLAS thread pool (-0.06 s of 0.3 s a render)
    # Stopped by the watcher (job ending) or a timeout: unwind, so no temporary file is left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s previews: %(message)s", stream=sys.stderr)
    from gateway.jobside.previews import render_previews

    written, failures = render_previews(dataset_dir, prefix, mode, list(iterations), out)
    # One machine-readable line per renderer (bench/previews.py reads it from render.log).
    log.info("done %s", json.dumps({
        "iterations": list(dict.fromkeys(iterations)), "previews": len(written), "failures": len(failures),
        "seconds": _process_age(), "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 2), "peak_rss_mb": _peak_rss_mb(),
        "ended_at": round(time.time(), 3),
    }))
    sys.exit(1 if failures else 0)


def _peak_rss_mb() -> float | None:
    """This program's peak RSS (VmHWM: ru_maxrss would also count the parent's pages forked before exec)."""
    try:
        status = Path("/proc/self/status").read_text()
        return round(int(status.split("VmHWM:", 1)[1].split()[0]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None


def _process_age() -> float | None:
    """Seconds since this process started, interpreter start-up included (from /proc); None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)


@job_group.command("gpu-layout")
@click.option("--mode", required=True, type=click.Choice(MODES))
@click.option("--ranks", required=True, type=click.IntRange(min=1), help="the job's MPI ranks (1: sequential relion_refine)")
@click.option("--log-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="where gpus.json is written")
def gpu_layout_command(mode: str, ranks: int, log_dir: Path) -> None:
    """Print RELION's --gpu device string for the GPUs Slurm assigned this job; record it in gpus.json."""
    from gateway.jobside.gpus import NoGpuError, current_layout

    try:
        layout = current_layout(ranks=ranks, mode=mode, log_dir=log_dir)
    except (NoGpuError, OSError) as exc:
        click.echo(f"gpu-layout failed: {exc}", err=True)
        sys.exit(2)
    for warning in layout.warnings:
        click.echo(f"gpu-layout: {warning}", err=True)
    click.echo(layout.device_string)


@job_group.command("archive")
@click.option("--job-file", required=True, type=click.Path(exists=True, path_type=Path), help="job.json written at submit")
@click.option("--main-slurm-id", required=True)
@click.option("--compressor", default="pigz", show_default=True, type=click.Choice(["pigz", "gzip"]))
@click.option("--callback-url", required=True, help="the gateway's API base URL: it presigns the uploads and takes the metadata")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="leave the output in this dataset cache")
@click.option("--cache-quota-bytes", type=int, default=0)
def archive_command(job_file: Path, main_slurm_id: str, compressor: str, callback_url: str, cache_dir: Path | None, cache_quota_bytes: int) -> None:
    """Pack and upload the output, write metadata.json, then delete the workspace."""
    from gateway.callbacks import post_event
    from gateway.jobs.spec import JobSpec
    from gateway.jobside.archive import ArchiveError, run_archive
    from gateway.process import CommandError
    from gateway.relion.results import summarize_results
    from gateway.slurm.cli import SlurmCliBackend
    from gateway.storage.base import StorageError

    # The record as written at submit, read by attribute; this hook's own Slurm id is known only here.
    job = dataclasses.replace(JobSpec.load(job_file), archive_slurm_id=os.environ.get("SLURM_JOB_ID"))
    scheduler = SlurmCliBackend()
    try:
        storage = _gateway_storage(callback_url, job.job_id, job.output_url)
        run_archive(
            job,
            main_slurm_id,
            storage=storage,
            scheduler=scheduler,
            compressor=compressor,
            summarize=summarize_results,
            accounting=scheduler.accounting,
            report=lambda metadata: post_event(callback_url, job.job_id, "metadata", metadata),
            cache_root=cache_dir,
            cache_quota_bytes=cache_quota_bytes,
        )
    except (StorageError, ArchiveError, CommandError, OSError) as exc:
        click.echo(f"archive failed, workspace kept: {exc}", err=True)
        sys.exit(3)
