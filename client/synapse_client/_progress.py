"""Progress for long work: a tqdm bar when tqdm is installed (``pip install 'synapse-serve[progress]'``), else one
plain line on stderr. Used by ``progress=True`` on sequences, uploads and downloads."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

CHUNK_BYTES = 1 << 20  # uploads and downloads advance the bar every MiB
SEQUENCE_PARTS = 20  # a sequence with progress runs as at most this many calls, one bar step each


class _Line:
    """tqdm's few methods we use, printed as one line that rewrites itself."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self._shown = 0.0

    def update(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self._shown > 0.2 or (self.total is not None and self.n >= self.total):
            self._show()

    def _show(self) -> None:
        self._shown = time.monotonic()
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        percent = f"{100 * self.n / self.total:3.0f}% " if self.total else ""
        print(f"\r{self.desc}: {percent}{done} {self.unit}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._show()
        print(file=sys.stderr, flush=True)

    def __enter__(self) -> _Line:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(total: int | None, desc: str, unit: str = "B") -> Any:
    """A progress bar (tqdm's if installed) with ``update(n)`` and ``close()``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Line(total, desc, unit)
    scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, desc=desc, unit=unit, **scaled)


class Download:
    """An answer's body as it arrives, with a bar (of its Content-Length when the server sent one)."""

    def __init__(self, length: str | None, title: str) -> None:
        self.bar = bar(int(length or 0) or None, title)
        self.chunks: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.bar.update(len(chunk))

    def body(self) -> bytes:
        return b"".join(self.chunks)

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def body_length(content: Any) -> int:
    """Bytes of a request body (one buffer, or a list of parts)."""
    return sum(len(memoryview(p).cast("B")) for p in (content if isinstance(content, list) else [content]))


def finished(answer: Any, title: str | None) -> Any:
    """A transfer that arrived whole (a frame, in process): its bar shown done; returns the answer."""
    if title is not None:
        size = len(answer) if isinstance(answer, (bytes, bytearray)) else 0
        line = bar(size or None, title)
        line.update(size)
        line.close()
    return answer


def upload(parts: Any, progress: Any) -> Iterator[bytes | memoryview]:
    """A body's parts in MiB slices, advancing ``progress`` as each is handed to the connection."""
    for part in parts if isinstance(parts, list) else [parts]:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), CHUNK_BYTES):
            piece = view[start:start + CHUNK_BYTES]
            yield piece
            progress.update(len(piece))


class SequenceInParts:
    """A sequence run as up to SEQUENCE_PARTS calls of whole ``every``-step blocks, with a bar: ``calls()`` yields
    each call's arguments (the bar advances as the next is asked for), ``joined`` makes one answer of theirs."""

    def __init__(self, title: str, tensors: dict[str, Any], every: int | None, if_version: int | None,
                 idempotency_key: str | None) -> None:
        self.tensors, self.if_version, self.key = tensors, if_version, idempotency_key
        steps, self.parts = sequence_parts(tensors, every)
        self.bar = bar(steps, title, unit="step")

    def calls(self) -> Iterator[dict[str, Any]]:
        for index, part in enumerate(self.parts):
            yield {"if_version": self.if_version if index == 0 else None,
                   "idempotency_key": None if self.key is None else f"{self.key[:240]}/part-{index}",
                   **{k: (None if v is None else np.asarray(v)[part]) for k, v in self.tensors.items()}}
            self.bar.update(part.stop - part.start)

    def __enter__(self) -> SequenceInParts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def sequence_parts(tensors: dict[str, Any], every: int | None) -> tuple[int, list[slice]]:
    """The steps of a sequence and the slices it runs as (each a whole number of ``every``-step blocks)."""
    arrays = [np.asarray(v) for v in tensors.values() if v is not None and not hasattr(v, "to_wire")]
    if not arrays or arrays[0].ndim == 0:
        raise ValueError("a sequence with progress needs tensors with a leading time axis (steps, batch, …)")
    steps = arrays[0].shape[0]
    block = every or 1
    size = max(block, math.ceil(steps / SEQUENCE_PARTS / block) * block)
    return steps, [slice(start, min(start + size, steps)) for start in range(0, steps, size)]


def join_answers(answers: list[dict[str, Any]], last: bool) -> dict[str, Any]:
    """The answer of one sequence from those of its parts: compartments joined along time (``last``: the last)."""
    if last:
        return answers[-1]
    joined = {"version": answers[-1]["version"]}
    for name in answers[-1]:
        if name != "version":
            joined[name] = np.concatenate([a[name] for a in answers], axis=0)
    return joined
