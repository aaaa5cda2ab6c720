"""A learned synapse moves between the service and a real ngclearn 3.2.3 with nothing lost, both ways.

The service learns for a while; ``to_ngclearn`` writes both layouts; ngclearn (its own Python
3.12 environment, ``.bench/ngclearn-venv``, created on first use as the benchmarks do) loads each
with the export's own loader and runs more steps, which must equal the service's same steps —
bit for bit, except where the notes say (the deconvolution's adam is optax's: within 1e-6; a
deconvolution's bias is learned per pixel by ngclearn: its weights only). Back again:
``from_ngclearn`` rebuilds every compartment exactly, reads ngclearn's own saves, and refuses
what it must (pickles unless asked, object arrays, absurd shapes).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synapse_client import SynapseClient, UnprocessableEntityError
from synapse_client._ngclearn import NgclearnFileError

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("ngclearn_driver.py")
STEPS = 3
CASES = {
    "dense-sgd-bias-mask": ("HebbianSynapse", {"shape": [5, 3], "eta": 0.05, "bias": True, "p_conn": 0.6,
                                               "sign_value": -1.0, "batch_size": 2}),
    "dense-adam-bias-l2": ("HebbianSynapse", {"shape": [5, 3], "eta": 0.05, "bias": True, "optim_type": "adam",
                                              "prior": ["l2", 0.01], "g_conduct_factor": 0.5, "batch_size": 2}),
    "dense-adam": ("HebbianSynapse", {"shape": [4, 6], "eta": 0.05, "optim_type": "adam", "w_bound": 0.0,
                                      "batch_size": 2}),
    "dense-nag-bias-l1l2": ("HebbianSynapse", {"shape": [5, 3], "eta": 0.05, "bias": True, "optim_type": "nag",
                                               "prior": ["l1l2", [0.01, 0.3]], "pre_wght": 0.5, "batch_size": 2}),
    "dense-nag": ("HebbianSynapse", {"shape": [7, 2], "eta": 0.05, "optim_type": "nag", "post_wght": 2.0,
                                     "batch_size": 2}),
    "dense-sgd-nonneg": ("HebbianSynapse", {"shape": [5, 3], "eta": 0.05, "w_bound": 2.0, "is_nonnegative": True,
                                            "batch_size": 2}),
    "deconv-sgd": ("HebbianDeconvSynapse", {"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.05}),
    "deconv-adam-decay": ("HebbianDeconvSynapse", {"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.05,
                                                   "optim_type": "adam", "w_decay": 0.01}),
    "deconv-nag-s2-valid": ("HebbianDeconvSynapse", {"shape": [3, 3, 2, 2], "x_shape": [5, 5], "stride": 2,
                                                     "padding": "VALID", "eta": 0.05, "optim_type": "nag",
                                                     "batch_size": 2, "sign_value": -1.0}),
    "deconv-sgd-bias": ("HebbianDeconvSynapse", {"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.05,
                                                 "bias": True}),
}


@pytest.fixture(scope="module")
def ngclearn_python() -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from harness import ngclearn_python as find
    finally:
        sys.path.pop(0)
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if not (os.environ.get("NGCLEARN_PYTHON") or (ROOT / ".bench" / "ngclearn-venv" / "bin" / "python").exists()
            or list(versions.glob("3.12.*/bin/python")) or shutil.which("python3.12")):
        pytest.skip("NO PYTHON 3.12 FOUND: the ngclearn 3.2.3 interop tests cannot run here (install Python 3.12, "
                    "or set NGCLEARN_PYTHON to one with ngclearn 3.2.3)")
    return find()


def drive(python: Path, jobs: list[dict], tmp: Path) -> dict[str, dict]:
    path = tmp / "jobs.json"
    path.write_text(json.dumps(jobs))
    proc = subprocess.run([str(python), str(DRIVER), str(path)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = {d["tag"]: d for d in json.loads(proc.stdout.strip().splitlines()[-1])}
    failed = {tag: d["error"] for tag, d in done.items() if not d["ok"]}
    assert not failed, failed
    return done


def signals(kind: str, config: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = config.get("batch_size", 1)
    if kind == "HebbianSynapse":
        n_in, n_out = config["shape"]
        return rng.normal(size=(batch, n_in)).astype(np.float32), rng.normal(size=(batch, n_out)).astype(np.float32)
    kh, kw, c_in, c_out = config["shape"]
    h, w = config["x_shape"]
    s = config.get("stride", 1)
    ho, wo = (h * s, w * s) if config.get("padding", "SAME") == "SAME" else ((h - 1) * s + kh, (w - 1) * s + kw)
    return (rng.normal(size=(batch, h, w, c_in)).astype(np.float32),
            rng.normal(size=(batch, ho, wo, c_out)).astype(np.float32))


def learned(client: SynapseClient, name: str, kind: str, config: dict):
    """An instance that has learned two steps (so every optimizer moment is non-zero)."""
    syn = client.create(name, kind=kind, config=config, seed=11)
    for step in range(2):
        pre, post = signals(kind, config, 100 + step)
        syn.forward(pre)
        syn.evolve(pre, post)
    return syn


def compartments(syn) -> dict[str, np.ndarray]:
    return {name: syn.get(name) for name in syn.describe()["compartments"]}


def test_exports_continue_in_ngclearn_as_in_the_service(ngclearn_python, tmp_path):
    jobs, expected = [], {}
    with SynapseClient("local") as client:
        for tag, (kind, config) in CASES.items():
            syn = learned(client, tag, kind, config)
            component = syn.to_ngclearn(tmp_path / tag / "component")
            syn.to_ngclearn(tmp_path / tag / "model", layout="model")
            steps = {"count": np.asarray(STEPS)}
            after = []
            for t in range(STEPS):
                pre, post = signals(kind, config, 200 + t)
                x, _ = signals(kind, config, 300 + t)
                steps.update({f"pre{t}": pre, f"post{t}": post, f"x{t}": x})
                syn.evolve(pre, post)
                after.append({"weights": syn.weights, "outputs": syn.forward(x), "dWeights": syn.get("dWeights"),
                              "biases": syn.get("biases")})
            np.savez(tmp_path / tag / "steps.npz", **steps)
            expected[tag] = after
            for layout in ("component", "model"):
                jobs.append({"do": "continue", "tag": f"{tag}-{layout}", "layout": layout, "folder": str(
                    component if layout == "component" else tmp_path / tag / "model" / tag),
                    "directory": str(tmp_path / tag / "model"), "model": tag,
                    "steps": str(tmp_path / tag / "steps.npz"), "out": str(tmp_path / tag / f"{layout}.npz")})
    drive(ngclearn_python, jobs, tmp_path)
    for tag, (kind, config) in CASES.items():
        for layout in ("component", "model"):
            got = np.load(tmp_path / tag / f"{layout}.npz")
            for t, want in enumerate(expected[tag]):
                where = f"{tag} {layout} step {t}"
                if kind == "HebbianDeconvSynapse" and config.get("optim_type") == "adam":  # optax's adam (notes)
                    np.testing.assert_allclose(got[f"weights{t}"], want["weights"], rtol=1e-6, atol=1e-7,
                                               err_msg=where)
                    continue
                assert np.array_equal(got[f"weights{t}"], want["weights"]), where
                assert np.array_equal(got[f"dWeights{t}"], want["dWeights"]), where
                if kind == "HebbianDeconvSynapse" and config.get("bias"):
                    continue  # ngclearn learns this bias per pixel: the weights continue, the bias does not (notes)
                assert np.array_equal(got[f"outputs{t}"], want["outputs"]), where
                if config.get("bias"):
                    assert np.array_equal(got[f"biases{t}"].reshape(-1), want["biases"]), where


def test_the_export_says_where_it_comes_from_and_what_ngclearn_cannot_restore(tmp_path):
    with SynapseClient("local") as client:
        syn = learned(client, "told", *CASES["deconv-sgd-bias"])
        folder = syn.to_ngclearn(tmp_path / "m", layout="model")
        meta = json.loads((folder / "synapse-serve.json").read_text())
        assert meta["provenance"] == syn.describe()["provenance"]
        assert meta["provenance"]["follows"] == "ngclearn 3.2.3" and meta["provenance"]["seed"] == 11
        assert {"service", "jax", "device", "key_schedule", "kind"} <= meta["provenance"].keys()
        notes = " ".join(meta["notes"])
        assert "per pixel" in notes and "Context.load" in notes and "bias initializer" in notes
        roots = json.loads((folder / "component" / "roots.json").read_text())["told"]
        assert roots["modulePath"].endswith("HebbianDeconvSynapse") and roots["args"] == ["told", [2, 2, 1, 2], [4, 4]]
        assert set(roots["kwargs"]) >= {"eta", "w_bound", "sign_value", "optim_type", "batch_size", "padding"}
        with pytest.raises(FileExistsError):
            syn.to_ngclearn(tmp_path / "m", layout="model")  # never over another model
        odd = client.create("odd", kind="HebbianDeconvSynapse", config={"shape": [3, 2, 1, 2], "x_shape": [4, 4]})
        with pytest.raises(NgclearnFileError, match="square kernels"):
            odd.to_ngclearn(tmp_path / "odd")
        normed = client.create("normed", kind="HebbianSynapse", config={"shape": [3, 2], "w_norm": 1.0})
        folder = normed.to_ngclearn(tmp_path / "normed", layout="model")
        notes = " ".join(json.loads((folder / "synapse-serve.json").read_text())["notes"])
        assert "w_norm 1.0 (per out): ngclearn has no such constraint" in notes  # it would drift silently
        assert "w_norm" not in json.loads((folder / "component" / "roots.json").read_text())["normed"]["kwargs"]
        plain = client.create("plain", kind="DenseSynapse", config={"shape": [2, 2]})
        with pytest.raises(NgclearnFileError, match="no ngclearn counterpart"):
            plain.to_ngclearn(tmp_path / "plain")


@pytest.mark.parametrize("tag", list(CASES))
@pytest.mark.parametrize("layout", ["component", "model"])
def test_service_to_ngclearn_files_to_service_is_identical(tag, layout, tmp_path):
    kind, config = CASES[tag]
    with SynapseClient("local") as client:
        syn = learned(client, tag, kind, config)
        folder = syn.to_ngclearn(tmp_path, layout=layout)
        back = client.from_ngclearn(folder, name="back", allow_pickle=True)
        before, after = compartments(syn), compartments(back)
        assert before.keys() == after.keys()
        for name, value in before.items():
            if kind == "HebbianSynapse" and name == "dInputs":
                continue  # not an ngclearn compartment (the notes say so)
            assert value.dtype == after[name].dtype and np.array_equal(value, after[name]), name
        assert back.describe()["config"] == syn.describe()["config"]
        pre, post = signals(kind, config, 7)
        assert np.array_equal(syn.evolve(pre, post, returns=["weights"])["weights"],
                              back.evolve(pre, post, returns=["weights"])["weights"])


def test_without_allow_pickle_the_optimizer_state_starts_fresh_and_says_so(tmp_path):
    with SynapseClient("local") as client:
        syn = learned(client, "adam", *CASES["dense-adam-bias-l2"])
        folder = syn.to_ngclearn(tmp_path)
        with pytest.warns(UserWarning, match="fresh adam state"):
            back = client.from_ngclearn(folder, name="back")
        assert np.array_equal(back.weights, syn.weights)
        assert float(back.get("opt_state/count")) == 0.0 and not back.get("opt_state/mu/0").any()


def test_ngclearns_own_saves_come_in(ngclearn_python, tmp_path):
    jobs = []
    for tag, kind, extra in (("native-dense-adam", "HebbianSynapse", {"shape": [4, 3], "bias": True,
                                                                      "optim_type": "adam"}),
                             ("native-dense-sgd", "HebbianSynapse", {"shape": [4, 3], "bias": False,
                                                                     "optim_type": "sgd"}),
                             ("native-deconv-sgd", "HebbianDeconvSynapse", {"shape": [2, 2, 1, 2],
                                                                            "x_shape": [4, 4], "bias": False,
                                                                            "optim_type": "sgd"})):
        jobs.append({"do": "native", "tag": tag, "kind": kind, "seed": 5, **extra,
                     "component_dir": str(tmp_path / tag / "component"), "model_dir": str(tmp_path / tag),
                     "out": str(tmp_path / tag / "next.npz")})
    drive(ngclearn_python, jobs, tmp_path)
    with SynapseClient("local") as client:
        for job in jobs:
            nxt = np.load(job["out"])
            model = client.from_ngclearn(Path(job["model_dir"]) / "model", name=f"{job['tag']}-m", allow_pickle=True)
            config = {"shape": job["shape"], "eta": 0.05, "optim_type": job["optim_type"],
                      "batch_size": 2 if job["kind"] == "HebbianSynapse" else 1,
                      **({"x_shape": job["x_shape"], "padding": "SAME"} if "x_shape" in job else {}),
                      **({"w_bound": 0.0} if job["kind"] == "HebbianDeconvSynapse" else {})}
            component = client.from_ngclearn(job["component_dir"], name=f"{job['tag']}-c", kind=job["kind"],
                                             config=config, component="syn", allow_pickle=True)
            for syn in (model, component):
                weights = syn.evolve(nxt["pre"], nxt["post"], returns=["weights"])["weights"]
                assert np.array_equal(weights, nxt["weights"]), (job["tag"], syn.name)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch boom-was-here",))


def test_a_hostile_pickle_is_never_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with SynapseClient("local") as client:
        folder = learned(client, "victim", *CASES["dense-adam"]).to_ngclearn(tmp_path / "x")
        (folder / "victim_opt_params.pkl").write_bytes(pickle.dumps(_Boom()))
        with pytest.warns(UserWarning, match="fresh adam state"):
            client.from_ngclearn(folder, name="safe")  # not opted in: the pickle is not opened
        with pytest.raises(NgclearnFileError, match="refusing to load posix.system"):
            client.from_ngclearn(folder, name="refused", allow_pickle=True)
        assert not (tmp_path / "boom-was-here").exists()
        assert sorted(s["name"] for s in client.list()) == ["safe", "victim"]  # nothing half-made


def npy(shape: tuple, data: bytes, descr: str = "<f4") -> bytes:
    """An .npy member declaring ``shape`` whatever ``data`` holds (as a hostile file would)."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


