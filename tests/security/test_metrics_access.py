"""/metrics: counts what was sent; needs a token when auth is on, unless SYNAPSE_METRICS_OPEN."""

from __future__ import annotations

import httpx
import numpy as np

from conftest import LiveServer, metric, metrics_of
from synapse_client import SynapseClient

TOKEN = "alice-" + "a" * 24


def sample(text: str, name: str, **labels: str) -> float:
    return metric(metrics_of(text), name, **labels)


def test_scraped_counts_equal_what_was_sent(tmp_path):
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        syn = client.create("m", kind="HebbianDeconvSynapse", config={"shape": [1, 1, 1, 1], "x_shape": [2, 2]})
        x = np.ones((1, 2, 2, 1), np.float32)
        for _ in range(7):
            syn.forward(x)
        for _ in range(3):
            httpx.get(f"{server.url}/v1/synapses/missing")
        text = httpx.get(f"{server.url}/metrics").text
        route = "/v1/synapses/{name}/{operation}"
        assert sample(text, "synapse_requests_total", method="POST", route=route, status="200") == 7
        assert sample(text, "synapse_requests_total", method="GET", route="/v1/synapses/{name}", status="404") == 3
        assert sample(text, "synapse_request_duration_seconds_count", method="POST", route=route) == 7
        assert sample(text, "synapse_request_duration_seconds_bucket", method="POST", route=route, le="+Inf") == 7
        assert sample(text, "synapse_instances", kind="HebbianDeconvSynapse", owner="local") == 1
        assert "synapse_storage_failing 0" in text
        assert "missing" not in text  # names never become labels


def test_metrics_need_a_token_unless_opened(tmp_path):
    with LiveServer(state_dir=tmp_path / "a", auth="on", tokens=f"alice:{TOKEN}") as server:
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    with LiveServer(state_dir=tmp_path / "b", auth="on", tokens=f"alice:{TOKEN}", metrics_open=True) as server:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
