"""Safe extraction: hostile tarballs are refused with the member named, and nothing is left behind."""
from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from gateway.jobside.extract import (
    MAX_EXTENDED_HEADER_BYTES,
    MAX_EXTENDED_HEADER_CHAIN,
    BoundedTarInfo,
    UnsafeArchiveError,
    extract_stream,
)


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


# --- Extended headers (pax x/g/X, GNU L/K) are bounded before tarfile reads their data. ---------
# Written by hand (tarfile will not write such headers): a 512-byte ustar header of the given
# type, then its data streamed through gzip, so a 200 MB header is a ~200 KB tarball.

MiB = 1024 * 1024


def raw_header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def pax_record(keyword: str, value: bytes) -> bytes:
    """One pax record, ``"<length> <keyword>=<value>\\n"``, whose length counts its own digits."""
    body = len(keyword) + len(value) + 3  # the space, "=" and "\n"
    length = body + len(str(body))
    length += len(str(length)) - len(str(body))
    return f"{length} {keyword}=".encode() + value + b"\n"


def write_pax_record(gz: gzip.GzipFile, keyword: str, length: int) -> None:
    """Stream one pax record of exactly ``length`` bytes (its value is not held in memory)."""
    value_size = length - len(str(length)) - len(keyword) - 3  # the space, "=" and "\n"
    gz.write(f"{length} {keyword}=".encode())
    for start in range(0, value_size, MiB):
        gz.write(b"a" * min(MiB, value_size - start))
    gz.write(b"\n")


def hostile_tar(headers: list[tuple[str, bytes, int]], *, then: str = "victim.txt") -> io.BytesIO:
    """Extended headers given as (name, type, data size) with streamed data, then one regular member."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as gz:
        for name, kind, size in headers:
            if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                gz.write(raw_header(name, kind, size))
                for start in range(0, size - 1, MiB):
                    gz.write(b"a" * min(MiB, size - 1 - start))
                gz.write(b"\0")
            else:
                gz.write(raw_header(name, kind, size))
                write_pax_record(gz, "comment", size)
            gz.write(padding(size))
        gz.write(raw_header(then, tarfile.REGTYPE, 1) + b"x" + padding(1))
        gz.write(b"\0" * 2 * tarfile.BLOCKSIZE)
    buffer.seek(0)
    return buffer


def refused(tmp_path: Path, stream: io.BytesIO) -> tuple[UnsafeArchiveError, int]:
    """Extract, expecting a refusal; return it and the traced peak of Python memory meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchiveError) as excinfo:
            extract_stream(stream, tmp_path / "d", quota_bytes=10**12, max_members=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()
    return excinfo.value, peak


# tarfile's "r|gz" stream inflates each 10 KiB it reads in one call, with no output bound: up to
# ~10 MiB at deflate's 1032:1, held about three times while it joins and slices. That ~30 MiB is
# paid for any highly compressible tarball, good or bad, whatever a header declares; the bound
# below is that floor plus headroom, far under the 600 MB a 200 MB pax record cost before.
PEAK_LIMIT = 40 * MiB


def test_private_tarfile_hooks_exist_on_this_python() -> None:
    # BoundedTarInfo overrides private TarInfo methods; a Python that renames them must fail here.
    for name in ("_proc_member", "_proc_pax", "_proc_gnulong", "_proc_gnusparse_00", "_proc_gnusparse_01", "_proc_gnusparse_10"):
        assert callable(getattr(tarfile.TarInfo, name)), name
        assert name in vars(BoundedTarInfo) or name in ("_proc_pax", "_proc_gnulong")


def test_a_200_mb_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    stream = hostile_tar([("././@PaxHeader", tarfile.XHDTYPE, 200 * MiB)])
    assert len(stream.getvalue()) < 1 * MiB  # the bomb is tiny
    error, peak = refused(tmp_path, stream)
    assert str(error) == (
        "refused archive member '././@PaxHeader': pax extended header at byte 0 holds 209715200 bytes, "
        f"over the {MAX_EXTENDED_HEADER_BYTES}-byte limit for extended headers"
    )
    assert peak < PEAK_LIMIT, f"peak {peak / MiB:.1f} MiB"
    assert isinstance(error, tarfile.TarError)  # stage-in reports TarError as one line


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.XGLTYPE, "pax global header"),
        (tarfile.SOLARIS_XHDTYPE, "Solaris extended header"),
        (tarfile.GNUTYPE_LONGLINK, "GNU long-link header"),
    ],
)
def test_every_extended_header_type_is_bounded(tmp_path: Path, kind: bytes, what: str) -> None:
    error, _ = refused(tmp_path, hostile_tar([("hdr", kind, MAX_EXTENDED_HEADER_BYTES + 1)]))
    assert f"'hdr': {what} at byte 0 holds {MAX_EXTENDED_HEADER_BYTES + 1} bytes" in str(error)


def test_a_10_mb_gnu_long_name_is_refused(tmp_path: Path) -> None:
    error, peak = refused(tmp_path, hostile_tar([("././@LongLink", tarfile.GNUTYPE_LONGNAME, 10 * MiB)]))
    assert str(error).startswith("refused archive member '././@LongLink': GNU long-name header at byte 0 holds 10485760 bytes")
    assert peak < PEAK_LIMIT, f"peak {peak / MiB:.1f} MiB"


