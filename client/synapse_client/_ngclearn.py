"""ngclearn 3.2.3 files out and in, in the client: numpy, json and pickle only (no JAX, no ngclearn).

Out (``Synapse.to_ngclearn``): the instance's own export (one safetensors file, read atomically)
becomes the files ngclearn reads — the component layout (``<name>.npz`` plus
``<name>_opt_params.pkl``, for ``syn.load(dir)``) or the model layout (``Context.load(dir, model)``:
``contextData.json``, ``connections.json``, ``component/roots.json``, ``component/custom/…``) — with
``synapse-serve.json`` (provenance, the constructor arguments, notes) and ``load_in_ngclearn.py``,
which builds the component the way that restores everything ngclearn can restore. The mapping
of every compartment and of each optimizer's state is docs/ngclearn.md's.

In (``SynapseClient.from_ngclearn``): an ngclearn save (either layout, ours or ngclearn's own)
becomes the arrays and config of a new instance. The ``.npz`` is read with ``allow_pickle=False``
after every array's header is checked (dtype, shape, size); the ``_opt_params.pkl`` is read only
when the caller opts in, and then by an unpickler that admits numpy arrays (and JAX arrays, rebuilt
as numpy) and nothing else. The server never sees a pickle.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from synapse_client._codec import numpy_dtype

NGCLEARN_VERSION = "3.2.3"
DENSE_PATH = "ngclearn.components.synapses.hebbian.hebbianSynapse.HebbianSynapse"
DECONV_PATH = "ngclearn.components.synapses.convolution.hebbianDeconvSynapse.HebbianDeconvSynapse"
KINDS = {"HebbianSynapse": DENSE_PATH, "HebbianDeconvSynapse": DECONV_PATH}
META = "synapse-serve.json"
LOADER = "load_in_ngclearn.py"
MAX_ELEMENTS = 1 << 28  # an array in an npz may declare at most this many elements (the server's default limit)
F32 = np.float32
_ST = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I32": "int32", "I64": "int64",
       "U32": "uint32", "U8": "uint8", "BOOL": "bool"}


class NgclearnFileError(ValueError):
    """An ngclearn file that cannot be read safely or does not describe a synapse the service can hold."""


# --- our export (safetensors) ---


def read_export(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The record (kind, config, seed, …, provenance) and the compartments of an instance file."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    record = json.loads(header.pop("__metadata__")["record"])
    data = memoryview(blob)[8 + length:]
    arrays = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        arrays[name] = np.frombuffer(data[begin:end], dtype=numpy_dtype(_ST[entry["dtype"]])).reshape(
            entry["shape"]).copy()
    return record, arrays


# --- service -> ngclearn ---


def constructor(kind: str, name: str, config: dict[str, Any]) -> dict[str, Any]:
    """ngclearn's constructor call for ``config`` as a roots.json entry: every hyperparameter written out
    (ngclearn's JSON keeps only what is passed), none it would choke on (the dense kind's ``w_decay``)."""
    if kind == "HebbianSynapse":
        prior_kind, lam = config["prior"]
        kwargs = {"eta": config["eta"], "w_bound": config["w_bound"], "is_nonnegative": config["is_nonnegative"],
                  "prior": [prior_kind, list(lam) if isinstance(lam, (list, tuple)) else lam],
                  "sign_value": config["sign_value"], "optim_type": config["optim_type"],
                  "pre_wght": config["pre_wght"], "post_wght": config["post_wght"],
                  "g_conduct_factor": config["g_conduct_factor"], "batch_size": config["batch_size"]}
        return {"args": [name, list(config["shape"])], "kwargs": kwargs, "modulePath": DENSE_PATH}
    if kind == "HebbianDeconvSynapse":
        kwargs = {"eta": config["eta"], "stride": config["stride"], "padding": config["padding"],
                  "g_conduct_factor": config["g_conduct_factor"], "w_bound": config["w_bound"],
                  "is_nonnegative": config["is_nonnegative"], "w_decay": config["w_decay"],
                  "sign_value": config["sign_value"], "optim_type": config["optim_type"],
                  "batch_size": config["batch_size"]}
        return {"args": [name, list(config["shape"]), list(config["x_shape"])], "kwargs": kwargs,
                "modulePath": DECONV_PATH}
    raise NgclearnFileError(f"{kind} has no ngclearn counterpart with learning state; the Hebbian kinds do "
                            f"({', '.join(KINDS)})")


def refusals(kind: str, config: dict[str, Any]) -> list[str]:
    """What ngclearn 3.2.3 cannot represent at all (the export is refused, saying why)."""
    problems = []
    if kind == "HebbianDeconvSynapse":
        kh, kw = config["shape"][:2]
        if kh != kw or config["x_shape"][0] != config["x_shape"][1]:
            problems.append("ngclearn's deconvolution takes square kernels and square inputs only (it reads "
                            "x_size, x_size = x_shape)")
        if not isinstance(config["padding"], str):
            problems.append("ngclearn takes padding 'SAME' or 'VALID' only (explicit pads break its evolve)")
    if kind == "HebbianSynapse" and config.get("max_delay_steps", 0):
        problems.append("max_delay_steps > 0: ngclearn's delay buffer is not carried")
    return problems


def notes_for(kind: str, config: dict[str, Any], layout: str) -> list[str]:
    """What a user of the files must know: where ngclearn's own loader falls short, and what differs."""
    notes = []
    bias = bool(config.get("bias"))
    optim = config["optim_type"]
    if layout == "model":
        notes.append("Context.load(dir, model) cannot restore from JSON what is not JSON: a bias initializer "
                     "(without it ngclearn's evolve never updates the bias and drops its optimizer moments), "
                     "an elastic-net lambda as a tuple, a deconvolution's adam/nag state. load_in_ngclearn."
                     "load_model(dir, model) loads it and restores those; plain Context.load does not.")
    if bias:
        notes.append("The component is built with a bias initializer so that ngclearn's evolve learns the "
                     "bias (its value is overwritten by the saved biases): use load_in_ngclearn.load_component, "
                     "or build the component with any bias_init and call syn.load(dir).")
    if kind == "HebbianDeconvSynapse":
        if bias:
            notes.append("ngclearn's deconvolution learns its bias per pixel (dBiases keeps the spatial axes): "
                         "after one evolve in ngclearn the bias is no longer the service's per-channel bias. The "
                         "weights continue identically; the bias does not.")
        else:
            notes.append("ngclearn's deconvolution evolve without a bias leaves biases = None, and its next "
                         "forward fails on it: set syn.biases.set(0.0) after each evolve (ngclearn's own defect).")
        if optim in ("adam", "nag"):
            notes.append(f"ngclearn cannot save or load a deconvolution's {optim} state (its npz cannot hold it): "
                         f"it is in {{name}}_opt_params.pkl, which load_in_ngclearn sets after syn.load.")
        if optim == "adam":
            notes.append("The service's deconvolution adam is optax's: in ngclearn the next steps agree within "
                         "float rounding (about 1e-8), not bit for bit.")
        if optim == "sgd":
            notes.append("The service's deconvolution sgd keeps no step count; the files carry 0 (sgd never "
                         "reads it).")
    if config.get("precision", "highest") != "highest":
        notes.append(f"precision {config['precision']!r}: ngclearn computes at its own precision, so its next "
                     "steps differ by rounding.")
    if config.get("filter_update") == "adjoint":
        notes.append("filter_update 'adjoint': ngclearn computes the VJP form; the updates agree to rounding.")
    if config.get("w_norm", 0.0) > 0.0:
        notes.append(f"w_norm {config['w_norm']} (per {config.get('w_norm_per', 'out')}): ngclearn has no such "
                     "constraint; after each evolve there, rescale the filters yourself "
                     "(W / (||W|| + 1e-8) * w_norm), or they drift from the service's.")
    if kind == "HebbianSynapse" and config.get("p_release_mean", 1.0) < 1.0:
        notes.append("p_release_mean < 1: ngclearn 3.2.3's forward fails on it (NameError: nn).")
    notes.append("The service's dInputs has no ngclearn counterpart in the dense kind and is not written."
                 if kind == "HebbianSynapse" else "Every compartment is written.")
    return notes


