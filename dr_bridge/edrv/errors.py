"""Errors raised by the eDRV client.

The messages carry the operation, the HTTP status and eDRV's own `message`; never the request headers,
so the API key cannot leak through a log line or a traceback.
"""
from __future__ import annotations


class EdrvError(Exception):
    """Base class: anything that went wrong talking to eDRV."""

    def __init__(self, message: str, *, status_code: int | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.op = op


class EdrvAuthError(EdrvError):
    """401/403: the API key is wrong, expired or lacks the permission."""


class EdrvNotFound(EdrvError):
    """404: the session or chargestation does not exist (any more)."""


class EdrvRejected(EdrvError):
    """eDRV refused the request: another 4xx, or a 2xx whose envelope says ok:false."""


class EdrvRateLimited(EdrvError):
    """429 after the retries ran out."""

    def __init__(self, message: str, *, retry_after: float | None = None, op: str | None = None) -> None:
        super().__init__(message, status_code=429, op=op)
        self.retry_after = retry_after


class EdrvServerError(EdrvError):
    """5xx after the retries ran out."""


class EdrvTransportError(EdrvError):
    """No HTTP answer at all: timeout, refused or reset connection, DNS failure."""
