"""The client needs only numpy, msgpack and httpx; its public surface is complete."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import synapse_client

BLOCKER = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"jax", "jaxlib", "fastapi", "starlette", "uvicorn", "optax", "pydantic",
                                      "synapse_serve"}:
                raise ImportError(f"blocked: {name}")
    sys.meta_path.insert(0, Block())
    """
)


def test_client_works_with_numpy_msgpack_httpx_only(live_server):
    script = BLOCKER + textwrap.dedent(
        f"""
        import numpy as np
        from synapse_client import SynapseClient
        assert not any(m.split(".")[0] in {{"jax", "fastapi"}} for m in sys.modules)
        with SynapseClient("{live_server.url}") as client:
            syn = client.create("client-only", kind="HebbianDeconvSynapse",
                                config={{"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.1}})
            y = syn.forward(np.ones((1, 4, 4, 1)))
            syn.evolve(np.ones((1, 4, 4, 1)), y)
            assert syn.backtransmit().shape == (1, 4, 4, 1)
            assert syn.weights.shape == (2, 2, 1, 2)
            syn.delete()
        assert not any(m.split(".")[0] in {{"jax", "fastapi"}} for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_client_only_install_says_what_the_server_needs():
    """Item 28: without the server extra, ``synapse-serve`` died with a pydantic traceback."""
    script = BLOCKER.replace('"synapse_serve"}', '"pydantic_settings"}') + textwrap.dedent(
        """
        from synapse_serve.cli import main
        main(["--port", "0"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "pip install 'synapse-serve[server]'" in result.stderr and "Traceback" not in result.stderr


def test_all_is_complete():
    public = {name for name in dir(synapse_client) if not name.startswith("_")} - {"annotations"}
    modules = {name for name in public if type(getattr(synapse_client, name)).__name__ == "module"}
    assert set(synapse_client.__all__) == (public - modules) | {"__version__"}
    for name in synapse_client.__all__:
        assert hasattr(synapse_client, name)


def test_public_functions_have_docstrings():
    from synapse_client import AsyncSynapse, AsyncSynapseClient, Synapse, SynapseClient

    for cls in (SynapseClient, AsyncSynapseClient, Synapse, AsyncSynapse):
        for name, member in vars(cls).items():
            if not name.startswith("_") and callable(member):
                assert member.__doc__, f"{cls.__name__}.{name}"


def test_sync_and_async_twins_mirror_each_other():
    from synapse_client import AsyncSynapse, AsyncSynapseClient, Synapse, SynapseClient

    def public(cls):
        return {n for n in vars(cls) if not n.startswith("_")}

    assert public(SynapseClient) == public(AsyncSynapseClient)
    assert public(Synapse) == public(AsyncSynapse)
