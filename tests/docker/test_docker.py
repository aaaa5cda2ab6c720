"""The docker files, checked without a docker engine (none runs on CI)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json"  # vendored: see SOURCE.md beside it


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_compose_is_valid_against_the_compose_spec(compose):
    if not SCHEMA.exists():
        pytest.fail(f"compose schema missing at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text())  # draft-07; its $schema URL lacks the "#" jsonschema looks up
    jsonschema.Draft7Validator(schema).validate(compose)
    broken = {**compose, "services": {"x": {"ports": 5}}}
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.Draft7Validator(schema).validate(broken)


def test_compose_reserves_a_gpu_has_a_healthcheck_and_a_volume(compose):
    service = compose["services"]["synapse-serve"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "/healthz" in " ".join(service["healthcheck"]["test"])
    state_dir = service["environment"]["SYNAPSE_STATE_DIR"]
    assert any(v.endswith(f":{state_dir}") for v in service["volumes"])
    assert service["volumes"][0].split(":")[0] in compose["volumes"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu"


def test_compose_ships_with_auth_on(compose):
    service = compose["services"]["synapse-serve"]
    assert service["environment"]["SYNAPSE_AUTH"] == "on"
    assert service["environment"]["SYNAPSE_TOKENS_FILE"] == "/run/secrets/synapse_tokens"
    assert "synapse_tokens" in service["secrets"] and "synapse_tokens" in compose["secrets"]


@pytest.mark.parametrize(("name", "extra"), [("Dockerfile.cpu", "server"), ("Dockerfile.gpu", "gpu"),
                                             ("Dockerfile.ray", "gpu,ray")])
def test_dockerfiles_install_the_right_extra_as_non_root(name, extra):
    text = (ROOT / "docker" / name).read_text()
    assert re.search(rf'pip install "\.\[{extra}\]"', text)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    if name != "Dockerfile.ray":  # one image for head, workers and front: compose checks each service's health
        assert "HEALTHCHECK" in text and "/healthz" in text
    assert re.search(r"^VOLUME .*synapse-serve", text, re.M)
    assert re.search(r"^CMD \[\"synapse-serve\"\]", text, re.M)


def test_the_ray_compose_file_is_valid_keeps_ray_inside_and_needs_tokens():
    schema = json.loads(SCHEMA.read_text())
    compose = yaml.safe_load((ROOT / "docker" / "compose.ray.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "synapse-serve"}
    for name, service in services.items():
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name  # Ray's own auth on every node
        assert "ray_token" in service["secrets"], name
        assert service["volumes"][0].split(":")[0] in compose["volumes"], name  # the shared state
        if name != "synapse-serve":
            assert "ports" not in service, f"{name} publishes Ray's ports"
    front = services["synapse-serve"]
    assert front["ports"] == ["127.0.0.1:8000:8000"]
    assert front["environment"]["SYNAPSE_BACKEND"] == "ray" and front["environment"]["SYNAPSE_AUTH"] == "on"
    assert "deploy" not in front  # the front needs no GPU
    gpus = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["driver"] == "nvidia" and gpus["capabilities"] == ["gpu"]
    assert set(compose["secrets"]) == {"synapse_tokens", "ray_token"}


def test_extras_exist_in_pyproject():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "jax[cuda12]" in " ".join(extras["gpu"]) and "fastapi" in " ".join(extras["server"])


def test_the_tokens_file_is_never_committed():
    """docker/synapse-tokens holds secrets (the README puts them there): git must ignore it."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("docker/synapse-tokens", "docker/ray-token", "lab.tokens"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=30)
        assert result.returncode == 0, f"{path} is not ignored by git"