@pytest.mark.parametrize(("hostile", "error", "message"), [
    ("object", NgclearnFileError, "weights: an object array"),
    ("huge", NgclearnFileError, "over 268435456 elements"),
    # a red-team run: numpy's bare ValueError for a shape no array can have, "over … elements" for a negative one
    ("empty-huge", NgclearnFileError, r"weights: shape \(10{30}, 0\) is not an array's"),
    ("negative", NgclearnFileError, r"weights: shape \(-1, -1\) is not an array's"),
    ("truncated", NgclearnFileError, "truncated or altered"),
    ("wrong-shape", UnprocessableEntityError, "inputs"),
    ("not-npz", NgclearnFileError, "not an npz"),
    # these raised zipfile's BadZipFile and zlib.error (not even a ValueError)
    ("bad-checksum", NgclearnFileError, "weights: does not read back .BadZipFile: Bad CRC-32"),
    ("bad-deflate", NgclearnFileError, "weights: does not read back"),
    # these were truncated or wrapped to [0, 7] in silence, or a raw numpy ValueError
    ("float-key", NgclearnFileError, "key: a PRNG key is two uint32 values, the save has 2 of float32"),
    ("wide-key", NgclearnFileError, "key: a PRNG key is two uint32 values, the save has 2 of int64 out of range"),
    ("three-key", NgclearnFileError, "key: a PRNG key is two uint32 values, the save has 3 of uint32"),
])
def test_a_hostile_npz_is_a_clear_error_and_leaves_nothing(tmp_path, hostile, error, message):
    import zipfile

    with SynapseClient("local") as client:
        folder = learned(client, "source", *CASES["dense-sgd-nonneg"]).to_ngclearn(tmp_path / "x")
        npz = folder / "source.npz"
        arrays = dict(np.load(npz))
        if hostile == "wrong-shape":
            arrays["inputs"] = np.ones((2, 9), np.float32)
            np.savez(npz, **arrays)
        elif hostile == "not-npz":
            npz.write_bytes(b"definitely not a zip file")
        elif hostile.endswith("-key"):
            arrays["key"] = {"float-key": np.array([0.9, 7.9], np.float32),
                             "wide-key": np.array([2**32, 2**33 + 7], np.int64),
                             "three-key": np.array([1, 2, 3], np.uint32)}[hostile]
            np.savez(npz, **arrays)
        elif hostile == "bad-checksum":
            np.savez(npz, **{**arrays, "weights": np.full((5, 3), 0.25, np.float32)})
            blob = bytearray(npz.read_bytes())
            at = blob.index(np.float32(0.25).tobytes() * 15)
            blob[at + 7] ^= 0xFF  # one byte of the stored data: its CRC no longer matches
            npz.write_bytes(bytes(blob))
        elif hostile == "bad-deflate":
            with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as archive:
                for name, value in arrays.items():
                    archive.writestr(f"{name}.npy", npy(value.shape, value.tobytes(), value.dtype.str))
            info = zipfile.ZipFile(npz).getinfo("weights.npy")
            blob = bytearray(npz.read_bytes())
            start = info.header_offset + 30 + len(info.filename) + len(info.extra)
            blob[start + 2:start + 12] = b"\xff" * 10  # the compressed stream, damaged
            npz.write_bytes(bytes(blob))
        else:
            crafted = {"object": npy((2,), b"\x00" * 16, "|O"), "huge": npy((99999999, 99999), b"\x00" * 60),
                       "truncated": npy((5, 3), b"\x00" * 20), "empty-huge": npy((10 ** 30, 0), b""),
                       "negative": npy((-1, -1), b"")}[hostile]
            with zipfile.ZipFile(npz, "w") as archive:
                for name, value in arrays.items():
                    archive.writestr(f"{name}.npy", crafted if name == "weights" else npy(value.shape, value.tobytes(),
                                                                                            value.dtype.str))
        with pytest.raises(error, match=message):
            client.from_ngclearn(folder, name="hostile", allow_pickle=True)
        assert [s["name"] for s in client.list()] == ["source"]


