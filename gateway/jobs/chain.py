"""Chain jobs: a request whose input is an earlier job of the same user (input_job_id).

The parent must have succeeded and its metadata.json must record its outputs (its final
``_data.star``, model and class maps: gateway.relion.subset.JobOutputs, written by the archive
hook). Everything is checked here, at submit, before anything reaches Slurm: a wrong id, a parent
that has not succeeded, a class it does not have. The child then runs on the parent's dataset
(``dataset_s3_url`` is the parent's) and reads ``--i parent/particles.star``, the subset the job
side writes with the project's STAR writer from the parent's files; ``ref_class`` makes one of a
3D parent's class maps the child's ``--ref``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gateway.database import JobNotFound, JobRecord
from gateway.errors import RequestError
from gateway.jobs.spec import PARENT_DIR, PARENT_STAR, ChainInput
from gateway.jobs.states import JobState
from gateway.relion.subset import JobOutputs, SubsetError, check_selection

log = logging.getLogger(__name__)

# The request fields of a chained job (besides the seed's).
CHAIN_FIELDS = ("input_job_id", "select_classes", "ref_class")


def resolve_parent(request: dict[str, Any], find_job: Callable[[str], JobRecord]) -> tuple[dict[str, Any], ChainInput | None]:
    """The request with the parent's dataset, ``--i`` (and ``--ref``) filled in, and the chain record.

    A request without input_job_id comes back as it is. Each refusal is a 422 naming the field.
    """
    parent_id = request.get("input_job_id")
    if not parent_id:
        for name in ("select_classes", "ref_class"):
            if request.get(name) is not None:
                raise RequestError(name, "needs input_job_id: it chooses from an earlier job's results")
        return request, None
    user = request["user_id"]
    try:
        parent = find_job(parent_id)
    except JobNotFound:
        parent = None
    if parent is None or parent.user_id != user:
        # Another user's job is no job of this user's: the same answer as for an unknown id.
        raise RequestError("input_job_id", f"{user} has no job {parent_id!r}")
    if parent.state != JobState.SUCCEEDED.value:
        raise RequestError("input_job_id", f"job {parent_id} is {parent.state}; only a succeeded job's particles can be the input")
    metadata = parent.metadata or {}
    raw_outputs, output = metadata.get("outputs"), metadata.get("output") or {}
    if not raw_outputs or not output.get("url"):
        raise RequestError("input_job_id", f"job {parent_id}'s metadata records no outputs to chain from (archived by an older gateway?)")
    select = request.get("select_classes")
    ref_class = request.get("ref_class")
    try:
        outputs = JobOutputs.from_dict(raw_outputs)
        check_selection(outputs, select, ref_class)
    except SubsetError as exc:
        field, _, message = str(exc).partition(": ")
        raise RequestError(field if field in CHAIN_FIELDS else "input_job_id", message or str(exc)) from exc
    flags = dict(request.get("flags") or {})
    if "i" in flags:
        raise RequestError("flags.i", f"a chained job reads its parent's particles: the gateway sets --i {PARENT_STAR}")
    flags["i"] = PARENT_STAR
    if ref_class is not None:
        if "ref" in flags:
            raise RequestError("flags.ref", "ref_class chooses the reference: send one or the other")
        flags["ref"] = f"{PARENT_DIR}/{outputs.class_maps[ref_class]}"
    parent_dataset = parent.job.get("dataset_s3_url") or parent.request.get("dataset_s3_url")
    if request.get("dataset_s3_url") not in (None, "", parent_dataset):
        raise RequestError("dataset_s3_url", f"a chained job runs on its parent's dataset ({parent_dataset}); leave it out")
    kept = sorted(select) if select is not None else sorted(outputs.class_particles)
    chain = ChainInput(
        parent_job_id=parent.job_id,
        parent_mode=parent.mode,
        outputs=outputs.to_dict(),
        output_url=str(output["url"]),
        output_etag=str(output.get("etag") or ""),
        output_bytes=int(output.get("bytes") or 0),
        select_classes=tuple(sorted(select)) if select is not None else None,
        ref_class=ref_class,
        particles=sum(outputs.class_particles.get(n, 0) for n in kept),
    )
    return {**request, "dataset_s3_url": parent_dataset, "flags": flags}, chain
