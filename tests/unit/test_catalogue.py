"""The relion_refine option catalogue and the rules validate_options applies to a request's flags."""
from __future__ import annotations

import re
import shutil

import pytest

from gateway.demo import DEMO_FLAGS
from gateway.process import run_command
from gateway.relion.catalogue import (
    CATALOGUE,
    GATEWAY_OWNED,
    MODES,
    SUPPORTED_VERSIONS,
    OptionSpec,
    catalogue_for,
    closest_names,
    validate_options,
)
from gateway.relion.flags import FlagError, FlagValue, normalise_flags, parse_command_line

# The command lines measured in shared/notes/relion.md (section 2b and 2c), minus mpirun.
CLASS3D_COMMAND = (
    "--i particles.star --o c3d/run --ref ref.mrc --firstiter_cc --ini_high 30 "
    "--K 2 --iter 3 --tau2_fudge 4 --particle_diameter 100 --ctf --zero_mask --flatten_solvent --sym C1 "
    "--healpix_order 2 --offset_range 4 --offset_step 2 --norm --scale --j 1 --pool 10 "
    "--dont_combine_weights_via_disc --preread_images --random_seed 1"
)
AUTOREFINE_COMMAND = (
    "--i particles.star --o r3d/run --ref ref.mrc --firstiter_cc --ini_high 30 "
    "--auto_refine --split_random_halves --low_resol_join_halves 40 --particle_diameter 100 --ctf --zero_mask "
    "--flatten_solvent --sym C1 --healpix_order 2 --auto_local_healpix_order 4 --offset_range 4 --offset_step 2 "
    "--norm --scale --j 1 --pool 10 --dont_combine_weights_via_disc --preread_images "
    "--auto_ignore_angles --auto_resol_angles --random_seed 1"
)
HELP_TIMEOUT = 60.0
_HELP_OPTION = re.compile(r"^\s*--(\w+)\s", re.MULTILINE)


def options_of(command: str) -> dict[str, FlagValue]:
    return normalise_flags(parse_command_line(command.split())).options


def check(options: dict[str, FlagValue], mode: str = "2d", version: str = "3.1", gpu: bool = False) -> list[str]:
    return validate_options(options, mode=mode, relion_version=version, gpu_allowed=gpu)


def refused(options: dict[str, FlagValue], mode: str = "2d", version: str = "3.1", gpu: bool = False) -> FlagError:
    with pytest.raises(FlagError) as caught:
        check(options, mode, version, gpu)
    return caught.value


# --- real command lines -------------------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_demo_flags_validate_for_2d(version: str) -> None:
    assert check(normalise_flags(DEMO_FLAGS).options, "2d", version) == []


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_measured_3d_classification_validates(version: str) -> None:
    assert check(options_of(CLASS3D_COMMAND), "3d", version) == []


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_measured_autorefine_validates(version: str) -> None:
    assert check(options_of(AUTOREFINE_COMMAND), "autorefine", version) == []


def test_command_lines_are_refused_in_the_wrong_mode() -> None:
    assert refused(options_of(CLASS3D_COMMAND), "2d").message == "--ref is not used by mode 2d (2D classification starts without a reference)"
    assert refused(options_of(AUTOREFINE_COMMAND), "3d").message == "--auto_refine belongs to mode autorefine, not 3d"


# --- unknown options ----------------------------------------------------------------------------


def test_unknown_option_names_the_closest_one() -> None:
    error = refused({"particle_diamter": 100})
    assert error.key == "particle_diamter"
    assert error.message == "--particle_diamter is not a relion_refine option; did you mean --particle_diameter?"


def test_unknown_option_without_a_close_name_gets_no_suggestion() -> None:
    assert refused({"zzqqxx": 1}).message == "--zzqqxx is not a relion_refine option"


def test_closest_names_ignore_case_so_k_finds_K() -> None:
    assert closest_names("k")[0] == "K"
    assert closest_names("nn")[0] == "NN"
    assert refused({"k": 3}).message == "--k is not a relion_refine option; did you mean --K?"
    assert closest_names("particle_diamter", n=2) == ["particle_diameter", "helical_outer_diameter"]
    assert closest_names("zzqqxx") == []


# --- versions -----------------------------------------------------------------------------------


def test_option_newer_than_the_site_relion_is_refused() -> None:
    assert refused({"blush": True}, "3d", "3.1").message == "--blush needs RELION 5.0 or newer; this site runs 3.1"
    assert refused({"blush": True}, "3d", "4.0").message == "--blush needs RELION 5.0 or newer; this site runs 4.0"
    assert refused({"grad": True}, "2d", "3.1").message == "--grad needs RELION 4.0 or newer; this site runs 3.1"
    assert check({"blush": True}, "3d", "5.0", gpu=True) == []
    assert check({"grad": True, "grad_write_iter": 10, "class_inactivity_threshold": 0.1}, "2d", "4.0") == []