def test_members_an_import_does_not_use_are_never_read(tmp_path):
    """A 2 MB npz of extra members made the reader hold 4.3 GB (each member read in full, with no total); only the
    compartments an import uses are read now (a member claiming 10^13 elements is skipped, not refused)."""
    import zipfile

    with SynapseClient("local") as client:
        source = learned(client, "source", *CASES["dense-sgd-nonneg"])
        folder = source.to_ngclearn(tmp_path / "x")
        with zipfile.ZipFile(folder / "source.npz", "a") as archive:
            archive.writestr("junk.npy", npy((99999999, 99999), b"\x00" * 60))
        back = client.from_ngclearn(folder, name="back", allow_pickle=True)
        assert np.array_equal(back.weights, source.weights)


def test_a_broadcasting_ngclearn_mask_is_kept_as_ngclearn_applies_it(tmp_path):
    """ngclearn multiplies the weights by its mask as numpy broadcasts; a (1, n_out) mask (a pruned output) was
    dropped in silence and the next steps differed by up to 0.2. It is the full mask now; a mask that does not
    broadcast is refused."""
    kind, config = CASES["dense-sgd-nonneg"]
    with SynapseClient("local") as client:
        folder = learned(client, "source", kind, config).to_ngclearn(tmp_path / "x")
        npz = folder / "source.npz"
        arrays = dict(np.load(npz))
        arrays["mask"] = np.array([[1.0, 0.0, 1.0]], np.float32)
        np.savez(npz, **arrays)
        back = client.from_ngclearn(folder, name="back", allow_pickle=True)
        full = np.broadcast_to(arrays["mask"], (5, 3))
        assert np.array_equal(back.get("mask"), full)
        x = np.random.default_rng(3).normal(size=(2, 5)).astype(np.float32)
        np.testing.assert_allclose(back.forward(x), x @ (arrays["weights"] * full), rtol=1e-6)
        arrays["mask"] = np.ones((2, 2), np.float32)
        np.savez(npz, **arrays)
        with pytest.raises(NgclearnFileError, match=r"mask of shape \(2, 2\) does not broadcast"):
            client.from_ngclearn(folder, name="refused", allow_pickle=True)


