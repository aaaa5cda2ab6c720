"""synapse_client: a thin Python client for synapse-serve (numpy, msgpack and httpx only)."""

from synapse_client._client import (
    AsyncSynapse,
    AsyncSynapseClient,
    Synapse,
    SynapseClient,
)
from synapse_client._codec import DTYPES, Ref, decode_tensor, encode_tensor, packb, unpackb
from synapse_client._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PreconditionFailedError,
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
    "AsyncSynapse",
    "AsyncSynapseClient",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "Ref",
    "ServiceUnavailableError",
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