def test_option_removed_after_3_1_is_refused_with_its_successor() -> None:
    assert refused({"sgd": True}, "3d", "4.0").message == (
        "--sgd is not available after RELION 3.1; this site runs 4.0 (use --grad)"
    )
    assert "--dont_skip_gridding" in refused({"skip_gridding": True}, "3d", "5.0").message
    assert check({"skip_gridding": True}, "3d", "3.1") == []
    assert check({"dont_skip_gridding": True}, "3d", "4.0") == []


def test_version_facts_found_in_the_4_0_and_5_0_sources() -> None:
    for name in ("grad", "grad_write_iter", "class_inactivity_threshold", "grad_ini_frac", "grad_fin_frac",
                 "grad_stepsize", "center_classes", "som", "ios", "ctf_uncorrected_ref", "dont_skip_gridding"):
        assert (CATALOGUE[name].since, CATALOGUE[name].until) == ("4.0", None), name
    for name in ("blush", "blush_skip_spectral_trailing", "tomograms", "trajectories", "offset_range_z"):
        assert (CATALOGUE[name].since, CATALOGUE[name].until) == ("5.0", None), name
    for name in ("sgd", "stochastic_em", "sgd_write_iter", "ctf_corrected_ref", "skip_gridding", "pad_ctf"):
        assert (CATALOGUE[name].since, CATALOGUE[name].until) == ("3.1", "3.1"), name


# --- modes --------------------------------------------------------------------------------------


def test_option_outside_its_mode_is_refused() -> None:
    assert refused({"ref": "ref.mrc"}, "2d").message.startswith("--ref is not used by mode 2d")
    assert refused({"K": 3}, "autorefine").message == (
        "--K is not used by mode autorefine (auto-refine refines a single class)"
    )
    assert refused({"iter": 3}, "autorefine").message.startswith("--iter is not used by mode autorefine")
    assert refused({"auto_local_healpix_order": 4}, "3d").message == (
        "--auto_local_healpix_order belongs to mode autorefine, not 3d"
    )
    assert refused({"center_classes": True}, "3d", "4.0").message == "--center_classes belongs to mode 2d, not 3d"
    assert refused({"healpix_order": 2}, "2d").key == "healpix_order"


# --- GPU ----------------------------------------------------------------------------------------


def test_gpu_options_need_a_gpu_partition() -> None:
    error = refused({"gpu": True})
    assert (error.key, error.message) == ("gpu", "--gpu needs a GPU partition; none is configured")
    assert refused({"free_gpu_memory": 100}).message == "--free_gpu_memory needs a GPU partition; none is configured"
    assert check({"gpu": True, "free_gpu_memory": 100}, gpu=True) == []


def test_gpu_takes_a_switch_or_device_ids() -> None:
    assert check({"gpu": "0:1"}, gpu=True) == []
    assert check({"gpu": "0,1:2"}, gpu=True) == []
    assert "device ids" in refused({"gpu": "all; rm"}, gpu=True).message
    assert "device ids" in refused({"gpu": 1}, gpu=True).message


# --- types --------------------------------------------------------------------------------------


def test_int_option_must_be_a_whole_number() -> None:
    assert refused({"K": "abc"}).message == "--K must be a whole number, got 'abc'"
    assert refused({"K": 2.5}).message == "--K must be a whole number, got 2.5"
    assert refused({"K": True}).message == "--K must be a whole number, got True"


def test_float_option_takes_ints_and_floats_but_not_bools_or_strings() -> None:
    assert check({"tau2_fudge": 2}) == []
    assert check({"tau2_fudge": 1.5}) == []
    assert refused({"tau2_fudge": "2"}).message == "--tau2_fudge must be a number, got '2'"
    assert refused({"tau2_fudge": True}).message == "--tau2_fudge must be a number, got True"
    assert "finite" in refused({"tau2_fudge": float("inf")}).message


def test_switch_must_be_true() -> None:
    assert check({"ctf": True}) == []
    assert refused({"ctf": "yes"}).message == "--ctf is a switch: send true to turn it on or leave it out, got 'yes'"
    assert refused({"ctf": 1}).key == "ctf"


def test_string_and_path_options_must_be_strings() -> None:
    assert refused({"sym": 1}, "3d").message == "--sym must be a string, got 1"
    assert refused({"ref": 3}, "3d").message == "--ref must be a path, got 3"


def test_path_options_stay_inside_the_dataset() -> None:
    # Also the path options flags.PATH_OPTIONS does not list, such as --fourier_mask or --ios.
    assert "relative" in refused({"fourier_mask": "/etc/passwd"}).message
    assert "'..'" in refused({"ios": "../x.star"}, "3d", "4.0").message
    assert check({"fourier_mask": "masks/f.mrc"}) == []


