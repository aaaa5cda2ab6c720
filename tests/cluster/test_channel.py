"""The direct channel's two ends on loopback, without Ray (cluster/channel.py): what a call carries comes back
exactly; a door closed before the call (a wrong secret, a shard at its connection limit) is a call never sent; a
connection lost mid-call, or a call cancelled mid-way, is never reused."""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np
import pytest

from synapse_serve.cluster.channel import Channel, ChannelLost, Listener, decode_answer, request_parts
from synapse_serve.names import CompartmentRef, InstanceKey


class Shard:
    """A handler that records what it was asked and answers with it (or waits, when told to)."""

    def __init__(self) -> None:
        self.asked: list[tuple] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, method: str, args: tuple, kwargs: dict) -> tuple:
        self.asked.append((method, args, kwargs))
        self.release.wait(30)
        if method == "read":
            return ("ok", (np.arange(6, dtype=np.float32).reshape(2, 3), 7))
        if method == "write":
            return ("error", "PreconditionFailed", "version moved", {"current": 3}, {"ETag": '"3"'})
        if kwargs.get("operation") == "broken":
            raise KeyError("a bug in the shard")
        return ("ok", {"version": 2, "outputs": kwargs["tensors"]["inputs"] * 2})


@pytest.fixture
def shard():
    handler = Shard()
    listener = Listener(handler, host="127.0.0.1", port=0, max_frame_bytes=64 << 20, max_elements=1 << 24,
                        max_connections=4)
    yield handler, listener
    handler.release.set()
    listener.close()


def run(coroutine) -> object:
    """Run a test's coroutine, bounded: a channel that waits for bytes that never come must fail, not hang."""
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def _channel(listener: Listener, secret: bytes | None = None) -> Channel:
    async def locate():
        return (*listener.address, listener.secret if secret is None else secret)
    return Channel(locate, size=4)


async def _call(channel: Channel, method: str, *args, **kwargs) -> tuple:
    return decode_answer(method, await channel.call(request_parts(method, args, kwargs)))


def test_a_call_carries_arrays_references_and_errors_exactly(shard):
    handler, listener = shard
    key = InstanceKey("alice", "enc")
    x = np.random.default_rng(0).random((3, 5), np.float32)
    big = np.random.default_rng(1).random((300, 300), np.float32)  # sent without copies (over 64 KiB)

    async def main():
        channel = _channel(listener)
        answer = await _call(channel, "call", key, operation="forward", tensors={"inputs": x},
                             returns=None, idempotency_key="k-1", expected_version=None, sequence=None)
        assert answer[0] == "ok" and answer[1]["version"] == 2
        np.testing.assert_array_equal(answer[1]["outputs"], x * 2)
        answer = await _call(channel, "call", key, operation="evolve",
                             tensors={"inputs": big, "pre": CompartmentRef("outputs", "dec")}, returns=["weights"],
                             idempotency_key=None, expected_version=4, sequence={"every": 2, "last": False})
        np.testing.assert_array_equal(answer[1]["outputs"], big * 2)
        read = await _call(channel, "read", key, compartment="weights")
        assert read[0] == "ok" and read[1][1] == 7
        np.testing.assert_array_equal(read[1][0], np.arange(6, dtype=np.float32).reshape(2, 3))
        assert await _call(channel, "write", key, compartment="w", value=x, expected_version=1) == (
            "error", "PreconditionFailed", "version moved", {"current": 3}, {"ETag": '"3"'})
        broken = await _call(channel, "call", key, operation="broken", tensors={})  # our bug: a 500, and it goes on
        assert broken[:2] == ("error", "SynapseServeError") and "KeyError" in broken[2]
        assert (await _call(channel, "read", key, compartment="weights"))[0] == "ok"
        channel.forget()

    run(main())
    (m1, a1, k1), (m2, a2, k2) = handler.asked[:2]
    assert (m1, a1) == ("call", (key,)) and k1["idempotency_key"] == "k-1" and k1["returns"] is None
    np.testing.assert_array_equal(k1["tensors"]["inputs"], x)
    assert k2["tensors"]["pre"] == CompartmentRef("outputs", "dec") and k2["expected_version"] == 4
    assert k2["sequence"] == {"every": 2, "last": False} and k2["returns"] == ["weights"]
    assert listener.frames == 6


