"""A chained job's stage-in: its parent's output next to the parent's dataset, and the particles subset.

The parent's dataset is staged as any dataset (from the dataset cache: the parent filled it). The
parent's output (its output.tar.gz, as archived) lands in ``<dataset>/parent/``: hard links to the
cache entry its archive hook left when there is one, so nothing crosses S3, else downloaded once
through a presigned GET of that object only. Then ``parent/particles.star`` is written with the
project's STAR writer from the parent's final ``_data.star`` (only the selected classes) and
checked as strictly as a dataset (every image it names must be in the workspace).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from gateway.jobs.spec import PARENT_DIR, PARENT_STAR, ChainInput
from gateway.relion.subset import JobOutputs, write_subset

log = logging.getLogger(__name__)


def rebased(outputs: JobOutputs, prefix: str) -> JobOutputs:
    """The parent's outputs as paths relative to the child's dataset directory."""
    return dataclasses.replace(
        outputs,
        data_star=f"{prefix}/{outputs.data_star}",
        model_star=f"{prefix}/{outputs.model_star}" if outputs.model_star else None,
        class_maps={n: f"{prefix}/{path}" for n, path in outputs.class_maps.items()},
    )


def stage_parent(
    storage: Any,
    dest: Path,
    chain: ChainInput,
    *,
    quota_bytes: int,
    max_members: int,
    cache_root: Path | None = None,
    cache_quota_bytes: int = 0,
) -> dict[str, Any]:
    """Put the parent's output into ``dest/parent`` and write the child's ``--i``; return the record."""
    from gateway.jobside.stage_in import extract_object

    started = time.time()
    target = dest / PARENT_DIR

    def fill(tree: Path) -> dict[str, Any]:
        body, info = storage.open_parent_output()
        if info.etag.strip('"') != chain.output_etag.strip('"') or info.size != chain.output_bytes:
            # Not the archive the gateway checked at submit (rewritten since: an archive retry, a
            # continuation): its bytes must not be cached, or used, under the old identity.
            body.close()
            raise ValueError(
                f"{chain.output_url} changed since this job was submitted (ETag {chain.output_etag}, now {info.etag}); submit it again"
            )
        return extract_object(body, info, chain.output_url, tree, time.time(), quota_bytes=quota_bytes, max_members=max_members)

    record: dict[str, Any] = {"parent_job_id": chain.parent_job_id, "url": chain.output_url}
    use = None
    if cache_root is not None:
        from gateway.jobside.cache import CacheError, CacheKey, DatasetCache

        try:
            use = DatasetCache(cache_root, cache_quota_bytes).use(CacheKey(chain.output_url, chain.output_etag, chain.output_bytes), target, fill)
        except CacheError as exc:
            log.warning("parent output not from the cache: %s", exc)
            record["cache"] = {"used": False, "reason": str(exc)}
    if use is None:
        record["bytes"] = fill(target)["bytes"]
    else:
        record["bytes"] = use.fill["bytes"] if use.fill else 0  # a hit reads nothing from S3
        record["cache"] = {"used": use.kept, "hit": use.hit, "entry": use.key.name, "linked_files": use.linked_files}
    subset = write_subset(dest, rebased(JobOutputs.from_dict(chain.outputs), PARENT_DIR), chain.select_classes, PARENT_STAR)
    record.update(
        star=subset.star,
        particles=subset.particles,
        classes=list(subset.classes),
        image_files=len(subset.image_stacks),
        select_classes=list(chain.select_classes) if chain.select_classes is not None else None,
        ref_class=chain.ref_class,
        seconds=round(time.time() - started, 3),
    )
    log.info("parent %s: %d particles of classes %s in %s", chain.parent_job_id, subset.particles, subset.classes, subset.star)
    return record