def test_a_component_named_by_a_file_never_leads_outside_the_save(tmp_path):
    """roots.json named a component by an absolute path (or ../): the client read that npz from anywhere on disk
    and would have sent it as the new instance's weights."""
    with SynapseClient("local") as client:
        elsewhere = learned(client, "secret", *CASES["dense-sgd-nonneg"]).to_ngclearn(tmp_path / "elsewhere")
        model = learned(client, "model", *CASES["dense-sgd-nonneg"]).to_ngclearn(tmp_path / "m", layout="model")
        roots_path = model / "component" / "roots.json"
        roots = json.loads(roots_path.read_text())
        entry = roots.pop("model")
        for hostile in (str(elsewhere / "secret"), "../../../elsewhere/secret"):
            roots_path.write_text(json.dumps({hostile: entry}))
            with pytest.raises(NgclearnFileError, match="is not a file name of the save"):
                client.from_ngclearn(model, name="stolen", allow_pickle=True)
        with pytest.raises(NgclearnFileError, match="is not a file name of the save"):
            client.from_ngclearn(model, name="stolen", component="../x")
        roots_path.write_text(json.dumps({"model": entry}))
        npz = model / "component" / "custom" / "model.npz"
        npz.unlink()
        npz.symlink_to(elsewhere / "secret.npz")  # a link out of the save
        with pytest.raises(NgclearnFileError, match="leads outside the save folder"):
            client.from_ngclearn(model, name="stolen", allow_pickle=True)
        assert sorted(s["name"] for s in client.list()) == ["model", "secret"]