def _opt_object(arrays: dict[str, np.ndarray], optim: str, bias: bool) -> Any:
    """ngclearn's opt_params from the service's optimizer state: sgd -> t; adam -> ([m_W, m_b], [v_W, v_b], t);
    nag -> ([phi_W, phi_b], t); a tuple outside, lists inside, numpy float32 leaves, the bias entry (1, n)."""
    prefix = "opt_state/0/" if "opt_state/0/count" in arrays else "opt_state/"
    t = np.asarray(arrays.get(prefix + "count", 0.0), F32)
    if optim == "sgd":
        return t

    def entries(name: str) -> list[np.ndarray]:
        out = [np.ascontiguousarray(arrays[f"{prefix}{name}/0"], F32)]
        if bias:
            out.append(np.ascontiguousarray(arrays[f"{prefix}{name}/1"], F32).reshape(1, -1))
        return out

    return (entries("mu"), entries("nu"), t) if optim == "adam" else (entries("phi"), t)


def component_arrays(kind: str, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``<name>.npz`` contents ngclearn's ``load`` sets, from the service's compartments."""
    f = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    bias = f["biases"].size > 0
    key = np.asarray(f["key"], np.uint32).reshape(2)
    if kind == "HebbianSynapse":
        n_in, n_out = f["weights"].shape
        batch = int(config["batch_size"])
        return {"key": key, "inputs": f["inputs"], "outputs": f["outputs"], "weights": f["weights"],
                "mask": f["mask"] if f["mask"].size else np.ones((1, 1), F32),
                "biases": f["biases"].reshape(1, n_out) if bias else np.asarray(0.0, F32),
                "gate": np.ones((batch, n_out), F32), "input_delay_buffer": np.zeros((0, batch, n_in), F32),
                "delayed_inputs": f["inputs"], "pre": f["pre"], "post": f["post"], "dWeights": f["dWeights"],
                "dBiases": f["dBiases"].reshape(1, n_out) if bias else np.zeros((1, n_out), F32)}
    c_out = f["weights"].shape[3]
    out = {"key": key, "inputs": f["inputs"], "outputs": f["outputs"], "weights": f["weights"],
           "biases": f["biases"].reshape(1, c_out) if bias else np.asarray(0.0, F32),
           "dWeights": f["dWeights"], "dInputs": f["dInputs"], "pre": f["pre"], "post": f["post"],
           "dBiases": f["dBiases"].reshape(1, c_out) if bias else np.asarray(0.0, F32)}
    if config["optim_type"] == "sgd":  # the only optimizer state a deconvolution's npz can carry
        out["opt_params"] = _opt_object(f, "sgd", bias)
    return out


def write_ngclearn(directory: Path, layout: str, name: str, record: dict[str, Any], arrays: dict[str, np.ndarray],
                   provenance: dict[str, Any]) -> Path:
    """Write ``layout`` ("component" or "model") under ``directory``; returns the folder ngclearn loads."""
    kind, config = record["kind"], record["config"]
    if layout not in ("component", "model"):
        raise ValueError(f"layout: {layout!r} is not 'component' or 'model'")
    problems = refusals(kind, config)
    entry = constructor(kind, name, config)
    if problems:
        raise NgclearnFileError(f"{name}: ngclearn {NGCLEARN_VERSION} cannot hold this {kind}: " + "; ".join(problems))
    directory = Path(directory)
    folder = directory / name if layout == "model" else directory
    custom = folder / "component" / "custom" if layout == "model" else folder
    if layout == "model" and folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty: ngclearn would load another model from it")
    custom.mkdir(parents=True, exist_ok=True)
    np.savez(custom / f"{name}.npz", **component_arrays(kind, config, arrays))
    optim, bias = config["optim_type"], arrays["biases"].size > 0
    if kind == "HebbianSynapse" or optim != "sgd":  # ngclearn's dense load requires it; ours for deconv adam/nag
        with open(custom / f"{name}_opt_params.pkl", "wb") as file:
            pickle.dump(_opt_object(arrays, optim, bias), file, protocol=4)
    if layout == "model":
        (folder / "contextData.json").write_text(json.dumps({"types": ["component"], "path": name}, indent=2))
        (folder / "connections.json").write_text("{}")
        (folder / "component" / "roots.json").write_text(json.dumps({name: entry}, indent=2))
    meta = {"format": "synapse-serve ngclearn export", "layout": layout, "component": name, "ngclearn": entry,
            "kind": kind, "config": config, "seed": record["seed"], "counters": record["counters"],
            "version": record["version"], "provenance": provenance,
            "notes": [note.replace("{name}", name) for note in notes_for(kind, config, layout)]}
    (folder / META).write_text(json.dumps(meta, indent=2))
    (folder / LOADER).write_text(LOADER_SOURCE)
    return folder


# --- ngclearn -> service ---


# what an import reads of an npz: ngclearn's compartments of the two Hebbian kinds (others are skipped unread)
NPZ_MEMBERS = frozenset({"key", "inputs", "outputs", "weights", "biases", "mask", "pre", "post", "dWeights",
                         "dBiases", "dInputs"})
MAX_TOTAL_BYTES = 1 << 33  # what one save may make this reader hold in all (8 GiB)
MAX_JSON_BYTES = 1 << 24  # a metadata file (roots.json, synapse-serve.json) larger than this is not one


def _regular_file(folder: Path, path: Path, what: str) -> Path:
    """``path`` if it is a regular file inside ``folder`` (a symlink may point elsewhere in it), else
    NgclearnFileError: a device, a FIFO or a file outside the save is never opened."""
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise NgclearnFileError(f"{path.name}: cannot be resolved ({exc})") from None
    if not inside:
        raise NgclearnFileError(f"{path.name} (the {what}) leads outside the save folder {folder}")
    if not path.is_file():
        raise NgclearnFileError(f"{path.name} (the {what}) is not a regular file" if path.exists() else
                                f"{path}: no such file (the save has no {what})")
    return path


def _safe_npz(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of an npz an import uses (``NPZ_MEMBERS``; others are not read), each checked before it is read:
    a numeric dtype (no objects), a sane shape, as many bytes as the shape says, all of them within
    MAX_TOTAL_BYTES. Arrays that are object arrays (ngclearn writes None as one) are listed apart. A member that
    does not decompress or fails its checksum is an NgclearnFileError too."""
    arrays, objects, total = {}, [], 0
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise NgclearnFileError(f"{path.name}: not an npz file ({exc})") from None
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise NgclearnFileError(f"{path.name}: unexpected member {info.filename[:80]!r}")
            name = info.filename[:-4]
            if name not in NPZ_MEMBERS:
                continue  # not read: what ngclearn keeps besides (gate, delay buffers, …) or anything else
            try:
                with archive.open(info) as member:
                    try:
                        version = np.lib.format.read_magic(member)
                        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                        if read_header is None:
                            raise ValueError(f"npy format version {version} (this reader takes 1.0 and 2.0)")
                        shape, fortran, dtype = read_header(member)
                    except ValueError as exc:
                        raise NgclearnFileError(f"{path.name}: {name}: unreadable array header ({exc})") from None
                    if dtype.hasobject:
                        objects.append(name)
                        continue
                    if dtype.kind not in "fiub" or dtype.itemsize > 8:
                        raise NgclearnFileError(f"{path.name}: {name}: dtype {dtype} is not a number type")
                    if len(shape) > 32 or any(d < 0 or d > MAX_ELEMENTS for d in shape):  # numpy's own bounds, and
                        # ours: a (10**30, 0) holds no element and no numpy array can have it
                        raise NgclearnFileError(f"{path.name}: {name}: shape {str(shape)[:80]} is not an array's")
                    count = math.prod(shape)
                    if count > MAX_ELEMENTS:
                        raise NgclearnFileError(f"{path.name}: {name}: shape {shape} is over {MAX_ELEMENTS} elements")
                    total += count * dtype.itemsize
                    if total > MAX_TOTAL_BYTES:
                        raise NgclearnFileError(f"{path.name}: its arrays hold over {MAX_TOTAL_BYTES} bytes in all")
                    header_end = member.tell()
                    if info.file_size - header_end != count * dtype.itemsize:
                        raise NgclearnFileError(f"{path.name}: {name}: {info.file_size - header_end} bytes of data "
                                                f"for shape {shape} of {dtype} (truncated or altered)")
                    data = member.read()
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise NgclearnFileError(f"{path.name}: {name}: does not read back ({type(exc).__name__}: "
                                        f"{str(exc)[:120]})") from None
            array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
            arrays[name] = array if dtype.isnative else array.astype(dtype.newbyteorder("="))  # native byte order
    return arrays, objects


def _rebuild_jax_array(function: Any, arguments: Any, array_state: Any, _aval_state: Any = None) -> np.ndarray:
    array = function(*arguments)  # numpy's own _reconstruct
    array.__setstate__(array_state)
    return array


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and JAX arrays (rebuilt as numpy, without importing JAX); anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("jax._src.array", "_reconstruct_array"):
            return _rebuild_jax_array
        if module in ("numpy._core.multiarray", "numpy.core.multiarray") and name in ("_reconstruct", "scalar"):
            try:
                return getattr(importlib.import_module("numpy._core.multiarray"), name)
            except ImportError:  # numpy 1.x
                return getattr(importlib.import_module("numpy.core.multiarray"), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: an optimizer state holds numpy arrays only")


def read_opt_params(path: Path) -> Any:
    """An ``_opt_params.pkl`` (only when the caller opted in): numpy arrays in tuples and lists, nothing else."""
    try:
        value = _NumpyOnlyUnpickler(io.BytesIO(_regular_file(path.parent, path, "optimizer state").read_bytes())).load()
    except NgclearnFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a hostile file is the file's
        raise NgclearnFileError(f"{path.name}: not an optimizer state this reader accepts ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from None
    for leaf in _leaves(value, path.name):
        if not isinstance(leaf, np.ndarray) or leaf.dtype.kind != "f":
            raise NgclearnFileError(f"{path.name}: an optimizer state holds float arrays only, found "
                                    f"{type(leaf).__name__}")
    return value


MAX_OPT_LEAVES = 64  # ngclearn's optimizer states hold at most five arrays (adam: m and v of W and b, the count)


def _leaves(value: Any, file: str) -> list[Any]:
    """The leaves of nested lists and tuples, at most MAX_OPT_LEAVES of them at most 8 levels deep: a pickle
    that shares one list many times over (a few hundred bytes naming 10^30 leaves) is refused, not walked."""
    leaves: list[Any] = []
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (list, tuple)):
            if depth >= 8 or len(leaves) + len(pending) + len(item) > MAX_OPT_LEAVES:
                raise NgclearnFileError(f"{file}: not an optimizer state (over {MAX_OPT_LEAVES} values or 8 levels)")
            pending.extend((child, depth + 1) for child in reversed(item))
        else:
            leaves.append(np.asarray(item) if isinstance(item, (float, np.floating)) else item)
    return leaves


def _json(folder: Path, path: Path, what: str) -> Any:
    """A metadata file of the save, parsed: a regular file inside it, at most MAX_JSON_BYTES, valid JSON."""
    _regular_file(folder, path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise NgclearnFileError(f"{path.name}: over {MAX_JSON_BYTES} bytes: not the {what}")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise NgclearnFileError(f"{path.name}: not the {what} ({type(exc).__name__}: {str(exc)[:120]})") from None


def _component_name(name: Any, where: str) -> str:
    """A component's name as a file name of the save (``<name>.npz``): never a path to elsewhere."""
    if not isinstance(name, str) or not 0 < len(name) <= 200 or name in (".", "..") \
            or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise NgclearnFileError(f"{where}: component name {str(name)[:80]!r} is not a file name of the save")
    return name


def _our_meta(meta: Any, path: Path) -> dict[str, Any]:
    """synapse-serve.json as an import reads it: kind, config, seed (and the ngclearn entry, if any)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str) or not isinstance(meta.get("config"), dict) \
            or isinstance(meta.get("seed"), bool) or not isinstance(meta.get("seed"), int) \
            or not isinstance(meta.get("ngclearn", {}), dict):
        raise NgclearnFileError(f"{path / META}: not a synapse-serve export's metadata (it names kind, config and "
                                "seed)")
    return meta


def find_save(path: Path, component: str | None) -> tuple[Path, str, dict[str, Any] | None, dict[str, Any] | None]:
    """Where the arrays are (folder, component name), and the constructor entry and our metadata if known."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        path, component = path.parent, component or path.stem
    if not path.is_dir():
        raise NgclearnFileError(f"{path}: no such folder (give an ngclearn save folder, a model folder or an npz)")
    meta = _our_meta(_json(path, path / META, "export's metadata"), path) if (path / META).exists() else None
    if component is not None:
        _component_name(component, "component=")
    if (path / "contextData.json").exists():  # a model folder
        roots = _json(path, path / "component" / "roots.json", "model's roots.json")
        if not isinstance(roots, dict):
            raise NgclearnFileError(f"{path / 'component' / 'roots.json'}: not a model's roots.json (a map of "
                                    "components)")
        hebbian = [n for n, e in roots.items() if isinstance(e, dict) and e.get("modulePath") in KINDS.values()]
        if component is None:
            if len(hebbian) != 1:
                raise NgclearnFileError(f"{path}: name the component (component=...); Hebbian synapses here: "
                                        f"{', '.join(hebbian) or 'none'}")
            component = _component_name(hebbian[0], "roots.json")
        if not isinstance(roots.get(component), dict):
            raise NgclearnFileError(f"{path}: no component {component!r} in roots.json")
        return path / "component" / "custom", component, roots[component], meta
    if component is None:
        names = sorted(p.stem for p in path.glob("*.npz"))
        if len(names) != 1:
            raise NgclearnFileError(f"{path}: name the component (component=...); npz files here: "
                                    f"{', '.join(names) or 'none'}")
        component = names[0]
    return path, component, (meta or {}).get("ngclearn"), meta


def config_from_entry(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The service's kind and config from ngclearn's constructor call (a roots.json entry)."""
    kind = next((k for k, p in KINDS.items() if p == entry.get("modulePath")), None)
    if kind is None:
        raise NgclearnFileError(f"modulePath {str(entry.get('modulePath'))[:120]!r} is not a Hebbian synapse this "
                                f"service holds ({', '.join(KINDS.values())})")
    args, kwargs = entry.get("args") or [], entry.get("kwargs") or {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise NgclearnFileError("roots.json: a component's args are a list and its kwargs a map")
    args, kwargs = list(args), dict(kwargs)
    config: dict[str, Any] = {"shape": kwargs.pop("shape", args[1] if len(args) > 1 else None)}
    if kind == "HebbianDeconvSynapse":
        config["x_shape"] = kwargs.pop("x_shape", args[2] if len(args) > 2 else None)
    if "resist_scale" in kwargs:
        kwargs["g_conduct_factor"] = kwargs.pop("resist_scale")
    for dropped in ("weight_init", "filter_init", "bias_init", "key", "mask", "name"):
        kwargs.pop(dropped, None)  # never in JSON; the arrays say what they would have made
    config.update(kwargs)
    return kind, config


def to_service(kind: str, config: dict[str, Any], arrays: dict[str, np.ndarray], objects: list[str],
               opt: Any | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config (bias and mask settled by the arrays) and the service's compartments of an ngclearn save."""
    for needed in ("weights", "key"):
        if needed in objects:
            raise NgclearnFileError(f"{needed}: an object array (a pickle inside the npz); this reader reads numbers "
                                    "only")
        if needed not in arrays:
            raise NgclearnFileError(f"the save has no {needed!r} array")
    for name in objects:
        if name != "biases":  # ngclearn writes a missing bias as None; anything else is not a number
            raise NgclearnFileError(f"{name}: an object array (a pickle inside the npz); this reader reads numbers "
                                    "only")
    w = arrays["weights"].astype(F32)
    config = dict(config)
    key = arrays["key"]
    if key.size != 2 or key.dtype.kind not in "ui" or key.min() < 0 or key.max() >= 1 << 32:
        raise NgclearnFileError(f"key: a PRNG key is two uint32 values, the save has {key.size} of {key.dtype}"
                                f"{' out of range' if key.size == 2 and key.dtype.kind in 'ui' else ''}")
    out: dict[str, np.ndarray] = {"weights": w, "key": key.astype(np.uint32).reshape(2)}
    b = None if "biases" in objects else arrays.get("biases")
    if kind == "HebbianSynapse":
        if w.ndim != 2:
            raise NgclearnFileError(f"weights of shape {w.shape}: a HebbianSynapse's are (n_in, n_out)")
        n_out = w.shape[1]
        bias = b is not None and b.ndim > 0
        mask = arrays.get("mask")
        if mask is not None:  # ngclearn multiplies by it as numpy broadcasts: a (1, n_out) mask prunes outputs
            try:
                mask = np.broadcast_to(mask.astype(F32), w.shape)
            except ValueError:
                raise NgclearnFileError(f"mask of shape {mask.shape} does not broadcast to the weights' "
                                        f"{w.shape}") from None
        if mask is not None and not np.all(mask == 1):
            out["mask"] = np.array(mask)
            if float(config.get("p_conn", 1.0)) >= 1.0:  # a masked synapse (its density, for the record)
                config["p_conn"] = float(min(max(mask.mean(), 1e-6), 0.999999))
        else:
            config["p_conn"] = 1.0
        signals = ("inputs", "outputs", "pre", "post", "dWeights")
    else:
        if w.ndim != 4:
            raise NgclearnFileError(f"weights of shape {w.shape}: a HebbianDeconvSynapse's are (kh, kw, c_in, c_out)")
        n_out = w.shape[3]
        bias = b is not None and b.ndim > 0
        signals = ("inputs", "outputs", "pre", "post", "dWeights", "dInputs")
    if bias:
        if b.size != n_out:
            raise NgclearnFileError(f"biases of shape {b.shape}: the service's bias is one per output ({n_out}); "
                                    "ngclearn's deconvolution learns a per-pixel bias after its first evolve, which "
                                    "the service cannot hold")
        out["biases"] = b.reshape(n_out).astype(F32)
        db = arrays.get("dBiases")
        if db is not None and db.size == n_out:
            out["dBiases"] = db.reshape(n_out).astype(F32)
    config["bias"] = bias
    for name in signals:
        if name in arrays:
            out[name] = arrays[name].astype(F32)
    if opt is not None:
        out.update(_opt_compartments(kind, config.get("optim_type", "sgd"), opt, n_out, bias))
    return config, out


def _opt_compartments(kind: str, optim: str, opt: Any, n_out: int, bias: bool) -> dict[str, np.ndarray]:
    """The service's optimizer-state compartments from ngclearn's opt_params."""
    def pair(entries: Any) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(entries, (list, tuple)) or len(entries) != (2 if bias else 1):
            raise NgclearnFileError(f"optimizer state: expected {2 if bias else 1} entries (weights"
                                    f"{', biases' if bias else ''}), found {len(entries) if isinstance(entries, (list, tuple)) else entries!r}")
        second = np.asarray(entries[1], F32).reshape(n_out) if bias else np.zeros((0,), F32)
        return np.asarray(entries[0], F32), second

    try:
        if optim == "sgd":
            return {"opt_state/count": np.asarray(opt, F32).reshape(())} if kind == "HebbianSynapse" else {}
        if optim == "adam":
            m, v, t = opt
            if kind == "HebbianDeconvSynapse":  # optax's adam state
                (m0, m1), (v0, v1) = pair(m), pair(v)
                return {"opt_state/0/count": np.asarray(t).astype(np.int32).reshape(()), "opt_state/0/mu/0": m0,
                        "opt_state/0/mu/1": m1, "opt_state/0/nu/0": v0, "opt_state/0/nu/1": v1}
            (m0, m1), (v0, v1) = pair(m), pair(v)
            return {"opt_state/count": np.asarray(t, F32).reshape(()), "opt_state/mu/0": m0, "opt_state/mu/1": m1,
                    "opt_state/nu/0": v0, "opt_state/nu/1": v1}
        if optim == "nag":
            phi, t = opt
            p0, p1 = pair(phi)
            return {"opt_state/count": np.asarray(t, F32).reshape(()), "opt_state/phi/0": p0, "opt_state/phi/1": p1}
    except (TypeError, ValueError) as exc:
        raise NgclearnFileError(f"optimizer state does not fit {optim}: {str(exc)[:200]}") from None
    raise NgclearnFileError(f"optim_type {optim!r} is not sgd, adam or nag")


LOADER_SOURCE = '''"""Load this synapse-serve export into ngclearn 3.2.3 (written by synapse-serve; see synapse-serve.json).

    import sys; sys.path.insert(0, "<this folder>")
    from load_in_ngclearn import load_component, load_model
    ctx, syn = load_component("<this folder>")          # component layout: build it, then syn.load(folder)
    ctx = load_model("<parent folder>", "<model name>")  # model layout: Context.load plus what it cannot restore

Both restore everything ngclearn can hold: the weights, biases, every compartment, the key and the
optimizer state. Add processes with ``with ctx: evo = MethodProcess("evo") >> syn.evolve``.
"""

import json
import os
import pickle
import uuid

import numpy as np
from ngclearn import Context
from ngclearn.utils.distribution_generator import DistributionGenerator

_MODULES = {
    "ngclearn.components.synapses.hebbian.hebbianSynapse.HebbianSynapse":
        "ngclearn.components.synapses.hebbian.hebbianSynapse",
    "ngclearn.components.synapses.convolution.hebbianDeconvSynapse.HebbianDeconvSynapse":
        "ngclearn.components.synapses.convolution.hebbianDeconvSynapse",
}


def _class(module_path):
    import importlib
    return getattr(importlib.import_module(_MODULES[module_path]), module_path.rpartition(".")[2])


def _has_bias(npz):
    with np.load(npz) as arrays:
        return arrays["biases"].ndim > 0


def _constructor(entry, has_bias):
    name, *shapes = entry["args"]
    kwargs = dict(entry["kwargs"])
    if "prior" in kwargs:  # JSON has no tuples; ngclearn's evolve needs a hashable lambda
        kind, lam = kwargs["prior"]
        kwargs["prior"] = (kind, tuple(lam) if isinstance(lam, list) else lam)
    if has_bias:  # any initializer: it turns on bias learning; the saved biases replace its values
        kwargs["bias_init"] = DistributionGenerator.constant(0.0)
    return name, [tuple(s) for s in shapes], kwargs


def _restore_sidecar(syn, folder):
    pkl = os.path.join(folder, syn.name + "_opt_params.pkl")
    if "Deconv" in type(syn).__name__ and os.path.exists(pkl):  # ngclearn cannot load a deconv's adam/nag state
        with open(pkl, "rb") as f:
            syn.opt_params.set(pickle.load(f))


def load_component(folder, context_name=None):
    """(ctx, syn): the component built with the export's hyperparameters, then syn.load(folder)."""
    with open(os.path.join(folder, "synapse-serve.json")) as f:
        meta = json.load(f)
    entry = meta["ngclearn"]
    name, shapes, kwargs = _constructor(entry, _has_bias(os.path.join(folder, entry["args"][0] + ".npz")))
    with Context(context_name or f"{name}_{uuid.uuid4().hex[:8]}") as ctx:
        syn = _class(entry["modulePath"])(name, *shapes, **kwargs)
    syn.load(folder)
    _restore_sidecar(syn, folder)
    return ctx, syn


def load_model(directory, model):
    """Context.load(directory, model), then what it cannot restore from JSON, then a recompile."""
    ctx = Context.load(directory, model)
    custom = os.path.join(directory, model, "component", "custom")
    for syn in ctx.get_objects_by_type("component").values():
        if type(syn).__name__ not in ("HebbianSynapse", "HebbianDeconvSynapse"):
            continue
        if np.ndim(syn.biases.get()) > 0 and syn.bias_init is None:
            syn.bias_init = DistributionGenerator.constant(0.0)
        if isinstance(getattr(syn, "prior_lmbda", None), list):
            syn.prior_lmbda = tuple(syn.prior_lmbda)
        _restore_sidecar(syn, custom)
    ctx.recompile()
    return ctx
'''
