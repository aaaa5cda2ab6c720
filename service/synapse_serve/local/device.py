"""Running a device program: a failure of the device (out of memory, a fault) is the server's, not the caller's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from synapse_serve.errors import DeviceError, SynapseServeError


def device_call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a JAX computation; failures of the device are the server's, not the caller's."""
    try:
        return fn(*args)
    except SynapseServeError:
        raise
    except (jax.errors.JaxRuntimeError, MemoryError) as exc:  # OOM and other device faults
        raise DeviceError(f"the device failed: {str(exc).splitlines()[0][:300]}") from exc