@pytest.mark.parametrize(("file", "content", "message"), [
    ("synapse-serve.json", "{not json", "not the export's metadata"),
    ("synapse-serve.json", "[1, 2]", "not a synapse-serve export's metadata"),
    ("synapse-serve.json", '{"config": {}, "seed": 1}', "not a synapse-serve export's metadata"),
    ("component/roots.json", "{not json", "not the model's roots.json"),
    ("component/roots.json", "[1, 2]", "not a model's roots.json"),
    ("component/roots.json", None, "a component's args are a list and its kwargs a map"),
    ("component/roots.json", "", "no such file"),
])
def test_metadata_that_is_not_what_it_says_is_a_clear_error(tmp_path, file, content, message):
    """These raised JSONDecodeError, TypeError, KeyError, AttributeError or FileNotFoundError."""
    with SynapseClient("local") as client:
        folder = learned(client, "model", *CASES["dense-sgd-nonneg"]).to_ngclearn(tmp_path, layout="model")
        (folder / "synapse-serve.json").unlink()  # ngclearn's own model folder: roots.json says what it is
        target = folder / file
        if content is None:
            roots = json.loads(target.read_text())
            roots["model"]["kwargs"] = [["eta", 0.1]]
            content = json.dumps(roots)
        if file == "synapse-serve.json" or content:
            target.write_text(content)
        else:
            target.unlink()
        with pytest.raises(NgclearnFileError, match=re.escape(message)):
            client.from_ngclearn(folder, name="refused", allow_pickle=True)


