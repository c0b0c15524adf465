"""Run the benchmarks: `python bench/run.py [--only NAME] [--quick] [--list]`.

Every benchmark module in BENCHMARKS exposes ``NAME``, ``TITLE`` and ``run(ctx) -> dict`` with
``rows`` (see bench.common.row), ``details`` and ``notes``. The driver runs them in order, writes
``bench/results/<name>.json`` for each, then ``bench/results/report.md``: one markdown table built
from every registered benchmark's latest JSON. Figures are measured side by side in one run and
printed; nothing here asserts a timing, and a missed goal does not fail the run (a crash does).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, Context, fmt, goal_met, ratio_text  # noqa: E402

# name -> module. Later issues append theirs; the report keeps this order.
BENCHMARKS: dict[str, str] = {
    "tracking": "bench.tracking",  # Tracking that never floods slurmctld
    "datapath": "bench.datapath",  # S3 data path: stage-in and archive speed, disk and memory
    "overhead": "bench.overhead",  # Gateway overhead: submit latency, submissions/s, end-to-end tiny 2D
    "topology": "bench.topology",  # Multi-node: 1 vs 2 nodes end to end, poller RPCs, stack up
    "previews": "bench.previews",  # Previews made in the job: render time and RSS against the job's wall time
    "cache": "bench.cache",  # Dataset cache: a hit vs a cold stage-in, its disk, a chain vs a new tarball
    "push": "bench.push",  # Push instead of poll: conditional reads, waiters and streams, webhook latency
    "image": "bench.image",  # Container image: size, build cold / new commit / reused, the demo job through it vs the host
}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return ""


def run_one(name: str, ctx: Context) -> dict[str, Any]:
    module = importlib.import_module(BENCHMARKS[name])
    title = getattr(module, "TITLE", name)
    print(f"== {name}: {title}", flush=True)
    started = time.time()
    result: dict[str, Any] = {"rows": [], "details": {}, "notes": []}
    error = None
    try:
        result = module.run(ctx)
    except Exception:  # a crash is reported in the table and the exit code, the others still run
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
    for item in result["rows"]:
        item["passed"] = goal_met(item["value"], item["goal"])
        item["ratio"] = ratio_text(item["value"], item["baseline"], item["goal"])
    document = {
        "name": name,
        "title": title,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": ctx.quick,
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": _git_commit(),
        "error": error,
        **result,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"   done in {document['duration_s']} s -> {RESULTS_DIR / f'{name}.json'}", flush=True)
    return document


def _goal_text(goal: list[Any] | None, unit: str) -> str:
    if not goal:
        return ""
    op, threshold = goal
    return f"{op} {fmt(float(threshold))}{(' ' + unit) if unit and unit != '/s' else unit}".replace("<=", "≤").replace(">=", "≥")


def _value_text(value: Any, unit: str) -> str:
    text = fmt(value)
    return f"{text} {unit}".strip() if unit != "/s" else f"{text}/s"


def table(documents: list[dict[str, Any]]) -> str:
    lines = [
        "| benchmark | metric | gateway | baseline | ratio | goal | pass/miss |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for doc in documents:
        if doc.get("error"):
            lines.append(f"| {doc['name']} | **crashed** (see {doc['name']}.json) | | | | | miss |")
        for item in doc["rows"]:
            baseline = "" if item["baseline"] is None else f"{_value_text(item['baseline'], item['unit'])} ({item['baseline_label']})"
            verdict = {True: "pass", False: "**miss**", None: ""}[item["passed"]]
            lines.append(
                f"| {doc['name']}: {item['group']} | {item['metric']} | {_value_text(item['value'], item['unit'])} | {baseline} "
                f"| {item['ratio']} | {_goal_text(item['goal'], item['unit'])} | {verdict} |"
            )
    return "\n".join(lines)


def report(documents: list[dict[str, Any]]) -> str:
    parts = ["# relion-gateway benchmarks", "", table(documents), ""]
    for doc in documents:
        parts.append(f"## {doc['name']}: {doc['title']}")
        parts.append("")
        parts.append(
            f"Measured {doc['started_at']} in {doc['duration_s']} s on {doc['host']['node']} "
            f"({doc['host']['cpus']} CPUs, Python {doc['host']['python']}), commit {doc['commit'] or '?'}"
            + (" — **quick mode**" if doc.get("quick") else "")
            + "."
        )
        parts.append("")
        for item in doc["rows"]:
            if item.get("note"):
                parts.append(f"- {item['metric']}: {item['note']}")
        for note in doc.get("notes", []):
            parts.append(f"- {note}")
        if doc.get("error"):
            parts += ["", "```", doc["error"].rstrip(), "```"]
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME", help="run only this benchmark (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for trying the harness (figures are not comparable)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, module in BENCHMARKS.items():
            print(f"{name}\t{getattr(importlib.import_module(module), 'TITLE', '')}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx = Context(quick=args.quick, log=lambda message: print(message, flush=True))
    selected = args.only or list(BENCHMARKS)
    crashed = [name for name in selected if run_one(name, ctx)["error"]]

    # The report covers every registered benchmark with a result on disk, this run's or earlier.
    documents = []
    for name in BENCHMARKS:
        path = RESULTS_DIR / f"{name}.json"
        if path.exists():
            documents.append(json.loads(path.read_text()))
    text = report(documents)
    (RESULTS_DIR / "report.md").write_text(text)
    print()
    print(table([d for d in documents if d["name"] in selected]))
    print(f"\nreport: {RESULTS_DIR / 'report.md'}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
