"""Typed errors. ``retryable`` tells a caller whether the same request may succeed if sent again;
``http_status`` and ``grpc_code`` (a ``grpc.StatusCode`` name) say how the front door reports it."""

from __future__ import annotations


class PdflowError(Exception):
    retryable = False
    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(PdflowError):
    """The request itself is wrong; sending it again cannot help."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    http_status = 404
    grpc_code = "NOT_FOUND"


class RequestTooLarge(InvalidRequest):
    """The body (or an input in it) is larger than the server reads."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class PoolEmpty(PdflowError):
    """No live worker of a role: the cluster cannot serve now, but may once workers come back."""

    retryable = True
    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "service_unavailable"


class Overloaded(PdflowError):
    """Too many requests wait for their first token already: refused before any compute is spent, with
    the seconds after which trying again is worth it."""

    retryable = True
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkerFailed(PdflowError):
    """A worker died or returned an error while it held the request."""

    retryable = True
    http_status = 502
    grpc_code = "UNAVAILABLE"
    error_type = "worker_error"


class DeadlineExceeded(PdflowError):
    retryable = True
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "timeout"


class RequestNotFound(PdflowError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "not_found"
