"""What learned, seen from the client: filters pictures, statistics, history, what runs now, and progress (issue 16).

Every answer is checked against numpy on the same weights: the picture's pixels against the
normalisation it names, the statistics against numpy's, each history entry against the weights
the evolve that made it returned.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import LiveServer
from synapse_client import NotAcceptableError, PNG, SynapseClient, UnprocessableEntityError

DECONV = "HebbianDeconvSynapse"
DENSE = "HebbianSynapse"
HISTORY = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(state_dir=tmp_path_factory.mktemp("insight"), history_length=HISTORY) as live:
        yield live


class OverSession:
    """Creates and imports over REST; every handle it returns speaks over the session stream."""

    def __init__(self, rest: SynapseClient, session) -> None:
        self.rest, self.session = rest, session

    def create(self, name, **options):
        return self.session.get(self.rest.create(name, **options).name)

    def import_(self, path, *, name, progress=False):
        return self.session.get(self.rest.import_(path, name=name, progress=progress).name)


@pytest.fixture(params=["rest", "session", "local"])
def client(request, server):
    """The same calls over REST, over the session stream and in process."""
    if request.param == "local":
        with SynapseClient("local", local_settings={"history_length": HISTORY}) as local:  # kept, as by a server
            yield local
        return
    with SynapseClient(server.url) as rest:
        if request.param == "rest":
            yield rest
        else:
            with rest.session() as session:
                yield OverSession(rest, session)


def _unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns() % 10**12}"


def image(png: bytes) -> np.ndarray:
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.mode == "RGB"
    return np.asarray(picture)


def tile_pixels(pixels: np.ndarray, index: int, columns: int, tile: tuple[int, int], scale: int, pad: int = 1
                ) -> np.ndarray:
    """The pixels of tile ``index`` (sampled once per weight) of a grid."""
    row, column = divmod(index, columns)
    top, left = pad + row * (tile[0] * scale + pad), pad + column * (tile[1] * scale + pad)
    return pixels[top:top + tile[0] * scale:scale, left:left + tile[1] * scale:scale]


def expected_grey(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.round((values.astype(np.float64) - low) / (high - low) * 255).astype(np.uint8)


# --- pictures ---

@pytest.mark.parametrize("c_in, c_out, tiles, columns, colour", [
    (1, 4, 4, 2, False),   # one grey tile per output channel
    (3, 2, 2, 2, True),    # colour tiles: one per output channel
    (2, 3, 6, 2, False),   # a tile per (c_in, c_out) filter: a row per output channel, c_in across
])
def test_filter_tiles_follow_the_shapes_and_the_normalisation(client, c_in, c_out, tiles, columns, colour):
    rng = np.random.default_rng(c_in)
    weights = rng.normal(size=(3, 2, c_in, c_out)).astype(np.float32)
    syn = client.create(_unique("tiles"), kind=DECONV, config={"shape": [3, 2, c_in, c_out], "x_shape": [5, 5]},
                        init={"weights": weights})
    png = syn.plot_filters(normalize="global", scale=3)
    assert isinstance(png, PNG) and png._repr_png_() == bytes(png)
    pixels = image(png)
    rows = -(-tiles // columns)
    assert pixels.shape == (rows * (3 * 3 + 1) + 1, columns * (2 * 3 + 1) + 1, 3)
    low, high = float(weights.min()), float(weights.max())
    for index in range(tiles):
        got = tile_pixels(pixels, index, columns, (3, 2), 3)
        if colour:  # output channel `index`, its three input channels as RGB
            np.testing.assert_array_equal(got, expected_grey(weights[:, :, :, index], low, high))
        else:
            out, inp = divmod(index, c_in) if c_in not in (1, 3) else (index, 0)
            want = expected_grey(weights[:, :, inp, out], low, high)
            np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=-1))
    # per tile: every grey tile spans the full range
    per_tile = image(syn.plot_filters(normalize="tile", scale=1, padding=0))
    if not colour:
        for index in range(tiles):
            got = tile_pixels(per_tile, index, columns, (3, 2), 1, pad=0)[..., 0]
            assert got.min() == 0 and got.max() == 255


def test_symmetric_normalisation_is_blue_white_red_around_zero(client):
    weights = np.zeros((2, 2, 1, 1), np.float32)
    weights[0, 0, 0, 0], weights[1, 1, 0, 0] = 2.0, -2.0
    syn = client.create(_unique("sym"), kind=DECONV, config={"shape": [2, 2, 1, 1], "x_shape": [4, 4]},
                        init={"weights": weights})
    pixels = tile_pixels(image(syn.plot_filters(normalize="symmetric", scale=1)), 0, 1, (2, 2), 1)
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[1, 1].tolist() == [0, 0, 255]
    assert pixels[0, 1].tolist() == [255, 255, 255]


def test_a_picture_of_a_million_one_pixel_tiles_is_drawn_at_once(tmp_path):
    """A red-team run: a filter bank of 1x1 filters (a 1x1xCxC deconvolution) drawn one pixel a tile spent a Python
    step per tile — 1 s of CPU for a million, ~15 s extrapolated at the 16 M-pixel bound, and float64 copies of
    every weight (~1.3 GB). All tiles are placed at once now, and each copy is made once."""
    from synapse_serve.pictures import PictureOptions, render

    side = 1024
    weights = np.random.default_rng(3).normal(size=(1, 1, side, side)).astype(np.float32)
    started = time.thread_time()  # this thread's CPU: the machine's other work does not count
    picture = render(weights, PictureOptions.parse({"normalize": "global", "scale": "1", "padding": "0"}))
    spent = time.thread_time() - started
    pixels = image(picture.png)
    assert picture.tiles == side * side and pixels.shape == (side, side, 3)
    # a row per output channel, its input channels across: pixel (r, c) is weight (c, r)
    np.testing.assert_array_equal(pixels[..., 0], expected_grey(weights[0, 0].T, weights.min(), weights.max()))
    started = time.thread_time()  # what the PNG itself costs, apart
    Image.fromarray(pixels, "RGB").save(io.BytesIO(), format="PNG", optimize=False, compress_level=6)
    drawing = spent - (time.thread_time() - started)
    assert drawing < 0.5, f"{drawing:.2f} s of CPU for {side * side} tiles besides the PNG (one at a time: ~0.9 s)"


def test_dense_tiles_and_heat_map(client, tmp_path):
    rng = np.random.default_rng(7)
    weights = rng.normal(size=(16, 5)).astype(np.float32)
    syn = client.create(_unique("dense"), kind=DENSE, config={"shape": [16, 5]}, init={"weights": weights})
    pixels = image(syn.plot_filters(normalize="global", scale=2, columns=5))  # n_in = 16: 4x4 tiles
    assert pixels.shape == (1 * (4 * 2 + 1) + 1, 5 * (4 * 2 + 1) + 1, 3)
    low, high = float(weights.min()), float(weights.max())
    for unit in range(5):
        np.testing.assert_array_equal(tile_pixels(pixels, unit, 5, (4, 4), 2)[..., 0],
                                      expected_grey(weights[:, unit].reshape(4, 4), low, high))
    wide = image(syn.plot_filters(tile=(2, 8), columns=1, scale=1))
    assert wide.shape == (5 * (2 + 1) + 1, 8 + 2, 3)
    other = client.create(_unique("heat"), kind=DENSE, config={"shape": [6, 3]})  # 6 is not a square: a heat map
    path = tmp_path / "heat.png"
    heat = image(other.plot_filters(path, scale=1))
    assert heat.shape == (6 + 2, 3 + 2, 3) and path.read_bytes() == other.plot_filters(scale=1)


def test_a_picture_is_drawn_where_the_callers_thread_runs_an_event_loop(client):
    """A notebook cell runs while the kernel's asyncio loop runs: the blocking in-process client drew no picture
    there (a RuntimeError: the engine took the caller's loop for a server's). Every mode draws the same one."""
    syn = client.create(_unique("loop"), kind=DENSE, config={"shape": [4, 2]})
    outside = syn.plot_filters(scale=1)

    async def in_a_cell() -> bytes:
        return syn.plot_filters(scale=1)

    assert asyncio.run(in_a_cell()) == outside
    assert outside.startswith(b"\x89PNG")


def test_the_update_picture_changes_after_evolve(client):
    syn = client.create(_unique("learn"), kind=DECONV, config={"shape": [3, 3, 1, 2], "x_shape": [6, 6], "eta": 0.5})
    rng = np.random.default_rng(3)
    before = image(syn.plot_filters())
    before_update = image(syn.plot_filters(compartment="dWeights", normalize="symmetric"))
    for _ in range(3):
        syn.evolve(rng.random((2, 6, 6, 1), np.float32), rng.random((2, 6, 6, 2), np.float32))
    assert not np.array_equal(image(syn.plot_filters()), before)
    assert not np.array_equal(image(syn.plot_filters(compartment="dWeights", normalize="symmetric")), before_update)


@pytest.mark.parametrize("options, error, fragment", [
    ({"normalize": "loud"}, UnprocessableEntityError, "normalize"),
    ({"scale": 0}, UnprocessableEntityError, "scale"),
    ({"scale": 65}, UnprocessableEntityError, "scale"),
    ({"columns": 0}, UnprocessableEntityError, "columns"),
    ({"padding": 17}, UnprocessableEntityError, "padding"),
    ({"compartment": "biases"}, UnprocessableEntityError, "weights-shaped"),
    ({"compartment": "nothing"}, UnprocessableEntityError, "nothing"),
])
def test_bad_picture_options_are_refused_by_name(client, options, error, fragment):
    syn = client.create(_unique("bad"), kind=DECONV, config={"shape": [2, 2, 1, 2], "x_shape": [4, 4]})
    version = syn.describe()["version"]
    with pytest.raises(error, match=fragment):
        syn.plot_filters(**options)
    assert syn.describe()["version"] == version


def test_picture_errors_over_http(server):
    with SynapseClient(server.url) as client:
        syn = client.create(_unique("http"), kind=DENSE, config={"shape": [6, 3]})
        with pytest.raises(UnprocessableEntityError, match="tile"):
            syn.plot_filters(tile=(4, 4))
    base = f"{server.url}/v1/synapses/{syn.name}/filters.png"
    for query, status, fragment in [("?bogus=1", 422, "bogus"), ("?tile=a,b", 422, "tile"), ("?tile=2", 422, "tile"),
                                    ("?scale=1e9", 422, "scale")]:
        answer = httpx.get(base + query)
        assert answer.status_code == status and fragment in answer.json()["detail"], answer.text
    assert httpx.get(f"{server.url}/v1/synapses/no-such/filters.png").status_code == 404
    refused = httpx.get(base, headers={"Accept": "application/json"})
    assert refused.status_code == 406 and refused.headers["content-type"] == "application/problem+json"
    ok = httpx.get(base, headers={"Accept": "image/*"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert ok.headers["x-tiles"] == "1" and ok.headers["x-grid"] == "1,1" and ok.headers["x-tile-shape"] == "6,3"
    with SynapseClient(server.url) as client, pytest.raises(NotAcceptableError):
        client.request("GET", f"/v1/synapses/{syn.name}/filters.png", retry=False, headers={"Accept": "text/csv"})


def test_a_picture_too_large_is_refused_before_it_is_drawn(server):
    with SynapseClient(server.url) as client:
        syn = client.create(_unique("huge"), kind=DENSE, config={"shape": [2048, 1024]})
        with pytest.raises(UnprocessableEntityError, match="pixels"):
            syn.plot_filters(tile=(32, 64), scale=64)


# --- statistics and history ---

def _numpy_stats(values: np.ndarray) -> dict[str, float]:
    flat = values.astype(np.float64).ravel()
    return {"mean": flat.mean(), "std": flat.std(), "min": flat.min(), "max": flat.max(),
            "norm": np.linalg.norm(flat), "abs_mean": np.abs(flat).mean(), "sparsity": np.mean(flat == 0)}


@pytest.mark.parametrize("kind, config, pre, post", [
    (DECONV, {"shape": [3, 3, 2, 4], "x_shape": [6, 6], "eta": 0.2, "bias": True}, (2, 6, 6, 2), (2, 6, 6, 4)),
    (DENSE, {"shape": [12, 7], "eta": 0.1, "bias": True}, (3, 12), (3, 7)),
])
def test_stats_equal_numpys_on_the_same_weights(client, kind, config, pre, post):
    syn = client.create(_unique("stats"), kind=kind, config=config)
    rng = np.random.default_rng(5)
    for _ in range(2):
        syn.evolve(rng.random(pre, np.float32), rng.random(post, np.float32))
    stats = syn.stats()
    assert stats["version"] == syn.describe()["version"] and stats["counters"]["evolve"] == 2
    weights, update, biases = syn.get("weights"), syn.get("dWeights"), syn.get("biases")
    for name, values in (("weights", weights), ("update", update), ("biases", biases)):
        for field, value in _numpy_stats(values).items():
            assert stats[name][field] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, field)
    filters = np.linalg.norm(weights.astype(np.float64).reshape(-1, weights.shape[-1]), axis=0)
    np.testing.assert_allclose(stats["weights"]["filter_norms"], filters, rtol=1e-12)


def test_history_follows_each_learning_call_and_is_bounded(client):
    syn = client.create(_unique("hist"), kind=DENSE, config={"shape": [9, 4], "eta": 0.3})
    rng = np.random.default_rng(11)
    seen = []
    syn.forward(rng.random((2, 9), np.float32))  # not a learning call: no entry
    assert syn.history() == []
    for _ in range(HISTORY + 3):
        answer = syn.evolve(rng.random((2, 9), np.float32), rng.random((2, 4), np.float32),
                            returns=("weights", "dWeights"))
        seen.append(answer)
    entries = syn.history()
    assert len(entries) == HISTORY and syn.describe()["history_length"] == HISTORY
    assert [e["version"] for e in entries] == [a["version"] for a in seen[-HISTORY:]]
    assert [e["steps"] for e in entries] == list(range(4, HISTORY + 4))
    for entry, answer in zip(entries, seen[-HISTORY:]):
        want = _numpy_stats(answer["weights"])
        for field in ("mean", "std", "min", "max", "norm", "sparsity"):
            assert entry[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field
        assert entry["update_norm"] == pytest.approx(np.linalg.norm(answer["dWeights"].astype(np.float64)), rel=1e-5)
    # a sequence of evolves is one entry, after its last step
    xs, ys = rng.random((6, 2, 9), np.float32), rng.random((6, 2, 4), np.float32)
    last = syn.run_sequence("evolve", pre=xs, post=ys, last=True, returns=["weights"])
    newest = syn.history()[-1]
    assert newest["steps"] == HISTORY + 3 + 6 and newest["version"] == last["version"]
    assert newest["norm"] == pytest.approx(np.linalg.norm(last["weights"].astype(np.float64)), rel=1e-5)


def test_a_kind_without_learning_has_no_update(client):
    syn = client.create(_unique("plain"), kind="DenseSynapse", config={"shape": [4, 4]})
    stats = syn.stats()
    assert stats["update"] is None and stats["biases"] is None  # no bias by default
    assert syn.history() == []


def test_memory_only_instances_keep_no_history_unless_asked(tmp_path):
    with LiveServer(state_dir=tmp_path, durability="off") as live, SynapseClient(live.url) as client:
        syn = client.create("fast", kind=DENSE, config={"shape": [4, 2]})
        syn.evolve(np.ones((1, 4), np.float32), np.ones((1, 2), np.float32))
        assert syn.describe()["history_length"] == 0 and syn.history() == []
        kept = client.create("kept", kind=DENSE, config={"shape": [4, 2]}, durability="interval")
        kept.evolve(np.ones((1, 4), np.float32), np.ones((1, 2), np.float32))
        assert len(kept.history()) == 1
    with SynapseClient("local") as local:  # memory-only because no directory was named: kept, as a server keeps it
        syn = local.create("in-process", kind=DENSE, config={"shape": [4, 2]})
        syn.evolve(np.ones((1, 4), np.float32), np.ones((1, 2), np.float32))
        assert len(syn.history()) == 1


# --- what runs now ---

def test_the_description_says_what_runs_and_since_when(server):
    with SynapseClient(server.url) as client:
        syn = client.create(_unique("long"), kind=DECONV, config={"shape": [5, 5, 4, 8], "x_shape": [48, 48]})
        steps = 400
        xs = np.random.default_rng(0).random((steps, 4, 48, 48, 4), np.float32)
        ys = np.random.default_rng(1).random((steps, 4, 48, 48, 8), np.float32)
        syn.run_sequence("evolve", pre=xs[:2], post=ys[:2], last=True)  # compiled before it is timed
        done = threading.Event()
        runner = threading.Thread(target=lambda: (syn.run_sequence("evolve", pre=xs, post=ys, last=True),
                                                  done.set()))
        started = time.time()
        runner.start()
        running = None
        with SynapseClient(server.url) as watcher:
            while not done.is_set() and (running is None or running["operation"] != "evolve"):
                running = watcher.get(syn.name).describe()["running"]  # (or the background flush's "store")
                listed = [d for d in watcher.list() if d["name"] == syn.name]
                time.sleep(0.005)
        runner.join(120)
        assert running is not None and running["operation"] == "evolve", \
            "the sequence ended before a description saw it (make it longer)"
        assert running["operation"] == "evolve" and running["steps"] == steps
        assert started - 1 <= running["since"] <= time.time()
        assert listed and "running" in listed[0]
        deadline = time.monotonic() + 30  # idle once the background flush has stored the sequence's state
        while (running := syn.describe()["running"]) is not None and time.monotonic() < deadline:
            assert running["operation"] == "store", running
            time.sleep(0.01)
        assert running is None


# --- progress ---

def test_progress_shows_and_changes_no_number(client, tmp_path, capsys):
    rng = np.random.default_rng(2)
    config = {"shape": [8, 3], "eta": 0.1}
    plain, shown = (client.create(_unique(n), kind=DENSE, config=config, seed=4) for n in ("plain", "shown"))
    xs, ys = rng.random((45, 2, 8), np.float32), rng.random((45, 2, 3), np.float32)
    for every in (None, 5):
        want = plain.run_sequence("evolve", pre=xs, post=ys, every=every, returns=["weights"])
        got = shown.run_sequence("evolve", pre=xs, post=ys, every=every, returns=["weights"], progress=True)
        np.testing.assert_array_equal(got["weights"], want["weights"])
        assert got["weights"].shape == (45 // (every or 1), 8, 3)
    want = plain.run_sequence("forward", inputs=xs, last=True)
    got = shown.run_sequence("forward", inputs=xs, last=True, progress=True)
    np.testing.assert_array_equal(got["outputs"], want["outputs"])
    assert shown.describe()["counters"]["evolve"] == 90
    weights = rng.random((8, 3), np.float32)
    shown.set("weights", weights, progress=True)
    np.testing.assert_array_equal(shown.get("weights", progress=True), weights)
    path = shown.export(tmp_path / "shown.safetensors", progress=True)
    copy = client.import_(path, name=_unique("copy"), progress=True)
    np.testing.assert_array_equal(copy.get("weights"), weights)
    err = capsys.readouterr().err
    for title in ("evolve", "forward", "weights", "export", "import"):
        assert title in err, title


def test_the_async_client_shows_progress_too(server, tmp_path, capsys):
    import asyncio

    from synapse_client import AsyncSynapseClient

    async def run() -> None:
        async with AsyncSynapseClient(server.url) as client:
            syn = await client.create(_unique("async"), kind=DENSE, config={"shape": [8, 3]})
            weights = np.random.default_rng(9).random((8, 3), np.float32)
            await syn.set("weights", weights, progress=True)
            np.testing.assert_array_equal(await syn.get("weights", progress=True), weights)
            path = await syn.export(tmp_path / "async.safetensors", progress=True)
            copy = await client.import_(path, name=_unique("async-copy"), progress=True)
            np.testing.assert_array_equal(await copy.get("weights"), weights)
            xs = np.random.default_rng(1).random((7, 2, 8), np.float32)
            shown = await syn.run_sequence("forward", inputs=xs, progress=True)
            plain = await syn.run_sequence("forward", inputs=xs)
            np.testing.assert_array_equal(shown["outputs"], plain["outputs"])
            picture = await syn.plot_filters()
            assert image(picture).shape[2] == 3 and (await syn.stats())["weights"]["size"] == 24
            assert await syn.history() == []

    asyncio.run(run())
    err = capsys.readouterr().err
    for title in ("weights", "export", "import", "forward"):
        assert title in err, title


def test_without_tqdm_progress_is_a_line_on_stderr(server, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with SynapseClient(server.url) as client:
        syn = client.create(_unique("plain-bar"), kind=DENSE, config={"shape": [8, 3]})
        syn.set("weights", np.ones((8, 3), np.float32), progress=True)
        assert syn.get("weights", progress=True).sum() == 24
    err = capsys.readouterr().err
    assert "100%" in err and "weights" in err