def test_a_chain_of_5000_pax_headers_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    error, peak = refused(tmp_path, hostile_tar([("././@PaxHeader", tarfile.XHDTYPE, 100)] * 5000))
    offset = MAX_EXTENDED_HEADER_CHAIN * 2 * tarfile.BLOCKSIZE  # the first header past the bound
    assert str(error) == (
        f"refused archive member '././@PaxHeader': pax extended header at byte {offset}: "
        f"more than {MAX_EXTENDED_HEADER_CHAIN} extended headers in a row before one member"
    )
    assert peak < PEAK_LIMIT


def test_a_chain_up_to_the_bound_still_extracts(tmp_path: Path) -> None:
    stream = hostile_tar([("././@PaxHeader", tarfile.XHDTYPE, 100)] * MAX_EXTENDED_HEADER_CHAIN)
    extract_stream(stream, tmp_path / "d", quota_bytes=100, max_members=10)
    assert (tmp_path / "d" / "victim.txt").read_bytes() == b"x"


def test_global_headers_are_bounded_in_total(tmp_path: Path) -> None:
    # Each g header is under the per-header bound, but their records pile up for the whole archive.
    size = MAX_EXTENDED_HEADER_BYTES // 2
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz:
        for n in range(3):
            gz.write(raw_header("././@PaxHeader", tarfile.XGLTYPE, size))
            write_pax_record(gz, f"comment{n}", size)
            gz.write(padding(size) + raw_header(f"f{n}", tarfile.REGTYPE, 0))
        gz.write(b"\0" * 1024)
    buffer.seek(0)
    error, _ = refused(tmp_path, buffer)
    third = 2 * (size + 2 * tarfile.BLOCKSIZE)  # the two before it passed: 64 KiB in all
    assert f"pax global header at byte {third}: global headers hold {3 * size} bytes in all" in str(error)


def test_gnu_sparse_members_are_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("sparse.mrcs")
    info.type = tarfile.GNUTYPE_SPARSE
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz:
        gz.write(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    buffer.seek(0)
    error, _ = refused(tmp_path, buffer)
    assert "GNU sparse header at byte 0: GNU sparse members are not allowed" in str(error)


def test_pax_gnu_sparse_1_0_is_refused_before_its_map_is_read(tmp_path: Path) -> None:
    # Sparse 1.0 reads a map of any length from the member's data, after the pax header.
    records = pax_record("GNU.sparse.major", b"1") + pax_record("GNU.sparse.minor", b"0")
    records += pax_record("GNU.sparse.name", b"big.mrcs") + pax_record("GNU.sparse.realsize", b"1")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz:
        gz.write(raw_header("././@PaxHeader", tarfile.XHDTYPE, len(records)) + records + padding(len(records)))
        gz.write(raw_header("GNUSparseFile.0/big.mrcs", tarfile.REGTYPE, 512) + b"99999999999\n".ljust(512, b"0"))
        gz.write(b"\0" * 1024)
    buffer.seek(0)
    error, _ = refused(tmp_path, buffer)
    assert "GNU sparse members are not allowed" in str(error)


@pytest.mark.parametrize("format_", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_still_extract(tmp_path: Path, format_: int) -> None:
    # Over ustar's 100+155 bytes, so a pax "path" record or a GNU long-name header carries them.
    name = "/".join(["d" * 99, "e" * 99, "f" * 99 + ".mrcs"])
    assert len(name) > 255
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=format_) as archive:
        info = tarfile.TarInfo(name)
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    buffer.seek(0)
    extract_stream(buffer, tmp_path / "d", quota_bytes=100, max_members=10)
    assert (tmp_path / "d" / name).read_bytes() == b"abc"


def test_a_git_archive_style_global_header_and_pax_member_extract(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": "0" * 40}) as archive:
        info = tarfile.TarInfo("é" * 10 + ".star")  # non-ASCII: a pax path record
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    buffer.seek(0)
    extract_stream(buffer, tmp_path / "d", quota_bytes=100, max_members=10)
    assert (tmp_path / "d" / ("é" * 10 + ".star")).read_bytes() == b"x"


def test_members_are_not_kept_while_extracting(tmp_path: Path) -> None:
    # TarFile keeps each member it reads (with its pax records) even in stream mode; 200 members
    # with 1000 pax records each peaked at 15 MiB that way (4 MiB now). extract_stream drops each once extracted.
    records = b"".join(pax_record(f"k{n:04d}", b"v") for n in range(1000))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz:
        for n in range(200):
            gz.write(raw_header("././@PaxHeader", tarfile.XHDTYPE, len(records)) + records + padding(len(records)))
            gz.write(raw_header(f"f{n}", tarfile.REGTYPE, 0))
        gz.write(b"\0" * 1024)
    buffer.seek(0)
    tracemalloc.start()
    try:
        counts = extract_stream(buffer, tmp_path / "d", quota_bytes=100, max_members=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counts.members == 200
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
