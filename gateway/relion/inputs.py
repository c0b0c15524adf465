"""Check, before RELION starts, that every input file a job names is inside the staged dataset.

RELION resolves image paths against its working directory and fails only after the job has
queued, started and staged (shared notes): ``Cannot read file particles.mrcs It does not exist``.
Checking here turns that into one clear message naming the missing files.

It is also the tenant boundary for what RELION reads: a STAR file is the user's own text, and
RELION opens whatever path a row names, ``/other/tenant/particles.mrcs`` or ``../../x`` included.
So every STAR file a path option names (``--i``, a ``--ref`` list of references, an ``--ios``
optimisation set, ``--tomograms`` ...) is read, and every column RELION opens (PATH_COLUMNS) must
name a relative path without ``..`` that resolves, symlinks followed, inside the dataset.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath

from gateway.relion.star import StarBlock, StarError, read_star

log = logging.getLogger(__name__)


class MissingInputError(ValueError):
    """Named inputs are missing from the dataset or leave it; the message lists them."""


class PathKind(Enum):
    IMAGE = "image"  # an image or a stack, maybe ``000001@stack.mrcs`` and/or ``name:mrc``
    FILE = "file"  # any other file RELION opens, not read here
    STAR = "star"  # a STAR file RELION reads: checked, then its own path columns too


# The STAR columns relion_refine opens, and how. Columns it only carries along are left out, so
# nothing needs to exist for them: rlnMicrographName and rlnImageOriginalName (grouping and
# provenance), rlnMtfFileName, rlnMaskName and the postprocess maps, the optimiser.star names
# (read only by --continue), and the tilt images inside a tilt-series STAR (read by extraction
# and reconstruction, not refinement; its rlnCtfImage is a power spectrum, so it is not recursed).
PATH_COLUMNS: dict[str, PathKind] = {
    "rlnImageName": PathKind.IMAGE,  # the particles (--i, an optimisation set's particles)
    "rlnCtfImage": PathKind.IMAGE,  # 3D CTF of each subtomogram (data_dim 3 with --ctf)
    "rlnReconstructImageName": PathKind.IMAGE,  # images reconstructed instead of rlnImageName
    "rlnReferenceImage": PathKind.IMAGE,  # --ref as a STAR file (data_model_classes or the first block)
    "rlnBodyMaskName": PathKind.IMAGE,  # multi-body masks
    "rlnBodyReferenceName": PathKind.IMAGE,  # multi-body references
    # RELION 4/5 tomography: the optimisation set (--ios) is key-values naming the rest.
    "rlnTomoParticlesFile": PathKind.STAR,
    "rlnTomoTomogramsFile": PathKind.STAR,
    "rlnTomoTrajectoriesFile": PathKind.STAR,
    "rlnTomoManifoldsFile": PathKind.STAR,
    "rlnTomoReferenceMap1File": PathKind.FILE,
    "rlnTomoReferenceMap2File": PathKind.FILE,
    "rlnTomoReferenceMaskFile": PathKind.FILE,
    "rlnTomoReferenceFscFile": PathKind.FILE,
    "rlnTomoTiltSeriesStarFile": PathKind.FILE,  # TomogramSet reads each tomogram's tilt series
}
# RELION writes these for "no file" (optimisation sets, optimiser.star).
_NO_FILE = ("", "None")
# RELION's file-type suffix, ``CtfFind/job003/a_PS.ctf:mrc``: the file is the part before it.
_TYPE_SUFFIX = re.compile(r":(mrcs?|spi|tiff?|eer|img|hed|dm4?|ser|spe)$")
# Shown in a message before "and N more".
_SHOWN = 10


def image_file(value: str) -> str:
    """The file an image name opens: ``000001@Particles/a.mrcs`` -> ``Particles/a.mrcs``, ``a.ctf:mrc`` -> ``a.ctf``."""
    return _TYPE_SUFFIX.sub("", value.split("@", 1)[-1])


def image_stacks(star_path: Path) -> list[str]:
    """The distinct stack files in ``_rlnImageName`` (``000001@Particles/a.mrcs`` -> ``Particles/a.mrcs``)."""
    return _distinct(image_file(name) for name in _particle_block(star_path, read_star(star_path)).column("rlnImageName"))


def _particle_block(star_path: Path, blocks: dict[str, StarBlock]) -> StarBlock:
    # RELION 3.1 puts particles in data_particles; a 3.0-style file has one unnamed block.
    block = blocks.get("particles") or blocks.get("") or next((b for b in blocks.values() if "rlnImageName" in b.labels), None)
    if block is None or "rlnImageName" not in block.labels:
        raise MissingInputError(f"{star_path.name} has no particle table with _rlnImageName")
    return block


def _distinct(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


@dataclass
class _Check:
    """What one check_inputs call has found; ``where`` strings name the STAR file, row and column."""

    root: Path
    refused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # every file checked, so each is checked once
    good: set[str] = field(default_factory=set)  # those inside the dataset and present
    stars: list[str] = field(default_factory=list)  # STAR files read, in order

    def inside(self, relative: str, where: str | None) -> bool:
        """Refuse an absolute path, a ``..`` or a path resolving outside the root; True if it is inside."""
        prefix = f"{where}: " if where else ""
        if PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts:
            self.refused.append(f"{prefix}{relative!r} (must be a relative path inside the dataset, without '..')")
            return False
        resolved = (self.root / relative).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            self.refused.append(f"{prefix}{relative!r} (resolves outside the dataset, through a symlink)")
            return False
        return True

    def file(self, relative: str, named_in: str | None, where: str | None) -> bool:
        """Check one file RELION opens; True if it is inside the dataset and present."""
        if relative not in self.seen:
            self.seen.add(relative)
            if not self.inside(relative, where):
                return False
            if not (self.root / relative).is_file():
                self.missing.append(relative if named_in is None else f"{relative} (named in {named_in})")
                return False
            self.good.add(relative)
        return relative in self.good  # checked before (and reported then, if it failed)

    def star(self, relative: str, blocks: dict[str, StarBlock] | None = None) -> None:
        """Check every path column RELION opens in a STAR file it will read (present and inside)."""
        if relative in self.stars:
            return  # named twice, or STAR files naming each other in a loop
        self.stars.append(relative)
        if blocks is None:
            blocks = _read(self.root, relative)
        nested: list[str] = []
        for block in blocks.values():
            for label, value in block.values.items():
                self._cell(relative, f"data_{block.name}, _{label}", label, value, nested)
            columns = [label for label in block.labels if label in PATH_COLUMNS]
            for number, row in enumerate(block.loop, start=1):
                for label in columns:
                    self._cell(relative, f"data_{block.name} row {number}, column _{label}", label, row[label], nested)
        for path in nested:
            self.star(path)

    def _cell(self, star: str, where: str, label: str, value: str, nested: list[str]) -> None:
        kind = PATH_COLUMNS.get(label)
        if kind is None or value in _NO_FILE:
            return
        path = image_file(value) if kind is PathKind.IMAGE else value
        if self.file(path, star, f"{star} {where}") and kind is PathKind.STAR:
            nested.append(path)


def _read(root: Path, relative: str) -> dict[str, StarBlock]:
    try:
        return read_star(root / relative)
    except StarError as exc:
        raise MissingInputError(f"{relative} is not a readable STAR file: {exc}") from exc


def check_inputs(dataset_dir: Path, star: str, others: Iterable[str] = ()) -> dict[str, int]:
    """Check ``--i`` (``star``), the other path options and every file the STAR files among them name.

    Raise MissingInputError listing every path that leaves the dataset (naming the STAR file, the
    1-based data row and the column) and every missing file; return the counts checked.
    """
    check = _Check(dataset_dir.resolve())
    options = [path for path in _distinct([star, *others]) if check.file(path, None, None)]
    stacks: list[str] = []
    if star in options:
        blocks = _read(check.root, star)
        stacks = _distinct(image_file(name) for name in _particle_block(Path(star), blocks).column("rlnImageName"))
        check.star(star, blocks)
    for path in options:
        if path.endswith(".star"):  # RELION reads an option's .star file as a STAR file (FileName::isStarFile)
            check.star(path)
    problems: list[str] = []
    if check.refused:
        problems.append("input outside the dataset: " + _list(check.refused, "; "))
    if check.missing:
        problems.append("missing from the dataset: " + _list(check.missing, ", "))
    if problems:
        raise MissingInputError("; ".join(problems))
    log.info("inputs checked: %d stacks, %d files, %d STAR files", len(stacks), len(check.seen), len(check.stars))
    return {"stacks": len(stacks), "files": len(check.seen), "star_files": len(check.stars)}


def _list(entries: list[str], separator: str) -> str:
    more = f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
    return separator.join(entries[:_SHOWN]) + more
