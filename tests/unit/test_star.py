"""The STAR reader against recorded RELION 3.1.3 output and hand-written edge cases."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from gateway.relion.star import (
    StarBlock,
    StarError,
    StarIncomplete,
    format_star,
    loop_block,
    parse_star,
    read_star,
    read_whole_blocks,
    write_star,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "relion"


def test_model_star_2d_general_and_classes() -> None:
    blocks = read_star(FIXTURES / "2d" / "Class2D" / "run_it002_model.star")
    assert list(blocks)[:3] == ["model_general", "model_classes", "model_class_1"]
    general = blocks["model_general"]
    assert general.values["rlnNrClasses"] == "3"
    assert general.get_int("rlnNrClasses") == 3
    assert general.get_float("rlnCurrentResolution") == pytest.approx(21.333333)
    assert general.get_float("rlnPixelSize") == pytest.approx(4.0)
    assert general.loop == [] and general.labels == []
    classes = blocks["model_classes"]
    assert classes.labels[:2] == ["rlnReferenceImage", "rlnClassDistribution"]
    assert [row["rlnReferenceImage"] for row in classes.loop] == [
        f"{i:06d}@Class2D/run_it002_classes.mrcs" for i in (1, 2, 3)
    ]
    distribution = classes.float_column("rlnClassDistribution")
    assert sum(d for d in distribution if d is not None) == pytest.approx(1.0, abs=1e-3)


def test_inf_resolution_in_it000_reads_as_none() -> None:
    general = read_star(FIXTURES / "2d" / "Class2D" / "run_it000_model.star")["model_general"]
    assert general.values["rlnCurrentResolution"] == "inf"
    assert general.get_float("rlnCurrentResolution") is None


def test_optimiser_star_key_values() -> None:
    blocks = read_star(FIXTURES / "autorefine" / "Refine3D" / "run_it003_optimiser.star")
    general = blocks["optimiser_general"]
    assert general.get_int("rlnCurrentIteration") == 3
    assert general.get_int("rlnNumberOfIterations") == 999
    assert general.values["rlnOutputRootName"] == "Refine3D/run"
    assert general.get_int("rlnHasConverged") == 0


def test_data_star_has_optics_and_particles() -> None:
    blocks = read_star(FIXTURES / "autorefine" / "Refine3D" / "run_data.star")
    assert blocks["optics"].loop[0]["rlnImageSize"] == "32"
    particles = blocks["particles"]
    assert len(particles.loop) == 5  # the fixture keeps 5 rows
    assert set(particles.column("rlnRandomSubset")) <= {"1", "2"}
    assert particles.loop[0]["rlnImageName"] == "000001@particles.mrcs"


def test_fsc_block_of_final_autorefine_model() -> None:
    block = read_star(FIXTURES / "autorefine" / "Refine3D" / "run_model.star")["model_class_1"]
    resolution = block.float_column("rlnAngstromResolution")
    fsc = block.float_column("rlnGoldStandardFsc")
    assert len(resolution) == len(fsc) == 17  # box 32 -> shells 0..16
    assert resolution[-1] == pytest.approx(8.0)  # Nyquist at 4 A/px
    assert fsc[1] == pytest.approx(1.0)


def test_blocks_argument_stops_after_the_wanted_block() -> None:
    path = FIXTURES / "3d" / "Class3D" / "run_it002_model.star"
    partial = read_star(path, blocks=["model_general"])
    assert "model_general" in partial
    assert "model_groups" not in partial
    assert partial["model_general"].values == read_star(path)["model_general"].values


def test_every_fixture_parses() -> None:
    files = sorted(FIXTURES.rglob("*.star"))
    assert len(files) > 40
    for path in files:
        assert read_star(path), path


def test_quotes_comments_and_rows_spanning_lines() -> None:
    text = """# a comment
