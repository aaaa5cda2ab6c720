"""Retries: connection errors are retried with backoff; evolve only with its Idempotency-Key; create never."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from synapse_client import (
    APIConnectionError,
    APITimeoutError,
    BadRequestError,
    PreconditionFailedError,
    SynapseClient,
    UnprocessableEntityError,
)

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


class DropAfterApplying(httpx.BaseTransport):
    """Forwards each request for real, then loses the first ``drops`` answers: the server applied the call."""

    def __init__(self, drops: int) -> None:
        self.drops = drops
        self.keys: list[str | None] = []
        self.real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.real.handle_request(request)
        if request.url.path.endswith("/evolve"):
            self.keys.append(request.headers.get("idempotency-key"))
            if self.drops > 0:
                self.drops -= 1
                response.read()
                response.close()
                raise httpx.ReadError("connection dropped after the server answered (injected)", request=request)
        return response

    def close(self) -> None:
        self.real.close()


def test_retried_evolve_applies_exactly_once(client, live_server, unique_name, monkeypatch):
    monkeypatch.setattr(SynapseClient, "_backoff", lambda self, attempt: 0.01)
    client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
    transport = DropAfterApplying(drops=2)
    x = np.ones((1, 2, 2, 1), np.float32)
    with SynapseClient(live_server.url, transport=transport, max_retries=3) as c:
        syn = c.get(unique_name)
        first = syn.evolve(x, x)  # applied, answer lost twice, third attempt gets the stored answer
        second = syn.evolve(x, x)
    assert len(transport.keys) == 4 and len(set(transport.keys[:3])) == 1 and transport.keys[3] != transport.keys[0]
    assert client.get(unique_name).describe()["counters"] == {"evolve": 2}  # exactly the distinct calls
    assert (first["version"], second["version"]) == (2, 3)


def test_create_is_retried_only_when_it_was_never_sent(flaky_client, live_server, unique_name, monkeypatch):
    c, transport = flaky_client  # two refused connections: the request never left, so retrying is safe
    c.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
    assert transport.attempts["POST /v1/synapses"] == 3
    monkeypatch.setattr(SynapseClient, "_backoff", lambda self, attempt: 0.01)
    dropped = DropAnswers(path="/v1/synapses", drops=5)  # sent and applied, then the answer is lost
    with SynapseClient(live_server.url, transport=dropped, max_retries=3) as lossy, \
            pytest.raises(APIConnectionError, match=r"after 1 attempt \(not retried: the server may have applied it\)"):
        lossy.create(unique_name + "-2", kind="HebbianDeconvSynapse", config=CONFIG)
    assert dropped.sent == 1


class DropAnswers(httpx.BaseTransport):
    """Forwards requests to ``path`` for real, then loses their answers (a dropped connection)."""

    def __init__(self, path: str, drops: int, error: type[httpx.TransportError] = httpx.ReadError) -> None:
        self.path, self.drops, self.error, self.sent = path, drops, error, 0
        self.real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.real.handle_request(request)
        if request.url.path == self.path and self.drops > 0:
            self.sent += 1
            self.drops -= 1
            response.read()
            response.close()
            raise self.error("answer lost (injected)", request=request)
        return response

    def close(self) -> None:
        self.real.close()


def test_a_timed_out_forward_is_not_run_again_and_says_what_to_do(client, live_server, unique_name, monkeypatch):
    monkeypatch.setattr(SynapseClient, "_backoff", lambda self, attempt: 0.01)
    client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
    path = f"/v1/synapses/{unique_name}/forward"
    timing_out = DropAnswers(path=path, drops=5, error=httpx.ReadTimeout)
    with SynapseClient(live_server.url, transport=timing_out, max_retries=3) as c:
        with pytest.raises(APITimeoutError) as info:
            c.get(unique_name).forward(np.ones((1, 2, 2, 1), np.float32))
    message = str(info.value)
    assert "after 1 attempt" in message and "not retried" in message and "timeout=" in message
    assert timing_out.sent == 1 and client.get(unique_name).describe()["counters"] == {"forward": 1}


def test_idempotency_key_reused_for_another_request_is_refused(client, unique_name):
    syn = client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
    x = np.ones((1, 2, 2, 1), np.float32)
    first = syn.call("evolve", pre=x, post=x, idempotency_key="k1", returns=["dWeights"])
    again = syn.call("evolve", pre=x, post=x, idempotency_key="k1", returns=["dWeights"])
    assert again["version"] == first["version"] == 2
    np.testing.assert_array_equal(again["dWeights"], first["dWeights"])
    with pytest.raises(UnprocessableEntityError, match="different request"):
        syn.call("evolve", pre=x, post=2 * x, idempotency_key="k1", returns=["dWeights"])
    assert syn.describe()["counters"] == {"evolve": 1}


def test_if_match_guards_against_lost_updates(client, unique_name):
    syn = client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
    x = np.ones((1, 2, 2, 1), np.float32)
    version = syn.describe()["version"]
    assert syn.evolve(x, x, if_version=version)["version"] == version + 1
    with pytest.raises(PreconditionFailedError, match=f"at version {version + 1}, not {version}"):
        syn.evolve(x, x, if_version=version)
    with pytest.raises(PreconditionFailedError):
        client.request("PUT", f"/v1/synapses/{unique_name}/compartments/weights",
                       {"value": np.zeros((2, 2, 1, 1), np.float32)}, retry=False, headers={"If-Match": '"1"'})
    with pytest.raises(PreconditionFailedError):
        client.request("DELETE", f"/v1/synapses/{unique_name}", retry=False, headers={"If-Match": '"1"'})
    with pytest.raises(BadRequestError, match="If-Match"):
        client.request("POST", f"/v1/synapses/{unique_name}/reset", retry=False, headers={"If-Match": "latest"})
    assert syn.describe()["counters"] == {"evolve": 1}


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
