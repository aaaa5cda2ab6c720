"""synapse_client: a thin Python client for synapse-serve (numpy, msgpack, httpx and websockets only)."""

from synapse_client._client import (
    AsyncSynapse,
    AsyncSynapseClient,
    Synapse,
    SynapseClient,
)
from synapse_client._codec import DTYPES, Ref, decode_tensor, encode_tensor, packb, unpackb
from synapse_client._session import AsyncSession, Pending, Session
from synapse_client._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InsufficientStorageError,
    InternalServerError,
    NotAcceptableError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PreconditionFailedError,
    RequestTimeoutError,
    ServiceUnavailableError,
    SynapseError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
    WireError,
)

__version__ = "0.1.0"

__all__ = [
    "DTYPES",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncSession",
    "AsyncSynapse",
    "AsyncSynapseClient",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InsufficientStorageError",
    "InternalServerError",
    "NotAcceptableError",
    "NotFoundError",
    "Pending",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "Ref",
    "RequestTimeoutError",
    "ServiceUnavailableError",
    "Session",
    "Synapse",
    "SynapseClient",
    "SynapseError",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
    "WireError",
    "__version__",
    "decode_tensor",
    "encode_tensor",
    "packb",
    "unpackb",
]
