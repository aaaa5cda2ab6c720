"""The domain's exceptions: one hierarchy, mapped once to HTTP problems at the edge (api/bodies.py).

    SynapseServeError
    ├── InvalidRequest          (422) a value the caller sent is not allowed
    │   ├── InvalidConfig       a hyperparameter, init spec or create field is out of range
    │   ├── InvalidName         an instance or snapshot name breaks the naming rule
    │   ├── InvalidFields       a body lacks a required field or has an unknown one
    │   ├── ShapeMismatch       a tensor has the wrong shape or dtype, or a batch over max_batch
    │   ├── UnknownOperation    the kind has no such operation
    │   ├── UnknownCompartment  the instance has no such compartment
    │   ├── MissingArgument     an operation's tensor argument was not sent
    │   ├── InvalidInstanceFile an imported file is damaged, altered or does not fit its kind
    │   └── IdempotencyKeyReused an Idempotency-Key already used for another request
    ├── Unauthorized            (401) no token, or not a known one
    ├── QuotaExceeded           (403) an owner's or the server's quota would be exceeded
    ├── NotFound                (404) no such kind, instance or snapshot (or not yours)
    ├── AlreadyExists           (409) an instance or snapshot of that name exists
    ├── DeviceFull              (409) the device's state budget would be exceeded
    ├── AnswerNotKept           (409) a keyed call already ran; its answer is no longer kept
    ├── DamagedFile             (409) a stored snapshot or evicted copy is damaged: it can only be deleted
    ├── PreconditionFailed      (412) If-Match named a version that has moved
    ├── MalformedBody           (400) the body cannot be decoded
    ├── NotAcceptable           (406) no response type the caller accepts
    ├── RequestTimeout          (408) the body did not arrive in time
    ├── ClientGone              (400) the client left before its body had arrived
    ├── BodyTooLarge            (413) the body is over the configured limit
    ├── UnsupportedMediaType    (415) a content type we do not speak
    ├── NotReady                (503) warming up, or the instance is still being restored
    ├── DeviceError             (500) the accelerator failed; not the caller's fault
    └── StorageError            (507) the state directory could not be written
"""

from __future__ import annotations

from typing import ClassVar


MAX_DETAIL = 4096  # characters of a problem's detail
MAX_EXTRA = 256  # characters of each of its other string fields


class SynapseServeError(Exception):
    """Base of every error the service raises on purpose."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    slug: ClassVar[str] = "internal-error"
    default_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: object) -> None:
        # a problem echoes what the caller sent: never more than a few KB of it (a red-team run's 8 MiB kind name came
        # back as a 92 MB answer); a site that forgot to shorten what it quotes is shortened here
        if len(detail) > MAX_DETAIL:
            detail = detail[:MAX_DETAIL] + "…"
        super().__init__(detail)
        self.detail = detail
        self.extra = {k: v[:MAX_EXTRA] + "…" if isinstance(v, str) and len(v) > MAX_EXTRA else v
                      for k, v in extra.items()}
        self.headers = {**self.default_headers, **(headers or {})}


class InvalidRequest(SynapseServeError):
    status, title, slug = 422, "Invalid request", "invalid-request"


class InvalidConfig(InvalidRequest):
    title, slug = "Invalid configuration", "invalid-config"


class InvalidName(InvalidRequest):
    title, slug = "Invalid name", "invalid-name"


class InvalidFields(InvalidRequest):
    title, slug = "Invalid body fields", "invalid-fields"


class ShapeMismatch(InvalidRequest):
    title, slug = "Shape or dtype mismatch", "shape-mismatch"


class UnknownOperation(InvalidRequest):
    title, slug = "Unknown operation", "unknown-operation"


class UnknownCompartment(InvalidRequest):
    title, slug = "Unknown compartment", "unknown-compartment"


class MissingArgument(InvalidRequest):
    title, slug = "Missing argument", "missing-argument"


class InvalidInstanceFile(InvalidRequest):
    title, slug = "Invalid instance file", "invalid-instance-file"


class IdempotencyKeyReused(InvalidRequest):
    title, slug = "Idempotency-Key reused", "idempotency-key-reused"


class Unauthorized(SynapseServeError):
    status, title, slug = 401, "Unauthorized", "unauthorized"
    default_headers = {"WWW-Authenticate": 'Bearer realm="synapse-serve"'}


class QuotaExceeded(SynapseServeError):
    status, title, slug = 403, "Quota exceeded", "quota-exceeded"


class NotFound(SynapseServeError):
    status, title, slug = 404, "Not found", "not-found"


class AlreadyExists(SynapseServeError):
    status, title, slug = 409, "Already exists", "already-exists"


class DeviceFull(SynapseServeError):
    """A create or call that would put a device over its state budget (refused before any work)."""

    status, title, slug = 409, "Device full", "device-full"


class AnswerNotKept(SynapseServeError):
    """A repeated Idempotency-Key whose call ran once; its answer was dropped to bound memory. Not run again."""

    status, title, slug = 409, "Answer no longer kept", "answer-not-kept"


class DamagedFile(SynapseServeError):
    """A snapshot or an evicted copy whose file is damaged (truncated, altered): not the disk's fault, nor the
    caller's; it can be deleted, never restored."""

    status, title, slug = 409, "Damaged file", "damaged-file"


class PreconditionFailed(SynapseServeError):
    status, title, slug = 412, "Precondition failed", "precondition-failed"


class MalformedBody(SynapseServeError):
    status, title, slug = 400, "Malformed body", "malformed-body"


class NotAcceptable(SynapseServeError):
    status, title, slug = 406, "Not acceptable", "not-acceptable"


class RequestTimeout(SynapseServeError):
    status, title, slug = 408, "Request timeout", "request-timeout"
    default_headers = {"Connection": "close"}


class ClientGone(SynapseServeError):
    """The client closed its connection before its body had arrived: no answer reaches it; none is our bug."""

    status, title, slug = 400, "Client went away", "client-gone"
    default_headers = {"Connection": "close"}


class BodyTooLarge(SynapseServeError):
    status, title, slug = 413, "Body too large", "body-too-large"


class UnsupportedMediaType(SynapseServeError):
    status, title, slug = 415, "Unsupported media type", "unsupported-media-type"


class NotReady(SynapseServeError):
    status, title, slug = 503, "Not ready", "not-ready"
    default_headers = {"Retry-After": "1"}


class DeviceError(SynapseServeError):
    status, title, slug = 500, "Device error", "device-error"


class StorageError(SynapseServeError):
    status, title, slug = 507, "Storage error", "storage-error"
