"""Fixtures of the Ray backend's tests: one local Ray cluster for this package's tests (stopped after them: idle, it
would share the CPU with the rest of the suite)."""

from __future__ import annotations

import pytest

from cluster.raycluster import local_cluster


@pytest.fixture(scope="package")
def cluster():
    with local_cluster():
        yield
