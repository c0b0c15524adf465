"""The gateway's tables (SQLAlchemy Core), one MetaData for all of them, so one create_all makes them."""
from __future__ import annotations

import sqlalchemy as sa

metadata_obj = sa.MetaData()

jobs_table = sa.Table(
    "jobs",
    metadata_obj,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("user_id", sa.String(64), nullable=False, index=True),
    sa.Column("workspace_id", sa.String(64), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("slurm_state", sa.String(128), nullable=False, default=""),
    sa.Column("main_slurm_id", sa.String(32)),
    sa.Column("archive_slurm_id", sa.String(32)),
    sa.Column("exit_code", sa.Integer),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("request_json", sa.Text, nullable=False),
    sa.Column("request_sha256", sa.String(64), nullable=False, default=""),
    sa.Column("idempotency_key", sa.String(128)),
    sa.Column("job_json", sa.Text, nullable=False),
    sa.Column("main_script", sa.Text, nullable=False, default=""),
    sa.Column("archive_script", sa.Text, nullable=False, default=""),
    sa.Column("metadata_json", sa.Text),
    sa.Column("progress_json", sa.Text),
    sa.Column("output_url", sa.Text, nullable=False),
    sa.Column("accepted_at", sa.Float, nullable=False),
    sa.Column("submitted_at", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("checked_at", sa.Float),
    sa.Column("submit_claim_until", sa.Float),
    sa.Column("parent_job_id", sa.String(128), index=True),  # a chained job's input_job_id
    # The same key from the same user names one job, whatever happens to the HTTP exchange.
    sa.UniqueConstraint("user_id", "idempotency_key", name="uq_jobs_user_idempotency_key"),
)

leases_table = sa.Table(
    "leases",
    metadata_obj,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# Bearer tokens: only a salted scrypt hash of each secret is kept; the id (public, the token's
# prefix) finds the row in one lookup.
tokens_table = sa.Table(
    "tokens",
    metadata_obj,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("user", sa.String(64), nullable=False, index=True),
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("salt", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(256), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.Column("last_used_at", sa.Float),
)

# Signed job requests already taken (the sha256 of each body), so the same body sent twice is
# refused in every worker and replica. Rows older than the event age limit can go: such a body is
# refused for its age anyway.
job_requests_seen_table = sa.Table(
    "job_requests_seen",
    metadata_obj,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("body_sha256", sa.String(64), primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False, index=True),
)

