"""Per-user data boundaries in S3: what a user may read as a dataset and where their outputs go.

``[s3] dataset_prefixes`` and ``[s3] output_prefixes`` list ``s3://bucket/prefix`` entries in which
``{user}`` stands for the request's user_id. A user may name as a dataset only an object under one
of the dataset prefixes (so not another user's ``output.tar.gz``) and as an output prefix only one
under an output prefix. Empty lists leave only ``[s3] allowed_buckets``. Admins act for the
facility and are not bound by either list.
"""
from __future__ import annotations

from typing import Any, Mapping

from gateway.errors import RequestError


def _expand(prefixes: list[str], user_id: str) -> list[str]:
    return [p.replace("{user}", user_id) for p in prefixes]


def _under(url: str, prefix: str) -> bool:
    """``url`` is ``prefix`` or below it, at a '/' boundary (results/al does not cover results/alice)."""
    if prefix.endswith("/"):
        return url.startswith(prefix)
    return url == prefix or url.startswith(prefix + "/")


def check_data_boundaries(config: Mapping[str, Any], user_id: str, dataset_url: str, output_prefix: str) -> None:
    """Raise a 403 RequestError naming the field if the user may not read or write there."""
    readable = _expand(list(config["S3_DATASET_PREFIXES"]), user_id)
    if readable and not any(_under(dataset_url, p) for p in readable):
        raise RequestError(
            "dataset_s3_url",
            f"user {user_id!r} may read datasets only under {readable} ([s3] dataset_prefixes); {dataset_url} is not",
            status=403,
        )
    writable = _expand(list(config["S3_OUTPUT_PREFIXES"]), user_id)
    if writable and not any(_under(output_prefix.rstrip("/"), p.rstrip("/")) for p in writable):
        raise RequestError(
            "output_s3_prefix",
            f"user {user_id!r} may write outputs only under {writable} ([s3] output_prefixes); {output_prefix} is not",
            status=403,
        )
