"""The direct channel of the Ray backend (cluster/channel.py): each step's calls go to the shard over a socket of
its own, authenticated by the shard's secret; strangers and garbage close their connection and nothing else; when
the channel cannot be reached but Ray can, Ray carries the calls; with the channel off, Ray carries everything."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest

from cluster.raycluster import ray, ray_server, stop_shards
from synapse_client import SynapseClient
from synapse_serve.cluster.channel import ACCEPTED, decode_answer
from synapse_serve.cluster.shard import frame_cap
from synapse_serve.testing import free_port

CONFIG = {"shape": [6, 3], "eta": 0.1}


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    live = ray_server(tmp_path_factory.mktemp("ray-channel"), durability="sync")
    with live:
        yield live
    stop_shards(live)


def _channel(server, shard: int) -> dict:
    return server.app.state.server.backend.shard_info()[shard]["channel"]


def _learn(syn) -> np.ndarray:
    rng = np.random.default_rng(4)
    x, post = rng.random((2, 6), np.float32), rng.random((2, 3), np.float32)
    y = syn.forward(x)
    syn.evolve(x, post)
    syn.set("weights", syn.get("weights") * 0.5)
    return y


def test_each_steps_calls_take_the_channel_and_the_rest_takes_ray(server):
    with SynapseClient(server.url) as client:
        syn = client.create("steps", kind="HebbianSynapse", config=CONFIG, device="shard-1")
        before = _channel(server, 1)["frames"]
        _learn(syn)
        syn.describe()  # through Ray
        with client.session() as session:
            session.get("steps").forward(np.ones((1, 6), np.float32))
        assert _channel(server, 1)["frames"] - before == 5  # forward, evolve, read, write, and the session's forward
        host, port = _channel(server, 1)["address"]
        assert (host, port > 0) == ("127.0.0.1", True)  # where it was told to listen (loopback here), never 0.0.0.0


def test_by_default_a_channel_listens_on_its_nodes_cluster_address(cluster, tmp_path):
    live = ray_server(tmp_path, ray_direct_host=None, ray_shards=1)
    with live:
        node = ray.get_runtime_context().get_node_id()
        address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node)
        assert _channel(live, 0)["address"][0] == address
        with SynapseClient(live.url) as client:
            _learn(client.create("default-host", kind="HebbianSynapse", config=CONFIG))
        assert _channel(live, 0)["frames"] == 4
    stop_shards(live)


def _listening(server, shard: int) -> tuple[str, int, bytes]:
    """Where the shard's channel listens, and its secret (what the front learns through Ray)."""
    return ray.get(server.app.state.server.backend.shards[shard].channel.remote())


def _closed(connection: socket.socket) -> bool:
    """Whether the shard closed this connection (having said at most that it accepted the secret)."""
    connection.settimeout(10)
    received = b""
    try:
        while chunk := connection.recv(16):
            received += chunk
    except ConnectionResetError:
        pass
    return received in (b"", ACCEPTED)


def test_strangers_and_garbage_close_their_connection_and_nothing_else(server):
    host, port, secret = _listening(server, 0)
    refused = _channel(server, 0)["refused"]
    attempts = [
        b"\0" * 32,  # not the secret
        secret[:31],  # half a secret, then silence: the shard stops waiting
        secret + struct.pack("<Q", frame_cap(server.settings) + 1),  # a frame over the cap
    ]
    for attempt in attempts:
        with socket.create_connection((host, port)) as connection:
            connection.sendall(attempt)
            assert _closed(connection), attempt[:40]
    for garbage in (b"\xc1\xc1\xc1", b"\x91\x01"):  # not msgpack; msgpack, not a request: refused, nothing run
        with socket.create_connection((host, port), timeout=10) as connection:
            connection.sendall(secret + struct.pack("<Q", len(garbage)) + garbage)
            assert connection.recv(1) == ACCEPTED
            received = b""
            while len(received) < 8 or len(received) < 8 + struct.unpack("<Q", received[:8])[0]:
                received += connection.recv(4096)
            assert decode_answer("call", received[8:])[0] == "refused"
    assert _channel(server, 0)["refused"] - refused == 4  # the half secret timed out: closed, not counted
    with socket.create_connection((host, port)) as connection:  # a frame cut in the middle, then gone
        connection.sendall(secret + struct.pack("<Q", 1000) + b"\x83")
    with SynapseClient(server.url) as client:  # the shard answers as before
        syn = client.create("after-garbage", kind="HebbianSynapse", config=CONFIG, device="shard-0")
        with SynapseClient("local") as local:
            here = local.create("after-garbage", kind="HebbianSynapse", config=CONFIG)
            np.testing.assert_array_equal(_learn(syn), _learn(here))
            np.testing.assert_array_equal(syn.get("weights"), here.get("weights"))