def _finishes(call, seconds: float = 60.0):
    """``call()``'s exception (or None), failing the test if it has not returned within ``seconds``."""
    import threading

    outcome: list = []

    def run():
        try:
            call()
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def test_special_files_and_hostile_optimizer_states_are_refused_at_once(tmp_path):
    """A FIFO in the npz's place hung the import for ever, and an 815-byte pickle sharing one list many times over
    (10^30 leaves, numpy arrays only) hung it while memory grew."""
    with SynapseClient("local") as client:
        folder = learned(client, "victim", *CASES["dense-adam"]).to_ngclearn(tmp_path / "x")
        pkl = folder / "victim_opt_params.pkl"
        honest = pkl.read_bytes()
        shared: list = [np.zeros(1, np.float32)]
        for _ in range(30):
            shared = [shared] * 10
        pkl.write_bytes(pickle.dumps((shared, shared, np.float32(1.0)), protocol=4))
        assert len(pkl.read_bytes()) < 4096
        refused = _finishes(lambda: client.from_ngclearn(folder, name="laughs", allow_pickle=True))
        assert isinstance(refused, NgclearnFileError) and "not an optimizer state" in str(refused)
        pkl.write_bytes(honest)
        npz = folder / "victim.npz"
        npz.unlink()
        os.mkfifo(npz)
        refused = _finishes(lambda: client.from_ngclearn(folder, name="fifo", allow_pickle=True))
        assert isinstance(refused, NgclearnFileError) and "is not a regular file" in str(refused)
        assert [s["name"] for s in client.list()] == ["victim"]
