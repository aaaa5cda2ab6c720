"""Sequences around a convolution, written out instead of scanned.

On the CPU, XLA runs a convolution with Eigen's kernel only in a program's entry computation: its
``convolution-canonicalization`` pass walks no loop body, so inside ``lax.scan`` every convolution
runs as XLA's own loop nest, and the deconvolution's filter gradient is summed in another order
(within float32 rounding of a separate call's, not bit for bit). A sequence of an operation that
convolves therefore writes its steps out one after another in one program, at most ``WRITTEN_OUT``
of them, each fenced off from the next by ``lax.optimization_barrier`` (so that XLA computes each
as a call alone would, never fused with its neighbour); more run as several such programs, one
after another on the device, cut so that they repeat: at most four distinct programs per sequence.
Measured (bench/written_out.py, docs/benchmarks.md): evolve sequences 3.5-4x faster than scanned,
forward sequences ~15% slower, the first call's compile 2-10x longer (linear in the steps written
out: ~0.5 s for 20 steps of the bench loop's evolve).

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


def pieces(steps: int, every: int, last: bool) -> list[tuple[int, int, tuple[int, ...]]]:
    """``(start, stop, kept)`` of each program's share of ``steps`` steps, ``kept`` the positions within it whose
    state comes back (after every ``every``-th step; none with ``last``). Shares repeat one length and the same kept
    positions wherever they can — whole groups of ``every`` steps when they fit in ``WRITTEN_OUT``, else each group
    in pieces — so that a sequence compiles at most four programs, however long and whatever its ``every`` (one
    per pattern would have let one request compile dozens, seconds each)."""
    if last:
        return [(start, stop, ()) for start, stop in _split(0, steps, WRITTEN_OUT)]
    groups_end = steps // every * every  # the steps after the last whole group are run, not kept
    out = []
    if every <= WRITTEN_OUT:
        for start, stop in _split(0, groups_end, every * (WRITTEN_OUT // every)):
            out.append((start, stop, tuple(range(every - 1, stop - start, every))))
    else:
        for group in range(0, groups_end, every):
            parts = _split(group, group + every, WRITTEN_OUT)
            out += [(start, stop, ()) for start, stop in parts[:-1]]
            start, stop = parts[-1]
            out.append((start, stop, (stop - start - 1,)))
    return out + [(start, stop, ()) for start, stop in _split(groups_end, steps, WRITTEN_OUT)]


def _split(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(at, min(at + size, stop)) for at in range(start, stop, size)]