def test_a_door_closed_before_the_call_is_a_call_never_sent(shard):
    handler, listener = shard

    async def refused(channel: Channel) -> ChannelLost:
        with pytest.raises(ChannelLost) as lost:
            await _call(channel, "read", InstanceKey("a", "b"), compartment="weights")
        channel.forget()
        return lost.value

    assert refused_not_sent(run(refused(_channel(listener, secret=b"\0" * 32))))
    strangers = [socket.create_connection(listener.address) for _ in range(4)]  # the limit, none authenticated
    try:
        assert refused_not_sent(run(refused(_channel(listener))))
    finally:
        for stranger in strangers:
            stranger.close()
    assert handler.asked == []


def refused_not_sent(lost: ChannelLost) -> bool:
    return lost.sent is False


def test_a_call_cancelled_or_cut_mid_way_never_reuses_its_connection(shard):
    handler, listener = shard
    key = InstanceKey("alice", "enc")

    async def main():
        channel = _channel(listener)
        handler.release.clear()  # the shard holds the next call
        pending = asyncio.ensure_future(_call(channel, "read", key, compartment="weights"))
        while not handler.asked:
            await asyncio.sleep(0.01)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert channel._idle == []  # its answer is still due on that connection: it is closed, not pooled
        handler.release.set()
        answer = await _call(channel, "read", key, compartment="weights")  # a fresh connection
        assert answer[1][1] == 7 and len(channel._idle) == 1
        listener.close()  # the shard goes away between calls: the pooled connection is seen closed
        await asyncio.sleep(0.2)
        with pytest.raises(ChannelLost):
            await _call(channel, "read", key, compartment="weights")
        channel.forget()

    run(main())


def test_a_frame_the_shard_cannot_decode_is_refused_unrun_and_the_connection_goes_on():
    """A red-team run: a frame the shard's decoder refused (a map nested past its depth, a reference's values over
    its element bound) closed the connection, and the front took that for a shard that died — a keyed call was
    retried for good. It is answered ``refused`` (nothing ran: the front sends it through Ray) and the stream stays
    in step."""
    handler = Shard()
    listener = Listener(handler, host="127.0.0.1", port=0, max_frame_bytes=64 << 20, max_elements=1000)
    key = InstanceKey("alice", "enc")
    deep: object = 1
    for _ in range(62):  # within what a body may nest; the frame's own maps take it past the shard's bound
        deep = [deep]

    async def main():
        channel = _channel(listener)
        nested = await _call(channel, "call", key, operation="forward", tensors={"inputs": np.ones((1, 2), np.float32)},
                             sequence={"zz": deep})
        assert nested[0] == "refused" and "deep" in nested[1]
        large = await _call(channel, "call", key, operation="forward",
                            tensors={"inputs": np.ones((100, 20), np.float32)})  # over the shard's element bound
        assert large[0] == "refused" and "elements" in large[1]
        assert (await _call(channel, "read", key, compartment="weights"))[0] == "ok"  # the same connection
        assert len(channel._idle) == 1
        channel.forget()

    try:
        run(main())
    finally:
        listener.close()
    assert [method for method, _, _ in handler.asked] == ["read"]  # the refused ones never ran


def test_a_connection_has_a_few_seconds_in_all_to_present_the_secret(shard, monkeypatch):
    """A red-team run: the secret's timeout was per read, and a byte every 4 s held a connection (and its thread)
    open for minutes without a secret; 1,023 of them took a shard's every slot."""
    import time

    from synapse_serve.cluster import channel as channel_module

    monkeypatch.setattr(channel_module, "AUTH_TIMEOUT_S", 1.0)
    _, listener = shard
    with socket.create_connection(listener.address, timeout=10) as stranger:
        started, closed = time.monotonic(), False
        try:
            while time.monotonic() - started < 6 and not closed:
                stranger.sendall(b"x")  # one byte of 32 at a time, each within the old per-read timeout
                stranger.settimeout(0.3)
                try:
                    closed = stranger.recv(1) == b""
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        assert closed and time.monotonic() - started < 3
