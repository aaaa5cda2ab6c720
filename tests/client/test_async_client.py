"""The async twin, against the same live server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from synapse_client import AsyncSynapseClient, ConflictError, NotFoundError, UnprocessableEntityError

CONFIG = {"shape": [3, 3, 1, 2], "x_shape": [5, 5], "eta": 0.1, "stride": 2}


def run(coro):
    return asyncio.run(coro)


def test_async_round_trip(live_server, unique_name):
    async def main():
        async with AsyncSynapseClient(live_server.url) as client:
            syn = await client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
            x = np.ones((2, 5, 5, 1), np.float32)
            y = await syn.forward(x)
            assert y.shape == (2, 10, 10, 2)
            result = await syn.evolve(x, y, returns=("dWeights",))
            assert result["dWeights"].shape == (3, 3, 1, 2)
            assert (await syn.backtransmit()).shape == (2, 5, 5, 1)
            await syn.reset()
            assert (await syn.weights).shape == (3, 3, 1, 2)
            await syn.set("weights", np.zeros((3, 3, 1, 2)))
            assert not (await syn.get("weights")).any()
            assert (await syn.help())["kind"] == "HebbianDeconvSynapse"
            assert (await syn.describe())["counters"]["evolve"] == 1
            assert unique_name in {d["name"] for d in await client.list()}
            assert (await client.get(unique_name)).name == unique_name
            assert {k["name"] for k in await client.kinds()} >= {"HebbianDeconvSynapse"}
            assert (await client.kind_help("DeconvSynapse"))["kind"] == "DeconvSynapse"
            assert await client.health()
            with pytest.raises(ConflictError):
                await client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
            with pytest.raises(UnprocessableEntityError):
                await syn.forward(np.ones((2, 4, 5, 1)))
            await syn.delete()
            with pytest.raises(NotFoundError):
                await syn.describe()

    run(main())


def test_async_concurrent_instances(live_server, unique_name):
    async def one(client, i):
        syn = await client.create(f"{unique_name}-{i}", kind="HebbianDeconvSynapse", config=CONFIG, seed=i)
        for _ in range(5):
            x = np.full((1, 5, 5, 1), i, np.float32)
            await syn.evolve(x, await syn.forward(x))
        return (await syn.describe())["counters"]["evolve"]

    async def main():
        async with AsyncSynapseClient(live_server.url) as client:
            return await asyncio.gather(*(one(client, i) for i in range(6)))

    assert run(main()) == [5] * 6