# --- bounds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "mode", "message"),
    [
        ("K", 0, "2d", "--K must be at least 1, got 0"),
        ("iter", 0, "2d", "--iter must be at least 1, got 0"),
        ("j", 0, "2d", "--j must be at least 1, got 0"),
        ("pool", 0, "2d", "--pool must be at least 1, got 0"),
        ("healpix_order", 10, "3d", "--healpix_order must be at most 9, got 10"),
        ("healpix_order", -1, "3d", "--healpix_order must be at least 0, got -1"),
        ("particle_diameter", 0, "2d", "--particle_diameter must be greater than 0, got 0"),
        ("tau2_fudge", -1.0, "2d", "--tau2_fudge must be greater than 0, got -1.0"),
        ("offset_range", -1, "2d", "--offset_range must be at least 0, got -1"),
        ("offset_step", 0, "2d", "--offset_step must be greater than 0, got 0"),
        ("psi_step", 0, "2d", "--psi_step must be greater than 0, got 0"),
        ("ini_high", 0, "3d", "--ini_high must be greater than 0, got 0"),
        ("random_seed", -1, "2d", "--random_seed must be at least 0, got -1"),
        ("auto_iter_max", 0, "autorefine", "--auto_iter_max must be at least 1, got 0"),
    ],
)
def test_out_of_range_values_are_refused(name: str, value: FlagValue, mode: str, message: str) -> None:
    assert refused({name: value}, mode).message == message


def test_exclusive_upper_bound_and_edges_that_are_allowed() -> None:
    assert refused({"grad_ini_frac": 1.0}, "2d", "4.0").message == "--grad_ini_frac must be less than 1, got 1.0"
    assert check({"grad_ini_frac": 0.3}, "2d", "4.0") == []
    assert check({"offset_range": 0, "random_seed": 0}, "2d")[0].startswith("--random_seed 0")
    assert check({"healpix_order": 0}, "3d") == []
    assert check({"healpix_order": 9}, "3d") == []


# --- gateway-owned options and warnings ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GATEWAY_OWNED))
def test_gateway_owned_options_are_refused_with_their_reason(name: str) -> None:
    error = refused({name: True})
    assert (error.key, error.message) == (name, f"--{name} cannot be set: {GATEWAY_OWNED[name]}")


def test_scratch_dir_message() -> None:
    assert refused({"scratch_dir": "/scratch"}).message == "--scratch_dir cannot be set: the gateway chooses scratch space"


def test_warnings_for_accepted_but_notable_options() -> None:
    warnings = check({"random_seed": 0, "auto_iter_max": 2}, "autorefine")
    assert len(warnings) == 2
    assert warnings[0].startswith("--random_seed 0 switches off")
    assert "run_model.star" in warnings[1]
    assert any("slow" in note for note in check({"blush": True}, "3d", "5.0"))


def test_bad_mode_or_version_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="RELION version '2.1'"):
        check({"K": 2}, "2d", "2.1")
    with pytest.raises(ValueError, match="mode 'class2d'"):
        check({"K": 2}, "class2d")


# --- the catalogue itself -----------------------------------------------------------------------


def test_catalogue_entries_are_consistent() -> None:
    rank = {version: index for index, version in enumerate(SUPPORTED_VERSIONS)}
    for name, spec in CATALOGUE.items():
        assert spec.name == name
        assert spec.modes and spec.modes <= set(MODES), name
        assert spec.since in rank, name
        assert spec.until is None or rank[spec.since] <= rank[spec.until], name
        if spec.minimum is not None or spec.maximum is not None:
            assert spec.kind in ("int", "float"), name
        if spec.minimum is not None and spec.maximum is not None:
            assert spec.minimum < spec.maximum, name


def test_catalogue_for_lists_what_a_user_may_send() -> None:
    names_2d = [spec.name for spec in catalogue_for("2d", "3.1")]
    assert "K" in names_2d and "ref" not in names_2d and "scratch_dir" not in names_2d
    assert names_2d == sorted(names_2d, key=str.lower)
    assert "blush" in {spec.name for spec in catalogue_for("autorefine", "5.0")}
    assert "blush" not in {spec.name for spec in catalogue_for("autorefine", "4.0")}
    assert all(isinstance(spec, OptionSpec) for spec in catalogue_for("3d", "4.0"))


# --- drift against the installed binary ---------------------------------------------------------


def installed_help_options() -> set[str]:
    if shutil.which("relion_refine") is None:
        pytest.skip("relion_refine is not installed")
    # Prints the usage and exits 0 (shared notes, section 5); one option per line, "  --name (default) : text".
    text = run_command(["relion_refine", "--help"], timeout=HELP_TIMEOUT)
    if "RELION: command line arguments" not in text:
        pytest.skip("relion_refine --help did not print a RELION usage")
    version = run_command(["relion_refine", "--version"], timeout=HELP_TIMEOUT)
    if "3.1" not in version:
        pytest.skip(f"the installed relion_refine is not RELION 3.1: {version.strip()!r}")
    return set(_HELP_OPTION.findall(text))


def test_every_option_of_the_installed_relion_is_in_the_catalogue() -> None:
    help_options = installed_help_options()
    assert len(help_options) > 100
    missing = sorted(name for name in help_options if name not in CATALOGUE or not CATALOGUE[name].in_version("3.1"))
    assert missing == []


def test_every_3_1_catalogue_entry_is_printed_by_the_installed_relion() -> None:
    help_options = installed_help_options()
    extra = sorted(name for name, spec in CATALOGUE.items() if spec.in_version("3.1") and name not in help_options)
    assert extra == []