def test_a_channel_that_cannot_be_reached_leaves_the_calls_to_ray(server):
    backend = server.app.state.server.backend
    with SynapseClient(server.url) as client:
        syn = client.create("fallback", kind="HebbianSynapse", config=CONFIG, device="shard-0")
        channel = backend.channels[0]
        located = channel.locate
        nowhere = free_port()  # nothing listens there: as if a firewall dropped the shard's port

        async def wrong_address():
            return ("127.0.0.1", nowhere, b"\0" * 32)

        channel.locate = wrong_address
        channel.forget()
        frames = _channel(server, 0)["frames"]
        try:
            _learn(syn)  # every call answered, through Ray
            assert not channel.usable()
            assert _channel(server, 0)["frames"] == frames
        finally:
            channel.locate = located
            channel.suspended_until = 0.0
        syn.forward(np.ones((1, 6), np.float32))
        assert _channel(server, 0)["frames"] == frames + 1  # and the channel again once it is reachable


def test_with_the_channel_off_ray_carries_every_call(cluster, tmp_path):
    live = ray_server(tmp_path, ray_direct=False)
    with live, SynapseClient(live.url) as client, SynapseClient("local") as local:
        assert all(info["channel"] is None for info in live.app.state.server.backend.shard_info())
        syn = client.create("no-channel", kind="HebbianSynapse", config=CONFIG)
        here = local.create("no-channel", kind="HebbianSynapse", config=CONFIG)
        np.testing.assert_array_equal(_learn(syn), _learn(here))
        np.testing.assert_array_equal(syn.get("weights"), here.get("weights"))
    stop_shards(live)


def test_a_shard_whose_channel_port_is_taken_serves_through_ray(cluster, tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))  # what another program holds on this node
    try:
        live = ray_server(tmp_path, ray_shards=1, ray_direct_port=taken.getsockname()[1])
        with live, SynapseClient(live.url) as client, SynapseClient("local") as local:
            assert _channel(live, 0) is None  # it could not listen, and said so; it did not crash-loop
            syn = client.create("port-taken", kind="HebbianSynapse", config=CONFIG)
            here = local.create("port-taken", kind="HebbianSynapse", config=CONFIG)
            np.testing.assert_array_equal(_learn(syn), _learn(here))
            assert not live.app.state.server.backend.channels[0].usable()  # set aside: Ray carries its calls
        stop_shards(live)
    finally:
        taken.close()


def test_concurrent_callers_each_get_their_own_answers(server):
    """Many calls at once over each shard's pool of connections: every answer is its own call's, bit for bit."""
    count, calls = 8, 15
    with SynapseClient(server.url) as client, SynapseClient("local") as local:
        remote = [client.create(f"busy-{i}", kind="HebbianSynapse", config=CONFIG, seed=i, device=f"shard-{i % 2}")
                  for i in range(count)]
        here = [local.create(f"busy-{i}", kind="HebbianSynapse", config=CONFIG, seed=i) for i in range(count)]
        inputs = np.random.default_rng(9).random((count, calls, 2, 6), np.float32)
        expected = [[h.forward(x) for x in inputs[i]] for i, h in enumerate(here)]
        got: dict[int, list[np.ndarray]] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                with SynapseClient(server.url) as own:  # a connection (and a front-side call) of its own
                    syn = own.get(remote[i].name)
                    got[i] = [syn.forward(x) for x in inputs[i]]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == [] and len(got) == count
        for i in range(count):
            for answer, want in zip(got[i], expected[i]):
                np.testing.assert_array_equal(answer, want)
