"""The gateway's database (SQLAlchemy Core over SQLite, the embedded default, or PostgreSQL, shared by replicas).

``tables`` defines every table, ``schema`` creates and upgrades them, ``jobs`` is the job store
(jobs, leases, tokens, signed requests seen) and ``events`` the job events and webhook outbox.
"""
from gateway.database.jobs import (
    DuplicateIdempotencyKey,
    JobNotFound,
    JobRecord,
    JobStore,
    LimitCheck,
    TokenRecord,
    user_lock_key,
)
from gateway.database.schema import make_engine
from gateway.database.tables import jobs_table, leases_table, metadata_obj, tokens_table

__all__ = [
    "DuplicateIdempotencyKey", "JobNotFound", "JobRecord", "JobStore", "LimitCheck", "TokenRecord", "jobs_table",
    "leases_table", "make_engine", "metadata_obj", "tokens_table", "user_lock_key",
]
