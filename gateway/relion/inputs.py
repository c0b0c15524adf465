"""Check, before RELION starts, that every input file a job names exists in the staged dataset.

RELION resolves image paths against its working directory and fails only after the job has
queued, started and staged (shared notes): ``Cannot read file particles.mrcs It does not exist``.
Checking here turns that into one clear message naming the missing files.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from gateway.relion.star import StarError, read_star


class MissingInputError(ValueError):
    """Named inputs are missing from the dataset; the message lists them."""


def image_stacks(star_path: Path) -> list[str]:
    """The distinct stack files in ``_rlnImageName`` (``000001@Particles/a.mrcs`` -> ``Particles/a.mrcs``)."""
    blocks = read_star(star_path)
    # RELION 3.1 puts particles in data_particles; a 3.0-style file has one unnamed block.
    block = blocks.get("particles") or blocks.get("") or next((b for b in blocks.values() if "rlnImageName" in b.labels), None)
    if block is None or "rlnImageName" not in block.labels:
        raise MissingInputError(f"{star_path.name} has no particle table with _rlnImageName")
    stacks: dict[str, None] = {}
    for name in block.column("rlnImageName"):
        stacks.setdefault(name.split("@", 1)[-1], None)
    return list(stacks)


def check_inputs(dataset_dir: Path, star: str, others: Iterable[str] = ()) -> dict[str, int]:
    """Raise MissingInputError naming every missing file; return the count of stacks checked."""
    missing: list[str] = []
    root = dataset_dir.resolve()

    def present(relative: str) -> bool:
        if PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts:
            missing.append(f"{relative} (must be a relative path inside the dataset)")
            return True
        return (root / relative).is_file()

    for path in [star, *others]:
        if not present(path):
            missing.append(path)
    stacks: list[str] = []
    if (root / star).is_file():
        try:
            stacks = image_stacks(root / star)
        except StarError as exc:
            raise MissingInputError(f"{star} is not a readable STAR file: {exc}") from exc
        missing.extend(f"{stack} (named in {star})" for stack in stacks if not present(stack))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MissingInputError(f"missing from the dataset: {shown}")
    return {"stacks": len(stacks)}
