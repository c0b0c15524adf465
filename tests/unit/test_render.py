"""Rendered scripts: golden files pin them; hostile values run through real bash execute nothing."""
from __future__ import annotations

import json
import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Flask

from gateway import create_app
from gateway.jobs.scripts import DRY_RUN_MAIN_ID
from gateway.jobs.spec import Attempt
from gateway.relion.continuing import continue_arguments
from tests.conftest import valid_request
from tests.fakes import FakeScheduler

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
MODES = {
    "2d": valid_request(),
    "3d": valid_request(mode="3d", flags={"i": "particles.star", "o": "Class3D/run", "ref": "ref.mrc", "K": 2, "iter": 2, "healpix_order": 1, "ini_high": 30, "firstiter_cc": True, "j": 2}),
    "autorefine": valid_request(mode="autorefine", flags={"i": "particles.star", "o": "Refine3D/run", "ref": "ref.mrc", "healpix_order": 1, "auto_local_healpix_order": 4, "ini_high": 30, "low_resol_join_halves": 40}),
}


def golden_app(tmp_path: Path, **overrides: object) -> Flask:
    return create_app(
        {
            "PATHS_STATE_DIR": "/scratch/relion-gateway",
            "PATHS_WORKSPACE_ROOT": "",
            "PATHS_LOG_ROOT": "",
            "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/golden.sqlite",
            "JOB_PYTHON": "/opt/relion-gateway/bin/python",
            "S3_ENDPOINT_URL": "http://127.0.0.1:9010",
            "SLURM_PARTITION": "debug",
            "RELION_ENVIRONMENT": {"OMPI_ALLOW_RUN_AS_ROOT": "1"},
            "SERVER_CALLBACK_SECRET": "golden-secret",
            **overrides,
        },
        scheduler=FakeScheduler(),
    )


@pytest.fixture
def fixed_job_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.jobs.prepare.secrets.token_hex", lambda n: "0123abcd")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rendered_scripts_match_golden_files(tmp_path: Path, fixed_job_id: None, mode: str) -> None:
    service = golden_app(tmp_path).extensions["relion_gateway"]
    prepared = service.prepare(MODES[mode])
    rendered = {"main": prepared.main_script, "archive": service.render_archive(prepared, DRY_RUN_MAIN_ID)}
    for kind, text in rendered.items():
        path = GOLDEN / f"{mode}.{kind}.sbatch"
        if os.environ.get("UPDATE_GOLDEN"):
            path.write_text(text)
        assert text == path.read_text(), f"{path} differs; rerun with UPDATE_GOLDEN=1 if the change is intended"


def test_a_continued_attempt_matches_its_golden_file(tmp_path: Path, fixed_job_id: None) -> None:
    """Attempt 2 of the 2D job: its own Slurm name, relion_refine --continue, the stage-in that keeps or restores."""
    service = golden_app(tmp_path).extensions["relion_gateway"]
    spec = service.prepare(MODES["2d"]).spec
    optimiser = "Class2D/run_it001_optimiser.star"
    continued = dataclasses.replace(
        spec,
        attempts=(*spec.attempts, Attempt(number=2, trigger="manual", from_iteration=1, continue_from=optimiser, workspace="restored")),
        relion_command=(spec.relion_command[0], *continue_arguments(spec.flags, optimiser, spec.output_prefix)),
    )
    text = service.scripts.main(continued)
    path = GOLDEN / "2d.attempt2.main.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; rerun with UPDATE_GOLDEN=1 if the change is intended"


def test_site_profile_changes_the_rendered_scripts(tmp_path: Path, fixed_job_id: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """config/site-example.toml: partition, account, qos, modules, srun --mpi=pmix, shared scratch."""
    monkeypatch.setenv("GATEWAY_CONFIG", str(Path(__file__).resolve().parents[2] / "config" / "site-example.toml"))
    app = create_app(
        {
            "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/site.sqlite",
            "PATHS_TEMPLATE_DIR": "",
            "PATHS_STATE_DIR": str(tmp_path / "state"),
            "SERVER_CALLBACK_SECRET": "golden-secret",
            "SERVER_PUBLIC_URL": "https://relion-gateway.example.org",
        },
        scheduler=FakeScheduler(),
    )
    service = app.extensions["relion_gateway"]
    request = valid_request(
        num_mpi=8,
        dataset_s3_url="s3://cryoem-datasets/lab1/particles.tar.gz",
        output_s3_prefix="s3://cryoem-results/lab1",
        flags={**MODES["2d"]["flags"], "j": 4},
    )
    prepared = service.prepare(request)
    rendered = {"main": prepared.main_script, "archive": service.render_archive(prepared, DRY_RUN_MAIN_ID)}
    for kind, text in rendered.items():
        path = GOLDEN / f"site-example.2d.{kind}.sbatch"
        if os.environ.get("UPDATE_GOLDEN"):
            path.write_text(text)
        assert text == path.read_text(), f"{path} differs; rerun with UPDATE_GOLDEN=1 if the change is intended"
    main = rendered["main"]
    assert "srun --mpi=pmix relion_refine_mpi" in main and "module load relion/4.0.1-cpu" in main
    assert "#SBATCH --account=cryoem-lab" in main and "#SBATCH --partition=cryoem" in main and "#SBATCH --constraint=avx2" in main
    assert "/scratch/relion-gateway/workspaces/alice/job_2d_ws1_0123abcd" in main


def test_optional_directives_disappear_when_unset(tmp_path: Path, fixed_job_id: None) -> None:
    service = golden_app(tmp_path, SLURM_PARTITION="", SLURM_ACCOUNT="").extensions["relion_gateway"]
    script = service.prepare(valid_request()).main_script
    assert "--partition" not in script and "--account" not in script and "--qos" not in script
    assert "#SBATCH --\n" not in script


def test_site_template_dir_overrides_the_packaged_template(tmp_path: Path, fixed_job_id: None) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "main.sbatch.j2").write_text("#!/bin/bash\n#SBATCH --ntasks={{ ntasks }}\n# site template for {{ job_id }}\n")
    service = golden_app(tmp_path, PATHS_TEMPLATE_DIR=str(site)).extensions["relion_gateway"]
    prepared = service.prepare(valid_request())
    assert prepared.main_script == "#!/bin/bash\n#SBATCH --ntasks=3\n# site template for job_2d_ws1_0123abcd\n"
    assert "--dependency=afterany:" in service.render_archive(prepared, "7")  # packaged archive template


