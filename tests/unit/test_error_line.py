"""The line a failed job's message carries: RELION's own error, not the cluster's shell and MPI noise."""
from __future__ import annotations

from pathlib import Path

from gateway.relion.logs import error_line, is_noise

STDERR = Path(__file__).resolve().parents[1] / "fixtures" / "relion" / "stderr"


def test_relions_error_wins_over_every_ranks_environment_noise() -> None:
    # Each rank's shell says "ERROR: ld.so: ..." before RELION starts: not the job's error.
    assert error_line(STDERR / "relion5_error_with_module_noise.err") == (
        "ERROR: MetaDataTable::read: File Extract/job007/particles.star does not exist"
    )


def test_noise_is_all_there_is() -> None:
    line = error_line(STDERR / "noise_only.err")
    assert is_noise(line)
    assert not line.startswith("ERROR")  # never passed off as RELION's ERROR
    assert line == "slurmstepd: error: rmdir_recursive: could not open /var/spool/slurm/tmp/spmix_appdir_1001_41.0"


def test_a_message_that_starts_with_error_itself_is_not_doubled(tmp_path: Path) -> None:
    # RELION 3.1's reference checks: RelionError's "ERROR: " line, then a message beginning "ERROR  ".
    path = tmp_path / "main-7.err"
    path.write_text(
        "in: ./src/ml_model.cpp, line 860\nERROR: \n"
        "ERROR  The reference box size is 48 px, but the box size of the first optics group of the data is 32 px!\n\n"
        "If you want to re-scale and/or re-box input particles into the pixel size and the box size of the reference, "
        "re-run the program with the --trust_ref_size option.\n=== Backtrace  ===\n"
    )
    assert error_line(path) == (
        "ERROR: The reference box size is 48 px, but the box size of the first optics group of the data is 32 px!"
    )


def test_slurms_reason_wins_over_the_pmix_clean_up_after_it(tmp_path: Path) -> None:
    path = tmp_path / "main-41.err"
    path.write_text(
        (STDERR / "noise_only.err").read_text().split("slurmstepd:")[0]
        + "slurmstepd: error: *** JOB 41 ON rgnode1 CANCELLED AT 2026-03-02T11:04:09 DUE TO TIME LIMIT ***\n"
        + "slurmstepd: error:  mpi/pmix_v3: pmixp_libpmix_finalize: rgnode1 [0]: pmixp_client.c:521: Failed to remove "
        "/var/spool/slurm/tmp/spmix_appdir_1001_41.0\n: Directory not empty (39)\n"
        "--------------------------------------------------------------------------\n"
    )
    assert error_line(path) == (
        "slurmstepd: error: *** JOB 41 ON rgnode1 CANCELLED AT 2026-03-02T11:04:09 DUE TO TIME LIMIT ***"
    )
