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
    # While the job waits: Slurm's pending reason and its start estimate (epoch), and where the
    # estimate came from (sbatch --test-only at submit, then the poller's squeue).
    sa.Column("pending_reason", sa.String(128)),
    sa.Column("estimated_start_at", sa.Float),
    sa.Column("estimate_source", sa.String(32)),
    # The Slurm account the job is charged to (--account), as chosen at submit ([slurm.accounts]).
    sa.Column("slurm_account", sa.String(64), index=True),
    # What the job cost (gateway/jobs/usage.py), once Slurm's accounting has it: the figures a
    # usage report sums, and the whole record. usage_at NULL: not costed yet.
    sa.Column("usage_json", sa.Text),
    sa.Column("usage_cpu_hours", sa.Float),
    sa.Column("usage_gpu_hours", sa.Float),
    sa.Column("usage_at", sa.Float),
    sa.Index("ix_jobs_state_usage_at", "state", "usage_at"),
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


# Every change of a job's state (and of its progress) as a row, written in the same transaction as
# the change itself: the outbox the webhook dispatcher fans out from, the history a server-sent
# events stream replays and what long-polls wait for. seq orders one job's events (its row is
# locked while one is written); fanned_out marks those the dispatcher has turned into deliveries,
# so one committed late is never skipped, as a cursor on seq would.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only
job_events_table = sa.Table(
    "job_events",
    metadata_obj,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(128), nullable=False, index=True),
    sa.Column("user_id", sa.String(64), nullable=False, index=True),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("previous_state", sa.String(32)),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("progress_json", sa.Text),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("fanned_out", sa.Boolean, nullable=False, default=False, index=True),
)

# Webhook subscriptions: a user's (job_id NULL: all their jobs) or one job's. The signing secret is
# not stored: it is derived from the gateway's key and the id (gateway/jobs/webhooks.py).
webhooks_table = sa.Table(
    "webhooks",
    metadata_obj,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("user_id", sa.String(64), nullable=False, index=True),
    sa.Column("job_id", sa.String(128), index=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("event_types", sa.Text, nullable=False),  # a JSON list
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("from_seq", _SEQ, nullable=False),  # events after this one only
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("deleted_at", sa.Float),
)

# One message to one subscription: the delivery log, and the queue the dispatcher works from. The
# body is fixed when the row is made, so every retry sends the same bytes under the same id.
webhook_deliveries_table = sa.Table(
    "webhook_deliveries",
    metadata_obj,
    sa.Column("id", sa.String(40), primary_key=True),  # the webhook-id header
    sa.Column("webhook_id", sa.String(40), nullable=False, index=True),
    sa.Column("event_seq", _SEQ, nullable=False),
    sa.Column("job_id", sa.String(128), nullable=False, index=True),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_attempt_at", sa.Float),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("delivered_at", sa.Float),
    sa.UniqueConstraint("webhook_id", "event_seq", name="uq_webhook_deliveries_event"),
)