def test_a_template_using_an_undefined_variable_fails_loudly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "main.sbatch.j2").write_text("#SBATCH --gres={{ gres }}\n")
    service = golden_app(tmp_path, PATHS_TEMPLATE_DIR=str(site)).extensions["relion_gateway"]
    with pytest.raises(Exception, match="'gres' is undefined"):
        service.prepare(valid_request())


HOSTILE = [
    "a b",
    "it's",
    'say "hi"',
    "$(touch PWNED_dollar)",
    "`touch PWNED_backtick`",
    "; touch PWNED_semicolon",
    "x && touch PWNED_and",
    "$HOME",
    "*",
    "| touch PWNED_pipe",
]


# Every string- or path-valued relion_refine option of mode 3d carries one hostile value.
STRING_OPTIONS = [
    "ref", "sym", "relax_sym", "helical_exclude_resols", "solvent_mask", "solvent_mask2",
    "lowpass_mask", "local_symmetry", "fourier_mask", "tau",
]


def recorder(path: Path, out: Path) -> Path:
    """A stand-in executable that appends its argv (as JSON) to ``out``."""
    path.write_text(f"#!/usr/bin/env python3\nimport json, sys\nopen({str(out)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_hostile_values_reach_relion_intact_and_execute_nothing(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    fake_relion = recorder(tmp_path / "relion_refine", calls)
    fake_python = recorder(tmp_path / "python", calls)
    app = golden_app(
        tmp_path,
        PATHS_STATE_DIR=str(tmp_path / "state"),
        JOB_PYTHON=str(fake_python),
        RELION_REFINE=str(fake_relion),
    )
    service = app.extensions["relion_gateway"]
    hostile_flags = dict(zip(STRING_OPTIONS, HOSTILE))
    flags = {"i": "particles.star", "o": "Out $(touch PWNED_dir)/run", **hostile_flags}
    prepared = service.prepare(
        valid_request(mode="3d", num_mpi=1, flags=flags, dataset_s3_url="s3://relion-local/it's $(touch PWNED_url);.tar.gz")
    )
    job = prepared.job
    Path(job["log_dir"]).mkdir(parents=True)
    (Path(job["workspace_dir"]) / "dataset").mkdir(parents=True)
    script = tmp_path / "main.sh"
    script.write_text(prepared.main_script)
    subprocess.run(["bash", str(script)], cwd=tmp_path, check=True, timeout=30, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})

    calls_made = [json.loads(line) for line in calls.read_text().splitlines()]
    stage_in = next(c for c in calls_made if c[:4] == ["-I", "-m", "gateway.jobside", "stage-in"])
    relion = next(c for c in calls_made if c[:1] == ["--i"])
    for watcher in (c for c in calls_made if c[:4] == ["-I", "-m", "gateway.jobside", "watch"]):
        # The background watcher may be killed by the EXIT trap before it starts; if it ran, its
        # arguments arrived intact too.
        assert watcher[watcher.index("--prefix") + 1] == "Out $(touch PWNED_dir)/run"
    assert stage_in[stage_in.index("--url") + 1] == "s3://relion-local/it's $(touch PWNED_url);.tar.gz"
    assert relion == prepared.job["relion_command"][1:]
    for option, value in hostile_flags.items():
        assert relion[relion.index(f"--{option}") + 1] == value
    assert (Path(job["workspace_dir"]) / "dataset" / "Out $(touch PWNED_dir)").is_dir()
    assert not list(tmp_path.rglob("PWNED*")), "a hostile value was executed"
    assert Path(job["log_dir"], "phases").read_text().split()[::2] == ["staging", "running", "finished"]


@pytest.mark.parametrize(
    ("imports", "forbidden"),
    [
        # What `python -m gateway.jobside watch` loads: it lives as long as RELION, inside the job's --mem.
        ("gateway.jobside.program gateway.jobside.watch gateway.callbacks", ("flask", "sqlalchemy", "gunicorn", "prometheus_client", "boto3")),
        ("gateway.jobside.program gateway.jobside.stage_in gateway.relion.inputs gateway.storage.s3", ("flask", "sqlalchemy", "gunicorn", "prometheus_client")),
    ],
)
def test_job_side_steps_import_no_server_code(imports: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys\nfor m in {imports.split()!r}: __import__(m)\nprint(sorted(m for m in {forbidden!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert loaded == "[]", f"job-side step imports {loaded}"
