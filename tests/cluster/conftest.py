"""Fixtures of the Ray backend's tests: one local Ray cluster for the whole session."""

from __future__ import annotations

import pytest

from cluster.raycluster import local_cluster


@pytest.fixture(scope="session")
def cluster():
    with local_cluster():
        yield
