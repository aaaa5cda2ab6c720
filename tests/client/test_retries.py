"""Retries: connection errors are retried with backoff for idempotent calls, never for evolve or create."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from synapse_client import APIConnectionError, SynapseClient

CONFIG = {"shape": [2, 2, 1, 1], "x_shape": [2, 2], "eta": 0.1}


class FlakyTransport(httpx.BaseTransport):
    """Fails the first ``failures`` requests per path with a connection error, then forwards for real."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[str, int] = {}
        self.real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        key = f"{request.method} {request.url.path}"
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.attempts[key] <= self.failures:
            raise httpx.ConnectError("connection refused (injected)", request=request)
        return self.real.handle_request(request)

    def close(self) -> None:
        self.real.close()


@pytest.fixture
def flaky_client(live_server, monkeypatch):
    monkeypatch.setattr(SynapseClient, "_backoff", lambda self, attempt: 0.01)
    transport = FlakyTransport(failures=2)
    with SynapseClient(live_server.url, transport=transport, max_retries=2) as c:
        yield c, transport


def test_idempotent_calls_are_retried(client, flaky_client, unique_name):
    client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
    c, transport = flaky_client
    syn = c.get(unique_name)  # GET: failed twice, third attempt succeeds
    assert transport.attempts[f"GET /v1/synapses/{unique_name}"] == 3
    y = syn.forward([[[[1.0], [1.0]], [[1.0], [1.0]]]])  # nested lists are accepted
    assert y.shape == (1, 2, 2, 1)
    assert transport.attempts[f"POST /v1/synapses/{unique_name}/forward"] == 3


def test_evolve_and_create_are_never_retried(client, flaky_client, unique_name):
    client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
    c, transport = flaky_client
    syn = c.get(unique_name)
    x = np.ones((1, 2, 2, 1), np.float32)
    with pytest.raises(APIConnectionError, match="injected"):
        syn.evolve(x, x)
    assert transport.attempts[f"POST /v1/synapses/{unique_name}/evolve"] == 1
    with pytest.raises(APIConnectionError):
        c.create(unique_name + "-new", kind="HebbianDeconvSynapse", config=CONFIG)
    assert transport.attempts["POST /v1/synapses"] == 1
    assert client.get(unique_name).describe()["counters"] == {}


def test_retries_give_up(live_server, monkeypatch):
    monkeypatch.setattr(SynapseClient, "_backoff", lambda self, attempt: 0.01)
    transport = FlakyTransport(failures=10)
    with SynapseClient(live_server.url, transport=transport, max_retries=3) as c, pytest.raises(APIConnectionError):
        c.list()
    assert transport.attempts["GET /v1/synapses"] == 4


def test_backoff_grows_and_is_capped():
    c = SynapseClient("http://127.0.0.1:9")
    delays = [c._backoff(a) for a in range(8)]
    assert all(0.125 <= d <= 8.0 for d in delays) and delays[-1] >= 4.0
    c.close()
