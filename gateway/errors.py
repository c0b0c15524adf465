"""Domain exceptions shared by the service and the API's one error handler."""
from __future__ import annotations


class RequestError(ValueError):
    """A request breaks a rule; ``field`` names the field (``flags.ref``, ``num_mpi``)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


class LimitExceeded(Exception):
    """A limit is reached: a 429 with Retry-After; ``limit`` names the config key."""

    def __init__(self, limit: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after = max(1, int(retry_after))
