"""Errors the client raises.

    SynapseError
    ├── WireError                    a body that breaks the wire format (also a ValueError)
    ├── APIConnectionError           the server could not be reached
    │   └── APITimeoutError          a timeout (connect, read, write or pool)
    └── APIStatusError               the server answered 4xx/5xx; carries status, problem, request id
        ├── BadRequestError          400 malformed body
        ├── AuthenticationError      401 no token, or not a known one
        ├── PermissionDeniedError    403 a quota is used up
        ├── NotFoundError            404 no such instance or kind
        ├── NotAcceptableError       406 Accept allows neither msgpack nor JSON
        ├── RequestTimeoutError      408 the body did not arrive in time
        ├── ConflictError            409 name taken, device full, a keyed answer no longer kept, or a damaged file
        ├── PreconditionFailedError  412 the version moved (If-Match)
        ├── PayloadTooLargeError     413 body over the server's limit
        ├── UnsupportedMediaTypeError 415
        ├── UnprocessableEntityError 422 invalid config, name, shape or dtype
        └── InternalServerError      5xx (device failures among them)
            ├── ServiceUnavailableError  503 not ready, or the instance is still being restored
            └── InsufficientStorageError 507 applied in memory but not stored (sync mode); retry with its key
"""

from __future__ import annotations

from typing import Any

import httpx



class SynapseError(Exception):
    """Base of every error this client raises."""


class WireError(SynapseError, ValueError):
    """A body or tensor that does not follow the wire format; the message says what is wrong."""


class APIConnectionError(SynapseError):
    """The server could not be reached (after any retries allowed for the call)."""

    def __init__(self, message: str, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The call timed out."""


class APIStatusError(SynapseError):
    """The server answered with an error status; ``problem`` is its RFC 9457 body."""

    def __init__(self, status_code: int, problem: dict[str, Any], request_id: str | None) -> None:
        self.status_code = status_code
        self.problem = problem
        self.request_id = request_id
        self.detail = str(problem.get("detail", ""))
        self.title = str(problem.get("title", ""))
        super().__init__(f"{status_code} {self.title}: {self.detail}" + (f" (request {request_id})" if request_id else ""))


class BadRequestError(APIStatusError):
    """400: the body could not be decoded."""


class AuthenticationError(APIStatusError):
    """401: the server needs a valid bearer token (``SynapseClient(token=...)`` or ``SYNAPSE_TOKEN``)."""


class PermissionDeniedError(APIStatusError):
    """403: refused, e.g. an owner's quota of instances or state bytes is used up."""


class NotFoundError(APIStatusError):
    """404: no such instance or kind."""


class NotAcceptableError(APIStatusError):
    """406: the Accept header allows neither msgpack nor JSON."""


class RequestTimeoutError(APIStatusError):
    """408: the request's body did not reach the server in time."""


class ConflictError(APIStatusError):
    """409: an instance or snapshot of that name exists, a device's budget is full, a keyed call's answer is no
    longer kept (it was applied once and is not run again), or a snapshot or evicted copy to restore is damaged
    (``problem["type"]`` ends in ``damaged-file``: delete or discard it)."""


class PreconditionFailedError(APIStatusError):
    """412: the instance's version is not the one If-Match named."""


class PayloadTooLargeError(APIStatusError):
    """413: the body is over the server's limit."""


class UnsupportedMediaTypeError(APIStatusError):
    """415: a content type the server does not speak."""


class UnprocessableEntityError(APIStatusError):
    """422: an invalid config, name, shape or dtype."""


class InternalServerError(APIStatusError):
    """5xx: the server or its device failed."""


class ServiceUnavailableError(InternalServerError):
    """503: the server is not ready, or the instance is still being restored (retry after ``Retry-After``)."""


class InsufficientStorageError(InternalServerError):
    """507: sync mode: applied in memory but not stored; a retry with the same Idempotency-Key answers once stored."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    406: NotAcceptableError,
    408: RequestTimeoutError,
    409: ConflictError,
    412: PreconditionFailedError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: UnprocessableEntityError,
    503: ServiceUnavailableError,
    507: InsufficientStorageError,
}


def status_error(status_code: int, problem: dict[str, Any], request_id: str | None) -> APIStatusError:
    """The exception for an error response: one class per status, InternalServerError for other 5xx."""
    cls = _BY_STATUS.get(status_code) or (InternalServerError if status_code >= 500 else APIStatusError)
    return cls(status_code, problem, request_id)
