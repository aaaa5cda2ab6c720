"""Sequences around a convolution, written out instead of scanned.

On the CPU, XLA runs a convolution with Eigen's kernel only in a program's entry computation: its
``convolution-canonicalization`` pass walks no loop body, so inside ``lax.scan`` every convolution
runs as XLA's own loop nest, and the deconvolution's filter gradient is summed in another order
(within float32 rounding of a separate call's, not bit for bit). A sequence of an operation that
convolves therefore writes its steps out one after another in one program, at most ``WRITTEN_OUT``
of them, each fenced off from the next by ``lax.optimization_barrier`` (so that XLA computes each
as a call alone would, never fused with its neighbour); more run as several such programs, one
after another on the device. Measured (bench/written_out.py, docs/benchmarks.md): evolve sequences
3.5-4x faster than scanned, forward sequences ~15% slower, the first call's compile 2-10x longer
(linear in the steps written out: ~0.5 s for 20 steps of the bench loop's evolve).

Packed calls keep ``lax.map`` over the instances: written out, a population of small instances ran
2-20x slower (each instance's few kernels cost more dispatched one by one than XLA's loop costs
them), and speed is what packing is for. Their deconvolution's evolve stays within float32 rounding
of separate calls, bit for bit at small sizes (docs/conformance.md).
"""

from __future__ import annotations

from typing import Any

WRITTEN_OUT = 32  # steps written out in one program (compile time grows with it)


def convolves(jaxpr: Any) -> bool:
    """Whether a traced program holds a convolution, in any inner program too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for param in eqn.params.values():
            for inner in (param if isinstance(param, (tuple, list)) else (param,)):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's own
                if hasattr(inner, "eqns") and convolves(inner):
                    return True
    return False


def chunks(count: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each program's share of ``count`` steps."""
    return [(start, min(start + WRITTEN_OUT, count)) for start in range(0, count, WRITTEN_OUT)]
