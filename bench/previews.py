"""Issue 15 item 1, "Previews, made in the job": what rendering costs against the job it serves.

1. Tiny jobs, per mode (TINY_FLAGS, 3 ranks; --quick: 2D only): a gateway served in-process (as
   tests/integration/conftest.py serves one) runs each job end to end. Each renderer process writes
   one ``done {...}`` line to ``<log_dir>/previews/render.log``: its wall seconds from process start
   (interpreter start-up and imports included), its CPU seconds, its peak RSS (VmHWM) and when it
   ended, which says whether the watcher (before the main job's ``finished`` stamp) or the archive
   hook started it. The figure is all renderers' CPU seconds (what they take from the job's cores;
   the watcher's run at nice 10, so their wall time stretches while RELION computes) against the
   job's wall time: the main job (``staging`` to ``finished``) plus the archive hook (metadata.json
   ``timings.archiving``); the wall seconds are in the note.
2. The watcher's peak RSS: the job's own output (output.tar.gz from S3, extracted) is watched by
   ``python -I -m gateway.jobside watch`` exactly as the main job starts it, until it has rendered
   every iteration (so its launcher has run the renderers); its own peak (VmHWM) against the same
   watcher on an output directory RELION has not written to yet, which starts no renderer (the
   watcher's footprint before previews: ~31 MB).
3. A box typical of a 1 GB dataset (synthetic arrays, about 4000 particles of 256 px): a 2D
   montage of 50 classes of 256 px, a 3D classification of 4 classes of 256^3 and an auto-refine
   of 256^3 half-maps with its FSC, each with a 25-iteration history; the renderer command for one
   iteration, as the watcher runs it (3 runs, median; --quick: 1).
4. The plots (the FSC and the 25-iteration history of section 3's auto-refine) drawn by the Pillow
   charts in a fresh process, against matplotlib (Agg) drawing the same two plots from the same
   model.star files: why the job side does not use matplotlib.

Every Slurm job submitted is cancelled at the end (also on a crash); the dataset and results under
s3://relion-local/{datasets/bench-previews-<id>.tar.gz, results/bench/previews-<id>/} are deleted.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import requests
from werkzeug.serving import make_server

from bench.common import ROOT, Context, restore_environment, row
from gateway import create_app
from gateway.auth import create_token
from gateway.config import build_config
from gateway.relion.dataset import make_dataset
from gateway.relion.presets import TINY_FLAGS
from gateway.stack.nodes import HEAD_NAME
from gateway.storage.s3 import S3Location, S3Storage, make_s3_client

NAME = "previews"
TITLE = "Previews made in the job: render time and RSS against the job's wall time"

TERMINAL = {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "submit_failed", "archive_failed", "lost"}
FINAL_KINDS = {"2d": "classes", "3d": "map-class1", "autorefine": "fsc"}
LARGE_BOX, LARGE_CLASSES_2D, LARGE_CLASSES_3D, LARGE_ITERATIONS, LARGE_PIXEL = 256, 50, 4, 25, 1.1


def run_measured(argv: list[str], *, timeout: float = 300.0, cwd: str = "/") -> tuple[float, float, str]:
    """Run a command; return (wall seconds, wait4's ru_maxrss in MB, stderr).

    ru_maxrss also counts this benchmark's pages forked before the exec: the figures use the
    programs' own VmHWM (printed on their stderr) instead.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:6]}... exited {proc.returncode}: {err[-500:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024, err


def done_lines(text: str) -> list[dict[str, Any]]:
    """The renderers' ``done {...}`` lines of a render.log (or a renderer's stderr)."""
    found = []
    for line in text.splitlines():
        if " previews: done " in line:
            found.append(json.loads(line.split(" previews: done ", 1)[1]))
    return found


def renderer(dataset: Path, prefix: str, mode: str, iteration: int, out: Path) -> list[str]:
    return [sys.executable, "-I", "-m", "gateway.jobside", "previews", "--dir", str(dataset), "--prefix", prefix,
            "--mode", mode, "--iteration", str(iteration), "--out", str(out)]


# -- synthetic large outputs (section 3) --------------------------------------------------------


def _blobs(shape: tuple[int, ...], rng: np.random.Generator, count: int = 8) -> np.ndarray:
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(count):
        centre = rng.normal(0, shape[0] * 0.08, len(shape))
        sigma = shape[0] * rng.uniform(0.03, 0.06)
        d2 = sum(((a - n / 2 - c) ** 2).astype(np.float32) for a, n, c in zip(axes, shape, centre))
        out += np.exp(-d2 / np.float32(2 * sigma**2))
    return out


def _model(path: Path, shares: np.ndarray, resolution: float, references: list[str], fsc: bool = False) -> None:
    from gateway.relion.star import StarBlock, loop_block, write_star

    general = StarBlock("model_general", values={
        "rlnCurrentResolution": f"{resolution:.6f}", "rlnPixelSize": f"{LARGE_PIXEL:.6f}", "rlnNrClasses": str(len(shares)),
    })
    classes = loop_block("model_classes", [
        {"rlnReferenceImage": ref, "rlnClassDistribution": float(s), "rlnEstimatedResolution": float(resolution + i % 5)}
        for i, (ref, s) in enumerate(zip(references, shares))
    ])
    blocks = [general, classes]
    if fsc:
        shells = range(LARGE_BOX // 2 + 1)
        blocks.append(loop_block("model_class_1", [
            {"rlnSpectralIndex": n, "rlnResolution": n / (LARGE_BOX * LARGE_PIXEL),
             "rlnAngstromResolution": (LARGE_BOX * LARGE_PIXEL / n) if n else 999.0,
             "rlnGoldStandardFsc": float(1 / (1 + np.exp((n - 60) / 6)))} for n in shells
        ]))
    write_star(path, blocks)


def make_large(root: Path) -> dict[str, tuple[str, str]]:
    """Write the three large runs under root; return mode -> (dataset dir, prefix)."""
    import mrcfile

    rng = np.random.default_rng(0)
    last = LARGE_ITERATIONS

    def write(path: Path, data: np.ndarray) -> None:
        with mrcfile.new(str(path), overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = LARGE_PIXEL

    box = LARGE_BOX
    (root / "Class2D").mkdir(parents=True)
    yy, xx = np.ogrid[:box, :box]
    mask = ((yy - box / 2) ** 2 + (xx - box / 2) ** 2) > (box * 0.4) ** 2
    stack = np.stack([_blobs((box, box), rng, 5) + rng.normal(0, 0.2, (box, box)).astype(np.float32) for _ in range(LARGE_CLASSES_2D)])
    stack[:, mask] = 0.0
    write(root / "Class2D" / f"run_it{last:03d}_classes.mrcs", stack.astype(np.float32))
    for n in range(1, last + 1):
        refs = [f"{k:06d}@Class2D/run_it{n:03d}_classes.mrcs" for k in range(1, LARGE_CLASSES_2D + 1)]
        _model(root / "Class2D" / f"run_it{n:03d}_model.star", rng.dirichlet(np.ones(LARGE_CLASSES_2D)), 12.0 - n * 0.2, refs)

    base = _blobs((box, box, box), rng)
    (root / "Class3D").mkdir()
    for k in range(1, LARGE_CLASSES_3D + 1):
        write(root / "Class3D" / f"run_it{last:03d}_class{k:03d}.mrc", base + rng.normal(0, 0.05, base.shape).astype(np.float32))
    for n in range(1, last + 1):
        refs = [f"Class3D/run_it{n:03d}_class{k:03d}.mrc" for k in range(1, LARGE_CLASSES_3D + 1)]
        _model(root / "Class3D" / f"run_it{n:03d}_model.star", rng.dirichlet(np.ones(LARGE_CLASSES_3D)), 9.0 - n * 0.1, refs)

    (root / "Refine3D").mkdir()
    for half in (1, 2):
        write(root / "Refine3D" / f"run_it{last:03d}_half{half}_class001.mrc", base + rng.normal(0, 0.05, base.shape).astype(np.float32))
    for n in range(1, last + 1):
        for half in (1, 2):
            ref = [f"Refine3D/run_it{n:03d}_half{half}_class001.mrc"]
            _model(root / "Refine3D" / f"run_it{n:03d}_half{half}_model.star", np.ones(1), 8.0 - n * 0.1, ref, fsc=True)
    return {"2d": (str(root), "Class2D/run"), "3d": (str(root), "Class3D/run"), "autorefine": (str(root), "Refine3D/run")}


# -- section 4: the plots, Pillow against matplotlib ---------------------------------------------

PLOTS_PILLOW = """
import sys
from pathlib import Path
from gateway.jobside.previews import Model, RunOutput
from gateway.jobside.preview_plots import IterationPoint, fsc_plot, history_plot
run = RunOutput(Path(sys.argv[1]), sys.argv[2], "autorefine")
last = int(sys.argv[3])
models = [Model.read(run.model_path(n), fsc=True) for n in range(1, last + 1)]
fsc_plot(models[-1].fsc, iteration=last, resolution=models[-1].resolution, pixel_size=models[-1].pixel_size, final=True).image.save(sys.argv[4] + "/fsc.png")
history_plot([IterationPoint(n, m.resolution, m.shares) for n, m in enumerate(models, 1)], iteration=last, classes=False).image.save(sys.argv[4] + "/history.png")
print("VmHWM", open("/proc/self/status").read().split("VmHWM:")[1].split()[0], file=sys.stderr)
"""

PLOTS_MATPLOTLIB = """
import sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
from matplotlib.figure import Figure
from gateway.jobside.previews import Model, RunOutput
run = RunOutput(Path(sys.argv[1]), sys.argv[2], "autorefine")
last = int(sys.argv[3])
models = [Model.read(run.model_path(n), fsc=True) for n in range(1, last + 1)]
final = models[-1]
fig = Figure(figsize=(7.6, 4.7), dpi=100)
ax = fig.add_subplot()
ax.plot([f for f, _ in final.fsc], [v for _, v in final.fsc], marker="o")
ax.axhline(0.143, ls="--", color="r")
ax.axvline(1 / final.resolution, ls="--", color="grey")
ax.set_xlabel("resolution (1/A)"); ax.set_ylabel("FSC"); ax.set_title(f"FSC {final.resolution:.1f} A")
fig.savefig(sys.argv[4] + "/fsc.png")
fig = Figure(figsize=(7.6, 4.4), dpi=100)
ax = fig.add_subplot()
ax.plot(range(1, last + 1), [m.resolution for m in models], marker="o")
ax.set_xlabel("iteration"); ax.set_ylabel("resolution (A)")
fig.savefig(sys.argv[4] + "/history.png")
print("VmHWM", open("/proc/self/status").read().split("VmHWM:")[1].split()[0], file=sys.stderr)
"""


class Bench:
    def __init__(self, ctx: Context) -> None:
        from gateway.stack import stack_status

        self.ctx, self.quick, self.tag = ctx, ctx.quick, secrets.token_hex(4)
        self.status = stack_status()
        if not self.status.get("all_up"):
            raise RuntimeError("the stack is not up: run `relion-gateway stack up` first")
        self.tmp = Path(tempfile.mkdtemp(prefix="relion-gateway-bench-previews-", dir="/var/tmp"))
        self.tmp.chmod(0o711)  # jobs run as another account ([job] run_as) and must reach their dirs below
        self.bucket = str(self.status["s3"]["bucket"])
        self.endpoint = str(self.status["s3"]["endpoint_url"])
        self.dataset_key = f"datasets/bench-previews-{self.tag}.tar.gz"
        self.output_prefix = f"results/bench/previews-{self.tag}"
        env = {k: v for k, v in self.status["environment"].items() if not k.startswith("GATEWAY_")}
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.storage = S3Storage(make_s3_client(self.endpoint, str(self.status["s3"]["region"])))
        self.slurm_ids: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    def close(self) -> None:
        if self.slurm_ids:
            subprocess.run(["scancel", *self.slurm_ids], capture_output=True, check=False, timeout=120)
        try:
            self.storage.client.delete_object(Bucket=self.bucket, Key=self.dataset_key)
            for page in self.storage.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.output_prefix + "/"):
                for item in page.get("Contents", []):
                    self.storage.client.delete_object(Bucket=self.bucket, Key=item["Key"])
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the result
            self.notes.append(f"could not remove the benchmark's S3 objects: {exc}")
        restore_environment(self._saved_env)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- 1 and 2: tiny jobs --------------------------------------------------------------------------

    def serve(self) -> tuple[Any, Any, str, requests.Session, Path]:
        state = self.tmp / "gateway"
        state.mkdir()
        state.chmod(0o711)
        config = build_config(environ={"GATEWAY_CONFIG": str(ROOT / "config" / "local.toml")})
        port = _free_head_port()
        url = f"http://{HEAD_NAME}:{port}"
        config.update({
            "PATHS_STATE_DIR": str(state), "PATHS_WORKSPACE_ROOT": str(state / "workspaces"), "PATHS_LOG_ROOT": str(state / "logs"),
            "STORE_DATABASE_URL": f"sqlite:///{state / 'gateway.sqlite'}", "S3_ENDPOINT_URL": self.endpoint,
            "SERVER_PUBLIC_URL": url, "POLLER_INTERVAL_ACTIVE": 1.0, "POLLER_INTERVAL_QUEUED": 1.0, "POLLER_INTERVAL_IDLE": 2.0,
        })
        app = create_app(config, storage=self.storage)
        server = make_server(HEAD_NAME, port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        token = create_token(app.extensions["relion_gateway"].store, "bench-previews", admin=True, n=int(config["AUTH_SCRYPT_N"]))[1]
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        return app, server, url, http, state / "logs"

    def tiny_jobs(self) -> None:
        data = self.tmp / "data" / "tiny"
        data.parent.mkdir()
        self.storage.upload_file(str(make_dataset(data)), S3Location(self.bucket, self.dataset_key))
        app, server, url, http, log_root = self.serve()
        results = {}
        try:
            for mode in (["2d"] if self.quick else ["2d", "3d", "autorefine"]):
                results[mode] = self.one_job(http, url, log_root, mode)
                r = results[mode]
                self.ctx.log(f"    {mode:10s} job {r['job_wall_s']:.1f} s, renders {r['render_cpu_s']:.2f} CPU-s ({r['render_share_pct']:.1f}%), "
                             f"renderer peak {r['renderer_peak_mb']:.0f} MB, watcher {r['watcher_peak_mb']:.1f} MB")
        finally:
            app.extensions["relion_gateway_poller"].stop()
            server.shutdown()
        self.details["tiny_jobs"] = results
        for mode, r in results.items():
            group = f"tiny {mode}"
            self.rows.append(row(group, "preview rendering CPU / job wall time", r["render_share_pct"], unit="%", goal=("<=", 5.0),
                                 note=f"{r['renders']} renderer process(es): {r['render_cpu_s']:.2f} CPU-s, {r['render_s']:.2f} s wall "
                                      f"({r['render_wall_share_pct']:.1f}% of the job; start-up included, at nice 10 beside RELION) against the job's "
                                      f"{r['job_wall_s']:.1f} s (main {r['main_s']:.1f} s + archive {r['archive_s']:.1f} s); "
                                      f"rendered by the archive hook, beside the packing: {r['archive_render_s']:.2f} s wall; "
                                      f"{r['previews']} PNGs, {r['preview_bytes'] // 1024} KiB"))
            self.rows.append(row(group, "renderer peak RSS", r["renderer_peak_mb"], unit="MB",
                                 note="the largest of the job's renderer processes (their VmHWM, from their render.log lines); the watcher never holds numpy, mrcfile or Pillow"))
            self.rows.append(row(group, "watcher peak RSS", r["watcher_peak_mb"], unit="MB", goal=("<=", r["watcher_once_mb"] * 1.1 + 1),
                                 baseline=r["watcher_once_mb"], baseline_label="the watcher before any iteration (no renderer)",
                                 note="the main job's watch command on this job's output until it had rendered every iteration; goal: within 10% of the watcher without previews"))

    def one_job(self, http: requests.Session, url: str, log_root: Path, mode: str) -> dict[str, Any]:
        request = {
            "user_id": "bench", "workspace_id": f"previews-{mode}", "dataset_s3_url": f"s3://{self.bucket}/{self.dataset_key}",
            "output_s3_prefix": f"s3://{self.bucket}/{self.output_prefix}", "mode": mode, "num_mpi": 3, "flags": dict(TINY_FLAGS[mode]),
        }
        response = http.post(f"{url}/v1/relion/jobs", json=request, headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=120)
        if response.status_code != 202:
            raise RuntimeError(f"submit failed: {response.status_code} {response.text[:300]}")
        job = response.json()
        self.slurm_ids += [i for i in (job["slurm"].get("main_job_id"), job["slurm"].get("archive_job_id")) if i]
        deadline = time.monotonic() + 600
        while True:
            current = http.get(f"{url}/v1/relion/jobs/{job['job_id']}", timeout=30).json()
            if current["status"] in TERMINAL:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{job['job_id']} still {current['status']} after 600 s")
            time.sleep(0.5)
        if current["status"] != "succeeded":
            raise RuntimeError(f"{mode}: {job['job_id']} ended {current['status']}: {current.get('message')}")
        log_dir = log_root / "bench" / job["job_id"]
        stamps = {k: float(v) for k, v in (line.split() for line in (log_dir / "phases").read_text().splitlines() if line.strip())}
        metadata = json.loads((log_dir / "metadata.json").read_text())
        renders = done_lines((log_dir / "previews" / "render.log").read_text())
        main_s = stamps["finished"] - stamps["staging"]
        archive_s = float(metadata["timings"]["archiving"] or 0.0)
        render_s = sum(r["seconds"] or 0.0 for r in renders)
        render_cpu_s = sum(r.get("cpu_seconds") or 0.0 for r in renders)
        archive_render_s = sum(r["seconds"] or 0.0 for r in renders if r["ended_at"] > stamps["finished"])
        watcher = self.watcher_rss(metadata, mode)
        return {
            "job_id": job["job_id"], "main_s": round(main_s, 2), "relion_s": round(stamps["finished"] - stamps["running"], 2),
            "archive_s": archive_s, "job_wall_s": round(main_s + archive_s, 2),
            "renders": len(renders), "render_s": round(render_s, 2), "render_cpu_s": round(render_cpu_s, 2),
            "archive_render_s": round(archive_render_s, 2),
            "render_share_pct": round(100.0 * render_cpu_s / (main_s + archive_s), 2),
            "render_wall_share_pct": round(100.0 * render_s / (main_s + archive_s), 2),
            "renderer_peak_mb": max((r["peak_rss_mb"] for r in renders), default=0.0),
            "render_lines": renders, "previews": len(metadata["previews"]),
            "preview_bytes": sum(p["bytes"] for p in metadata["previews"]), "kinds": sorted({p["kind"] for p in metadata["previews"]}),
            "watcher_peak_mb": watcher["with_previews_mb"], "watcher_once_mb": watcher["once_mb"], "watcher": watcher,
        }

    def watcher_rss(self, metadata: dict[str, Any], mode: str) -> dict[str, Any]:
        """The main job's watch command on the job's own output (section 2)."""
        work = self.tmp / f"watch-{mode}"
        (work / "logs").mkdir(parents=True)
        archive = work / "output.tar.gz"
        bucket, key = metadata["output"]["url"][len("s3://"):].split("/", 1)
        self.storage.client.download_file(bucket, key, str(archive))
        with tarfile.open(archive) as tar:
            tar.extractall(work / "dataset", filter="data")
        prefix = TINY_FLAGS[mode]["o"]
        last = int(metadata["relion"]["results"]["last_iteration"])
        argv = [sys.executable, "-I", "-m", "gateway.jobside", "watch", "--dir", str(work / "dataset"), "--prefix", prefix, "--mode", mode,
                "--job-id", "bench", "--progress-file", str(work / "logs" / "progress.json"), "--interval", "0.5"]
        from gateway.jobside.preview_runner import has_iteration

        # Without previews: the same watcher on a directory RELION has not written to yet (no renderer).
        empty = work / "empty"
        empty.mkdir()
        idle_mb = self._watch_peak([*argv[:6], str(empty), *argv[7:]], lambda: False, 3.0)
        started = time.perf_counter()
        peak_mb = self._watch_peak(argv, lambda: has_iteration(work / "logs" / "previews", last), 120.0)
        lines = done_lines((work / "logs" / "previews" / "render.log").read_text())
        return {"once_mb": idle_mb, "with_previews_mb": peak_mb, "renders": lines,
                "seconds_to_all_previews": round(time.perf_counter() - started, 2)}

    @staticmethod
    def _watch_peak(argv: list[str], done: Any, limit: float) -> float:
        """Run a watcher until ``done()`` (or ``limit`` s) and one more poll; its VmHWM in MB.

        VmHWM, not wait4's ru_maxrss: that counts the benchmark's own pages forked before the exec.
        """
        proc = subprocess.Popen(argv, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        try:
            while not done() and time.perf_counter() - started < limit:
                time.sleep(0.2)
            time.sleep(1.0)  # one more poll: the launcher reaps its renderer
            status = Path(f"/proc/{proc.pid}/status").read_text()
            return round(int(status.split("VmHWM:", 1)[1].split()[0]) / 1024, 1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    # -- 3: a box of a 1 GB dataset --------------------------------------------------------------

    def large(self) -> None:
        root = self.tmp / "large"
        started = time.perf_counter()
        runs = make_large(root)
        self.ctx.log(f"    synthetic box-{LARGE_BOX} outputs written in {time.perf_counter() - started:.1f} s")
        repeats = 1 if self.quick else 3
        figures = {}
        for mode, (dataset, prefix) in runs.items():
            times, peaks, sizes = [], [], []
            for attempt in range(repeats):
                out = self.tmp / f"large-out-{mode}-{attempt}"
                wall, peak, err = run_measured(renderer(Path(dataset), prefix, mode, LARGE_ITERATIONS, out))
                done = done_lines(err)[0]
                times.append(done["seconds"] or wall)
                peaks.append(done["peak_rss_mb"])
                sizes = [(p.name, p.stat().st_size) for p in sorted(out.glob("*.png"))]
            figures[mode] = {"seconds": round(statistics.median(times), 2), "runs_s": times, "peak_rss_mb": max(peaks), "pngs": sizes}
            what = {"2d": f"{LARGE_CLASSES_2D} classes of {LARGE_BOX} px", "3d": f"{LARGE_CLASSES_3D} maps of {LARGE_BOX}^3",
                    "autorefine": f"2 half-maps of {LARGE_BOX}^3 + FSC"}[mode]
            self.rows.append(row(f"box {LARGE_BOX} {mode}", "render one iteration", figures[mode]["seconds"], unit="s",
                                 note=f"{what}, {LARGE_ITERATIONS}-iteration history; renderer peak RSS {max(peaks):.0f} MB; "
                                      f"PNGs {', '.join(f'{n} {s // 1024} KiB' for n, s in sizes)}"))
            self.ctx.log(f"    box {LARGE_BOX} {mode:10s} {figures[mode]['seconds']:.2f} s, peak {max(peaks):.0f} MB")
        self.details["large"] = {"box": LARGE_BOX, "pixel_size": LARGE_PIXEL, "iterations": LARGE_ITERATIONS, "figures": figures}

    # -- 4: Pillow against matplotlib ------------------------------------------------------------

    def plots(self) -> None:
        source, prefix = str(self.tmp / "large"), "Refine3D/run"  # written by large()
        figures = {}
        for name, code in (("pillow", PLOTS_PILLOW), ("matplotlib", PLOTS_MATPLOTLIB)):
            out = self.tmp / f"plots-{name}"
            out.mkdir()
            walls, peaks = [], []
            for _ in range(1 if self.quick else 3):
                wall, _, err = run_measured([sys.executable, "-I", "-c", code, source, prefix, str(LARGE_ITERATIONS), str(out)])
                walls.append(wall)
                peaks.append(int(err.split("VmHWM", 1)[1].split()[0]) / 1024)
            figures[name] = {"seconds": round(statistics.median(walls), 3), "peak_rss_mb": round(max(peaks), 1)}
        self.details["plots"] = figures
        self.rows.append(row("plots", "FSC + history, fresh process", figures["pillow"]["seconds"], unit="s",
                             baseline=figures["matplotlib"]["seconds"], baseline_label="matplotlib Agg",
                             note=f"the same two plots from the same model.star files; peak RSS {figures['pillow']['peak_rss_mb']:.0f} MB "
                                  f"(matplotlib {figures['matplotlib']['peak_rss_mb']:.0f} MB)"))


def _free_head_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((HEAD_NAME, 0))
        return int(probe.getsockname()[1])


def run(ctx: Context) -> dict[str, Any]:
    bench = Bench(ctx)
    try:
        bench.tiny_jobs()
        bench.large()
        bench.plots()
    finally:
        bench.close()
    bench.notes.append(
        "Render seconds are each renderer process's whole life (interpreter start-up and imports included, from /proc), "
        "at nice 10 beside RELION for the watcher's; the watcher's renders overlap RELION, the archive hook's the packing of the output."
    )
    bench.notes.append(
        "Tiny jobs finish an iteration every few seconds and RELION ends seconds after its last one, when the job script stops "
        "the watcher: the final iteration is then rendered by the archive hook (render.log's `ended_at` after the main job's "
        "`finished` stamp)."
    )
    return {"rows": bench.rows, "details": bench.details, "notes": bench.notes}
