"""Safe extraction: hostile tarballs are refused with the member named, and nothing is left behind."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from gateway.jobside.extract import UnsafeArchiveError, extract_stream


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return buffer


def regular(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def test_good_archive_is_extracted_atomically(tmp_path: Path) -> None:
    stream = make_tar([regular("particles.star", b"data_\n"), regular("Movies/a.mrcs", b"123")])
    counts = extract_stream(stream, tmp_path / "dataset", quota_bytes=1000, max_members=10)
    assert (tmp_path / "dataset" / "Movies" / "a.mrcs").read_bytes() == b"123"
    assert counts.total_bytes == 9 and counts.members == 2
    assert not (tmp_path / "dataset.partial").exists()


@pytest.mark.parametrize(
    ("member", "fragment"),
    [
        (regular("../escape"), "outside the destination"),
        (regular("a/../../escape"), "outside the destination"),
        (special("link", tarfile.SYMTYPE, "/etc/passwd"), "only regular files"),
        (special("link", tarfile.SYMTYPE, "inside.txt"), "only regular files"),
        (special("hard", tarfile.LNKTYPE, "../../etc/passwd"), "only regular files"),
        (special("dev", tarfile.CHRTYPE), "only regular files"),
        (special("fifo", tarfile.FIFOTYPE), "only regular files"),
    ],
)
def test_hostile_members_are_refused(tmp_path: Path, member, fragment: str) -> None:
    stream = make_tar([regular("ok.txt"), member])
    with pytest.raises(tarfile.TarError) as excinfo:
        extract_stream(stream, tmp_path / "dataset", quota_bytes=1000, max_members=10)
    assert fragment in str(excinfo.value) or fragment in repr(excinfo.value)
    assert not (tmp_path / "dataset").exists() and not (tmp_path / "dataset.partial").exists()
    assert not (tmp_path / "escape").exists()


def test_absolute_paths_land_inside(tmp_path: Path) -> None:
    extract_stream(make_tar([regular("/abs/file")]), tmp_path / "d", quota_bytes=100, max_members=10)
    assert (tmp_path / "d" / "abs" / "file").exists()


def test_quota_stops_a_tar_bomb_before_writing_it(tmp_path: Path) -> None:
    stream = make_tar([regular("small", b"x" * 10), regular("big", b"\0" * 5000)])
    with pytest.raises(UnsafeArchiveError, match="'big': dataset exceeds the stage-in quota of 1000 bytes"):
        extract_stream(stream, tmp_path / "d", quota_bytes=1000, max_members=10)
    assert not (tmp_path / "d.partial").exists()


def test_member_count_limit(tmp_path: Path) -> None:
    stream = make_tar([regular(f"f{i}") for i in range(5)])
    with pytest.raises(UnsafeArchiveError, match="more than 3 members"):
        extract_stream(stream, tmp_path / "d", quota_bytes=1000, max_members=3)
