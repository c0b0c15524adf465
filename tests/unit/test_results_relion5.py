"""Results and progress for RELION >= 4.0's layout (tests/fixtures/relion/v5), half-written files and RELION's 999."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.relion import results
from gateway.relion.results import read_progress, summarize_results
from gateway.relion.star import StarError

V5 = Path(__file__).resolve().parents[1] / "fixtures" / "relion" / "v5"


@pytest.fixture(autouse=True)
def quick_settling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results, "SETTLE_S", 0.001)


def copy_v5(tmp_path: Path) -> Path:
    return Path(shutil.copytree(V5, tmp_path / "v5"))


def cut(path: Path, after: str, extra: int = 0) -> None:
    """Leave path as RELION leaves it mid-write: everything up to the end of ``after`` (plus extra bytes)."""
    text = path.read_text()
    path.write_text(text[: text.index(after) + len(after) + extra])


def test_converged_autorefine_takes_version_command_and_files_from_the_final_optimiser() -> None:
    summary = summarize_results(V5, "Refine3D/run", "autorefine")
    json.dumps(summary, allow_nan=False)
    assert summary["files"]["optimiser"] == "Refine3D/run_optimiser.star"  # RELION >= 4.0 writes a final one
    assert summary["relion_version"] == "5.0.0"
    assert summary["relion_command"].startswith("--o Refine3D/run --i particles.star --ref ref.mrc")
    # The count still comes from the numbered files: it000..it002, then the final iteration.
    assert (summary["iterations_run"], summary["last_iteration"], summary["iterations_known"]) == (3, 3, True)
    assert [p["iteration"] for p in summary["resolution_per_iteration"]] == [0, 1, 2, 3]
    assert summary["converged"] is True and summary["completed"] is True
    assert summary["final_resolution_angstrom"] == pytest.approx(21.333333)
    assert summary["files"]["model"] == "Refine3D/run_model.star"
    assert summary["files"]["sampling"] == "Refine3D/run_sampling.star"


def test_a_final_optimiser_without_the_final_model_is_a_final_iteration_cut_short(tmp_path: Path) -> None:
    root = copy_v5(tmp_path)
    (root / "Refine3D" / "run_model.star").unlink()  # RELION writes run_optimiser.star first
    summary = summarize_results(root, "Refine3D/run", "autorefine")
    assert summary["converged"] is False
    assert summary["iterations_run"] == 2
    assert summary["files"]["optimiser"] == "Refine3D/run_it002_optimiser.star"
    assert read_progress(root, "Refine3D/run", "autorefine")["converged"] is False
    # ... and with the final model back, the final optimiser counts.
    shutil.copy(V5 / "Refine3D" / "run_model.star", root / "Refine3D")
    assert summarize_results(root, "Refine3D/run", "autorefine")["files"]["optimiser"] == "Refine3D/run_optimiser.star"


def test_final_files_only_as_a_pruned_relion_5_project_keeps_them(tmp_path: Path) -> None:
    root = copy_v5(tmp_path)
    for path in (root / "Refine3D").glob("run_it*"):
        path.unlink()
    summary = summarize_results(root, "Refine3D/run", "autorefine")
    json.dumps(summary, allow_nan=False)
    assert summary["relion_version"] == "5.0.0"
    assert summary["relion_command"].startswith("--o Refine3D/run ")
    assert summary["files"]["optimiser"] == "Refine3D/run_optimiser.star"
    assert summary["converged"] is True and summary["completed"] is True
    assert summary["resolution_angstrom"] == pytest.approx(21.333333)
    assert summary["final_resolution_angstrom"] == pytest.approx(21.333333)
    # The final optimiser's _rlnCurrentIteration is -1 and no other final file names the iteration:
    # one iteration is seen, its number is unknown.
    assert (summary["iterations_run"], summary["last_iteration"], summary["iterations_known"]) == (1, None, False)
    assert summary["resolution_per_iteration"] == []
    assert len(summary["fsc"]) == 16
    assert read_progress(root, "Refine3D/run", "autorefine") == {
        "iteration": None,
        "resolution_angstrom": pytest.approx(21.333333),
        "converged": True,
        "started": True,
    }


def test_started_as_soon_as_relion_wrote_any_file_of_the_prefix(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / "Refine3D").mkdir(parents=True)
    shutil.copy(V5 / "Refine3D" / "run_optimiser.star", root / "Refine3D")  # the final set's first file
    assert read_progress(root, "Refine3D/run", "autorefine") == {
        "iteration": 0, "resolution_angstrom": None, "converged": False, "started": True,
    }
    assert read_progress(root, "Refine3D/other", "autorefine")["started"] is False


def test_2d_run_and_relions_999_for_no_estimate(tmp_path: Path) -> None:
    summary = summarize_results(V5, "Class2D/run", "2d")
    assert (summary["iterations_run"], summary["iterations_planned"], summary["completed"]) == (2, 2, True)
    assert summary["relion_version"] == "5.0.0"
    assert summary["class_distribution"] == [pytest.approx(0.52), pytest.approx(0.48), 0.0]
    assert summary["class_resolution_angstrom"] == [pytest.approx(11.636364), pytest.approx(12.8), None]  # inf
    # RELION's "no estimate" in an Angstrom field is 999 (the resolution of shell 0, an empty class's
    # accuracies); where it stands for a resolution, it is no resolution at all.
    root = copy_v5(tmp_path)
    model = root / "Class2D" / "run_it002_model.star"
    text = model.read_text()
    text = text.replace("Resolution                      11.636364", "Resolution                     999.000000")
    text = text.replace("38.000000    11.636364", "38.000000   999.000000")  # class 1's _rlnEstimatedResolution
    model.write_text(text)
    summary = summarize_results(root, "Class2D/run", "2d")
    assert summary["resolution_angstrom"] is None
    assert summary["resolution_per_iteration"][-1] == {"iteration": 2, "resolution_angstrom": None}
    assert summary["class_resolution_angstrom"] == [None, pytest.approx(12.8), None]
    assert read_progress(root, "Class2D/run", "2d")["resolution_angstrom"] is None


def test_autorefine_fsc_leaves_out_shell_0_whose_999_is_no_resolution(tmp_path: Path) -> None:
    root = copy_v5(tmp_path)
    model = root / "Refine3D" / "run_model.star"
    # A shell other than 0 at 999 (what RELION writes where it has no estimate) is no point of the curve's x.
    shell_1 = "           1     0.007812   128.000000"
    model.write_text(model.read_text().replace(shell_1, shell_1.replace("128.000000", "999.000000"), 1))
    fsc = summarize_results(root, "Refine3D/run", "autorefine")["fsc"]
    assert fsc[0]["resolution_angstrom"] is None
    assert all(point["resolution_angstrom"] != 999.0 for point in fsc)


@pytest.mark.parametrize(
    "after, extra",
    [
        ("_rlnCurrentResolution                      1", 0),  # 11.636364 cut to "1": read alone it is 1.0 A
        ("_rlnCurrentResolution                      11.63", 0),
        ("_rlnCurrentResolution                      11.636364\n", 0),  # the line whole, its block not
        ("_rlnAveragePmax                             0.060000\n", 0),  # all values, but not RELION's end line
        ("_rlnAveragePmax                             0.060000\n", 1),  # ... its first space only
    ],
)
def test_progress_never_reports_a_value_from_a_half_written_model(tmp_path: Path, after: str, extra: int) -> None:
    root = copy_v5(tmp_path)
    cut(root / "Class2D" / "run_it002_model.star", after, extra)
    # Not yet it002: the previous iteration, whose files are whole.
    assert read_progress(root, "Class2D/run", "2d") == {
        "iteration": 1, "resolution_angstrom": pytest.approx(12.8), "converged": None, "started": True,
    }


def test_progress_takes_a_model_whose_general_block_is_whole_while_later_blocks_are_written(tmp_path: Path) -> None:
    root = copy_v5(tmp_path)
    cut(root / "Class2D" / "run_it002_model.star", "-0.26000 \n")  # class 1's row: classes 2 and 3 still to come
    assert read_progress(root, "Class2D/run", "2d")["iteration"] == 2
    # The summary reads the whole file, and says so rather than report one class of three.
    with pytest.raises(StarError, match="run_it002_model.star: ends inside data_model_classes"):
        summarize_results(root, "Class2D/run", "2d")


def test_summary_refuses_a_truncated_newest_model_rather_than_report_part_of_a_number(tmp_path: Path) -> None:
    root = copy_v5(tmp_path)
    cut(root / "Refine3D" / "run_model.star", "_rlnCurrentResolution                      2")  # of 21.333333
    with pytest.raises(StarError, match=r"run_model.star: ends inside data_model_general"):
        summarize_results(root, "Refine3D/run", "autorefine")
    # Live, the final model is not there yet: the run has not converged.
    assert read_progress(root, "Refine3D/run", "autorefine") == {
        "iteration": 2, "resolution_angstrom": pytest.approx(25.6), "converged": False, "started": True,
    }


def test_progress_waits_for_a_model_that_is_still_growing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_v5(tmp_path)
    growing = root / "Class2D" / "run_it002_model.star"
    real_state = results._FileState.of
    sizes = iter(range(10_000, 1_000_000, 100))

    def state(path: Path) -> results._FileState:
        if path == growing:  # RELION still writing: a new size at every look
            return results._FileState(next(sizes), 0, 0)
        return real_state(path)

    monkeypatch.setattr(results._FileState, "of", staticmethod(state))
    progress = read_progress(root, "Class2D/run", "2d")
    assert (progress["iteration"], progress["resolution_angstrom"]) == (1, pytest.approx(12.8))
    monkeypatch.setattr(results._FileState, "of", staticmethod(real_state))  # RELION is done with it
    assert read_progress(root, "Class2D/run", "2d")["iteration"] == 2


def test_every_v5_fixture_was_written_whole() -> None:
    files = sorted(V5.rglob("*.star"))
    assert len(files) == 31
    for path in files:
        assert results.read_settled(path, settle=False), path