data_
_rlnKey   'a value with spaces'   # trailing comment
_rlnOther "it's"
loop_
_rlnA #1
_rlnB #2
1 "x y"
2
'z'
"""
    blocks = parse_star(text)
    block = blocks[""]
    assert block.values == {"rlnKey": "a value with spaces", "rlnOther": "it's"}
    assert block.loop == [{"rlnA": "1", "rlnB": "x y"}, {"rlnA": "2", "rlnB": "z"}]


def test_key_value_after_a_loop_ends_it() -> None:
    blocks = parse_star("data_x\nloop_\n_rlnA\n1\n2\n_rlnB 3\n")
    assert blocks["x"].column("rlnA") == ["1", "2"]
    assert blocks["x"].values == {"rlnB": "3"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data_x\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3\n", "loop row has 1 values, expected 2"),
        ("_rlnA 1\n", "before the first data_"),
        ("data_x\n1 2 3\n", "value outside a loop"),
        ("data_x\n_rlnA\n", "expected '_rlnA value'"),
        ("data_x\n_rlnA 'open\n", "unterminated quote"),
        ("data_x\ndata_x\n", "duplicate block"),
    ],
)
def test_corrupt_text_raises_star_error_with_source(text: str, message: str) -> None:
    with pytest.raises(StarError, match=message) as info:
        parse_star(text, source="bad.star")
    assert "bad.star:" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_file_raises_with_path(tmp_path: Path) -> None:
    source = (FIXTURES / "2d" / "Class2D" / "run_it002_model.star").read_text()
    cut = source[: source.index("000002@Class2D") + 30]  # stop inside a class row
    path = tmp_path / "run_it002_model.star"
    path.write_text(cut)
    with pytest.raises(StarError, match=str(path)):
        read_star(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_star(tmp_path / "nope.star")


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    rows = [{"rlnImageName": "000001@particles.mrcs", "rlnDefocusU": 12345.5, "rlnOpticsGroup": 1}]
    general = StarBlock(name="general", values={"rlnName": "has space", "rlnNumber": "4"})
    path = write_star(tmp_path / "out.star", [general, loop_block("particles", rows)])
    blocks = read_star(path)
    assert blocks["general"].values == {"rlnName": "has space", "rlnNumber": "4"}
    assert blocks["particles"].loop == [
        {"rlnImageName": "000001@particles.mrcs", "rlnDefocusU": "12345.500000", "rlnOpticsGroup": "1"}
    ]
    assert format_star([general]).startswith("\n# version 30001\n")


def test_parse_float_helpers() -> None:
    block = StarBlock(name="b", values={"a": "nan", "b": "-inf", "c": "2.5", "d": "x", "e": "3.0"})
    assert block.get_float("a") is None
    assert block.get_float("b") is None
    assert block.get_float("c") == 2.5
    assert block.get_float("d") is None
    assert block.get_float("missing") is None
    assert block.get_int("e") == 3
    assert block.get_int("c") is None
    assert not math.isnan(block.get_float("c") or 0.0)


def test_every_block_relion_wrote_is_closed_by_its_white_line() -> None:
    for path in sorted(FIXTURES.rglob("*.star")):
        assert all(block.closed for block in read_star(path).values()), path


@pytest.mark.parametrize(
    ("anchor", "keep"),
    [
        ("_rlnCurrentResolution                      21.333333", 44),  # inside a value: read as 2.0
        ("_rlnAveragePmax                             0.017236\n", 53),  # every value, not the white line
        ("0.098259     0.071852 \n", 15),  # inside a row's last value: the row has all its columns
        ("\n           1     0.007812", 5),  # in the spaces RELION right-aligns a row's first value with
    ],
)
def test_a_file_relion_is_still_writing_is_not_whole(tmp_path: Path, anchor: str, keep: int) -> None:
    source = (FIXTURES / "2d" / "Class2D" / "run_it002_model.star").read_text()
    path = tmp_path / "run_it002_model.star"
    path.write_text(source[: source.index(anchor) + keep])
    assert read_star(path)  # it parses: only its missing end says it is not whole
    with pytest.raises(StarIncomplete, match=str(path)):
        read_whole_blocks(path)


def test_whole_blocks_before_the_cut_are_whole() -> None:
    text = "data_a\n_rlnX 1\n \n\ndata_b\n\nloop_ \n_rlnY #1 \n1 \n2 \n"
    blocks = parse_star(text)
    assert blocks["a"].closed and not blocks["b"].closed
    assert parse_star(text + " \n")["b"].closed
    assert not parse_star(text + " ")["b"].closed  # a line RELION has not ended yet
