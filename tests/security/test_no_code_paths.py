"""Nothing that reaches the network can run code: no pickle, eval, exec or dynamic imports in shipped code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = re.compile(r"\b(import pickle|from pickle|pickle\.loads?|dill|marshal\.loads?|eval\(|exec\(|"
                       r"__import__\(|import_module\(|allow_pickle=True|yaml\.load\()")


# The client's ngclearn bridge writes ngclearn's pickle files and, only when its caller opts in, reads
# them with an unpickler that admits numpy arrays alone (tests/interop: a hostile pickle is refused);
# it never runs on the server. Everything else shipped stays free of these paths.
NGCLEARN_BRIDGE = Path("client/synapse_client/_ngclearn.py")


def test_shipped_code_has_no_code_execution_paths():
    files = sorted((ROOT / "service").rglob("*.py")) + sorted((ROOT / "client").rglob("*.py"))
    assert len(files) >= 10
    offenders = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files if f.relative_to(ROOT) != NGCLEARN_BRIDGE
                 for i, line in enumerate(f.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert offenders == []


def test_the_ngclearn_bridge_unpickles_only_through_its_numpy_only_unpickler():
    source = (ROOT / NGCLEARN_BRIDGE).read_text()
    bridge = source.split("LOADER_SOURCE = ")[0]  # the loader's text runs in ngclearn's own process, not here
    assert "pickle.load(" not in bridge and "pickle.loads(" not in bridge and "allow_pickle=True" not in bridge
    assert bridge.count(".load()") == 1 and "_NumpyOnlyUnpickler(io.BytesIO(" in bridge
    assert not any(p.is_relative_to("service") for p in [NGCLEARN_BRIDGE])
    assert "_ngclearn" not in "".join(f.read_text() for f in (ROOT / "service").rglob("*.py"))


def test_kinds_come_from_a_fixed_table():
    from synapse_serve.kinds import KINDS, get_kind

    assert all(kind.__module__ == "synapse_serve.kinds.base" for kind in map(type, KINDS.values()))
    for hostile in ("os", "synapse_serve.kinds.deconv", "builtins.eval", "../kinds"):
        try:
            get_kind(hostile)
        except Exception as exc:
            assert "unknown kind" in str(exc)
        else:
            raise AssertionError(hostile)
