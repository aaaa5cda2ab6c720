"""The domain's exceptions: one hierarchy, mapped once to HTTP problems at the edge.

    SynapseServeError
    ├── InvalidRequest          (422) a value the caller sent is not allowed
    │   ├── InvalidConfig       a hyperparameter or init spec is out of range
    │   ├── InvalidName         an instance name breaks the naming rule
    │   ├── ShapeMismatch       a tensor has the wrong shape or dtype
    │   └── UnknownOperation    the kind has no such operation or compartment
    ├── Unauthorized            (401) no token, or not a known one
    ├── QuotaExceeded           (403) an owner's instance or state-byte quota is used up
    ├── NotFound                (404) no such kind or instance (or not yours)
    ├── AlreadyExists           (409) an instance of that name exists
    ├── PreconditionFailed      (412) If-Match named a version that has moved
    ├── MalformedBody           (400) the body cannot be decoded
    ├── BodyTooLarge            (413) the body is over the configured limit
    ├── UnsupportedMediaType    (415) a content type we do not speak
    ├── NotAcceptable           (406) no response type the caller accepts
    ├── NotReady                (503) the server is still warming up
    ├── DeviceError             (500) the accelerator failed; not the caller's fault
    └── StorageError            (507) the state directory could not be written
"""

from __future__ import annotations


class SynapseServeError(Exception):
    """Base of every error the service raises on purpose."""

    status = 500
    title = "Internal error"
    slug = "internal-error"
    headers: dict[str, str] = {}

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidRequest(SynapseServeError):
    status, title, slug = 422, "Invalid request", "invalid-request"


class InvalidConfig(InvalidRequest):
    title, slug = "Invalid configuration", "invalid-config"


class InvalidName(InvalidRequest):
    title, slug = "Invalid name", "invalid-name"


class ShapeMismatch(InvalidRequest):
    title, slug = "Shape or dtype mismatch", "shape-mismatch"


class UnknownOperation(InvalidRequest):
    title, slug = "Unknown operation or compartment", "unknown-operation"


class Unauthorized(SynapseServeError):
    status, title, slug = 401, "Unauthorized", "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="synapse-serve"'}


class QuotaExceeded(SynapseServeError):
    status, title, slug = 403, "Quota exceeded", "quota-exceeded"


class DeviceFull(SynapseServeError):
    """A create that would put a device over its memory budget (refused now rather than failing later)."""

    status, title, slug = 409, "Device full", "device-full"


class NotFound(SynapseServeError):
    status, title, slug = 404, "Not found", "not-found"


class AlreadyExists(SynapseServeError):
    status, title, slug = 409, "Already exists", "already-exists"


class PreconditionFailed(SynapseServeError):
    status, title, slug = 412, "Precondition failed", "precondition-failed"


class MalformedBody(SynapseServeError):
    status, title, slug = 400, "Malformed body", "malformed-body"


class BodyTooLarge(SynapseServeError):
    status, title, slug = 413, "Body too large", "body-too-large"


class UnsupportedMediaType(SynapseServeError):
    status, title, slug = 415, "Unsupported media type", "unsupported-media-type"


class NotAcceptable(SynapseServeError):
    status, title, slug = 406, "Not acceptable", "not-acceptable"


class NotReady(SynapseServeError):
    status, title, slug = 503, "Not ready", "not-ready"


class DeviceError(SynapseServeError):
    status, title, slug = 500, "Device error", "device-error"


class StorageError(SynapseServeError):
    status, title, slug = 507, "Storage error", "storage-error"
