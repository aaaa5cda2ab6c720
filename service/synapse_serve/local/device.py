"""Running a device program: a failure of the device (out of memory, a fault) is the server's, not the caller's;
and whether a program may still read memory its caller owns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from synapse_serve.errors import DeviceError, SynapseServeError


def device_call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a JAX computation; failures of the device are the server's, not the caller's."""
    try:
        return fn(*args)
    except SynapseServeError:
        raise
    except (jax.errors.JaxRuntimeError, MemoryError) as exc:  # OOM and other device faults
        raise DeviceError(f"the device failed: {str(exc).splitlines()[0][:300]}") from exc


def reads_caller_memory(args: list[Any]) -> bool:
    """Whether a device program given ``args`` reads memory its caller may change after the call returns.

    XLA on CPU reads a 64-byte aligned host array in place instead of copying it, when the program runs:
    after the dispatching call has returned (JAX dispatches asynchronously). In the in-process mode the
    arrays are the caller's own, and a loop that changes them in place next (``z -= rate * dz``) would
    change what the operation computes and stores; so such a call returns only once its program has run.
    A decoded request body (a read-only view of ``bytes``) cannot change: those calls do not wait."""
    for arg in args:
        if type(arg) is np.ndarray:
            if arg.flags.writeable:
                return True
            base = arg
            while isinstance(base, np.ndarray):
                base = base.base
            if not isinstance(base.obj if isinstance(base, memoryview) else base, bytes):
                return True
    return False
