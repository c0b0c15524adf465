"""Result summaries and progress from recorded RELION 3.1.3 output (tests/fixtures/relion)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.relion.results import read_progress, summarize_results
from gateway.relion.star import StarError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "relion"


def copy_fixture(mode: str, tmp_path: Path) -> Path:
    target = tmp_path / mode
    shutil.copytree(FIXTURES / mode, target)
    return target


def assert_json_safe(summary: dict[str, object]) -> None:
    json.dumps(summary, allow_nan=False)  # raises on NaN/inf or non-JSON types


def test_2d_classification() -> None:
    summary = summarize_results(FIXTURES / "2d", "Class2D/run", "2d")
    assert_json_safe(summary)
    assert summary["iterations_run"] == 2
    assert summary["last_iteration"] == 2
    assert summary["iterations_planned"] == 2
    assert summary["completed"] is True
    assert summary["converged"] is None
    assert summary["classes"] == 3
    assert len(summary["class_distribution"]) == 3
    assert sum(summary["class_distribution"]) == pytest.approx(1.0, abs=1e-3)
    assert summary["resolution_angstrom"] == pytest.approx(21.333333)
    assert summary["final_resolution_angstrom"] is None
    assert summary["resolution_per_iteration"] == [
        {"iteration": 0, "resolution_angstrom": None},  # inf in it000
        {"iteration": 1, "resolution_angstrom": pytest.approx(10.666667)},
        {"iteration": 2, "resolution_angstrom": pytest.approx(21.333333)},
    ]
    assert summary["relion_command"].startswith("--i particles.star --o Class2D/run --K 3 --iter 2 ")
    assert summary["relion_command"] == summary["relion_command"].strip()
    assert summary["relion_version"] == "3.1.3"
    assert summary["fsc"] is None
    # Only STAR files are recorded, so only those appear in the file list.
    assert summary["files"] == {
        "optimiser": "Class2D/run_it002_optimiser.star",
        "model": "Class2D/run_it002_model.star",
        "data": "Class2D/run_it002_data.star",
        "sampling": "Class2D/run_it002_sampling.star",
        "classes": [],
    }


def test_2d_files_list_class_stacks_when_present(tmp_path: Path) -> None:
    root = copy_fixture("2d", tmp_path)
    (root / "Class2D" / "run_it002_classes.mrcs").write_bytes(b"")
    (root / "Class2D" / "run_it001_classes.mrcs").write_bytes(b"")
    (root / "Class2D" / "run_unmasked_classes.mrcs").write_bytes(b"")
    files = summarize_results(root, "Class2D/run", "2d")["files"]
    assert files["classes"] == ["Class2D/run_it002_classes.mrcs"]
    assert files["unmasked_classes"] == "Class2D/run_unmasked_classes.mrcs"


def test_3d_classification() -> None:
    summary = summarize_results(FIXTURES / "3d", "Class3D/run", "3d")
    assert_json_safe(summary)
    assert summary["iterations_run"] == 2
    assert summary["classes"] == 2
    assert sum(summary["class_distribution"]) == pytest.approx(1.0, abs=1e-3)
    assert all(0.0 < d < 1.0 for d in summary["class_distribution"])
    assert summary["converged"] is None
    assert summary["completed"] is True
    assert [p["iteration"] for p in summary["resolution_per_iteration"]] == [0, 1, 2]
    assert summary["resolution_angstrom"] is not None and summary["resolution_angstrom"] > 0
    assert "--K 2 --iter 2" in summary["relion_command"]


def test_autorefine_converged() -> None:
    summary = summarize_results(FIXTURES / "autorefine", "Refine3D/run", "autorefine")
    assert_json_safe(summary)
    assert summary["converged"] is True
    assert summary["completed"] is True
    final = summary["final_resolution_angstrom"]
    assert isinstance(final, float) and final > 0
    assert final == pytest.approx(25.6)
    # it000..it003 plus the un-numbered final iteration
    assert summary["iterations_run"] == 4
    assert summary["last_iteration"] == 4
    assert summary["iterations_planned"] is None  # RELION stores 999 for auto-refine
    iterations = summary["resolution_per_iteration"]
    assert [p["iteration"] for p in iterations] == [0, 1, 2, 3, 4]
    assert iterations[0]["resolution_angstrom"] is None
    assert iterations[-1]["resolution_angstrom"] == pytest.approx(final)
    assert summary["classes"] == 1
    assert summary["class_distribution"] == [pytest.approx(1.0)]
    assert "--auto_refine --split_random_halves" in summary["relion_command"]
    assert summary["files"]["model"] == "Refine3D/run_model.star"
    assert summary["files"]["data"] == "Refine3D/run_data.star"
    assert summary["files"]["optimiser"] == "Refine3D/run_it003_optimiser.star"  # no final optimiser.star
    fsc = summary["fsc"]
    assert fsc is not None and len(fsc) == 16  # shells 1..16 of a 32 px box
    assert fsc[0] == {"resolution_angstrom": pytest.approx(128.0), "fsc": pytest.approx(1.0)}
    assert fsc[-1]["resolution_angstrom"] == pytest.approx(8.0)


def test_autorefine_without_run_model_star_is_not_converged(tmp_path: Path) -> None:
    root = copy_fixture("autorefine", tmp_path)
    (root / "Refine3D" / "run_model.star").unlink()
    summary = summarize_results(root, "Refine3D/run", "autorefine")
    assert_json_safe(summary)
    assert summary["converged"] is False
    assert summary["completed"] is False
    assert summary["final_resolution_angstrom"] is None
    assert summary["iterations_run"] == 3
    assert [p["iteration"] for p in summary["resolution_per_iteration"]] == [0, 1, 2, 3]
    assert summary["resolution_angstrom"] == pytest.approx(25.6)
    assert summary["files"]["model"] == "Refine3D/run_it003_half1_model.star"
    assert summary["files"]["data"] == "Refine3D/run_it003_data.star"
    assert summary["fsc"] is not None  # the half models carry the gold-standard FSC too


@pytest.mark.parametrize(("mode", "prefix"), [("2d", "Class2D/run"), ("3d", "Class3D/run"), ("autorefine", "Refine3D/run")])
def test_empty_output_dir(tmp_path: Path, mode: str, prefix: str) -> None:
    (tmp_path / prefix).parent.mkdir(parents=True)
    summary = summarize_results(tmp_path, prefix, mode)
    assert_json_safe(summary)
    assert summary["iterations_run"] == 0
    assert summary["last_iteration"] is None
    assert summary["resolution_angstrom"] is None
    assert summary["final_resolution_angstrom"] is None
    assert summary["class_distribution"] == []
    assert summary["resolution_per_iteration"] == []
    assert summary["relion_command"] is None
    assert summary["completed"] is False
    assert summary["converged"] is (False if mode == "autorefine" else None)
    assert summary["files"] == {}


def test_missing_dataset_dir_does_not_raise(tmp_path: Path) -> None:
    summary = summarize_results(tmp_path / "never-created", "Class2D/run", "2d")
    assert summary["iterations_run"] == 0


def test_other_prefixes_in_the_same_dir_are_ignored(tmp_path: Path) -> None:
    root = copy_fixture("2d", tmp_path)
    summary = summarize_results(root, "Class2D/run_ct2", "2d")  # a --continue run writes another prefix
    assert summary["iterations_run"] == 0


def test_only_it000_written(tmp_path: Path) -> None:
    root = copy_fixture("2d", tmp_path)
    for path in (root / "Class2D").glob("run_it00[12]_*"):
        path.unlink()
    summary = summarize_results(root, "Class2D/run", "2d")
    assert summary["iterations_run"] == 0
    assert summary["last_iteration"] == 0
    assert summary["resolution_angstrom"] is None
    assert summary["completed"] is False
    assert summary["iterations_planned"] == 2


def test_iteration_without_model_star_is_not_done(tmp_path: Path) -> None:
    root = copy_fixture("3d", tmp_path)
    (root / "Class3D" / "run_it002_model.star").unlink()  # killed between optimiser and model
    summary = summarize_results(root, "Class3D/run", "3d")
    assert summary["iterations_run"] == 1
    assert summary["files"]["optimiser"] == "Class3D/run_it001_optimiser.star"


def test_corrupt_model_star_raises_value_error_with_path(tmp_path: Path) -> None:
    root = copy_fixture("3d", tmp_path)
    path = root / "Class3D" / "run_it002_model.star"
    path.write_text("data_model_general\n_rlnCurrentResolution\n")
    with pytest.raises(ValueError, match="run_it002_model.star"):
        summarize_results(root, "Class3D/run", "3d")


def test_model_star_without_general_block_raises(tmp_path: Path) -> None:
    root = copy_fixture("3d", tmp_path)
    (root / "Class3D" / "run_it002_model.star").write_text("data_other\n_rlnX 1\n")
    with pytest.raises(StarError, match="no data_model_general"):
        summarize_results(root, "Class3D/run", "3d")


@pytest.mark.parametrize("prefix", ["", "/abs/run", "../up/run", "Class2D/"])
def test_bad_prefix_raises(prefix: str) -> None:
    with pytest.raises(ValueError, match="output_prefix"):
        summarize_results(FIXTURES / "2d", prefix, "2d")


def test_bad_mode_raises() -> None:
    with pytest.raises(ValueError, match="mode"):
        summarize_results(FIXTURES / "2d", "Class2D/run", "refine")


def test_progress_classification() -> None:
    assert read_progress(FIXTURES / "2d", "Class2D/run", "2d") == {
        "iteration": 2,
        "resolution_angstrom": pytest.approx(21.333333),
        "converged": None,
        "started": True,
    }


def test_progress_autorefine_converged_and_running(tmp_path: Path) -> None:
    progress = read_progress(FIXTURES / "autorefine", "Refine3D/run", "autorefine")
    assert progress["iteration"] == 4
    assert progress["converged"] is True
    assert progress["resolution_angstrom"] == pytest.approx(25.6)
    root = copy_fixture("autorefine", tmp_path)
    (root / "Refine3D" / "run_model.star").unlink()
    (root / "Refine3D" / "run_it003_half2_model.star").unlink()  # half2 is the "iteration done" marker
    progress = read_progress(root, "Refine3D/run", "autorefine")
    assert progress == {"iteration": 2, "resolution_angstrom": pytest.approx(25.6), "converged": False, "started": True}


def test_progress_skips_a_model_star_being_written(tmp_path: Path) -> None:
    root = copy_fixture("2d", tmp_path)
    path = root / "Class2D" / "run_it002_model.star"
    path.write_text(path.read_text()[:40] + "\n_rlnCurrentResolution\n")  # half-written
    progress = read_progress(root, "Class2D/run", "2d")
    assert progress["iteration"] == 1
    assert progress["resolution_angstrom"] == pytest.approx(10.666667)


def test_progress_nothing_yet(tmp_path: Path) -> None:
    assert read_progress(tmp_path, "Class3D/run", "3d") == {
        "iteration": 0,
        "resolution_angstrom": None,
        "converged": None,
        "started": False,
    }
