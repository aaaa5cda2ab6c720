"""The README's client example works when pasted (against a live server)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_client_example_runs(live_server):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("http://127.0.0.1:8000", live_server.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(3, 3, 1, 8)" in result.stdout and "'evolve': 10" in result.stdout


def test_readme_dense_example_runs(live_server):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 3, "README lost its dense example"
    code = blocks[1].replace("http://127.0.0.1:8000", live_server.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(784, 512)" in result.stdout and "'evolve': 10" in result.stdout


def test_readme_fast_loop_example_runs(live_server):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 3, "README lost its step / Ref example"
    code = blocks[2].replace("http://127.0.0.1:8000", live_server.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(16, 14, 14, 1)" in result.stdout and "'step': 1" in result.stdout and "'evolve': 1" in result.stdout


@pytest.mark.parametrize("where", ["server", "local"])
def test_readme_loop_example_runs(live_server, where):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 4, "README lost its session / sequence / packed example"
    code = blocks[3].replace('"http://127.0.0.1:8000"', '"local"' if where == "local" else f'"{live_server.url}"')
    if where == "server":
        code = code.replace('"dict"', '"readme-dict"').replace('f"col-{i}"', 'f"readme-col-{i}"')
        code = code.replace('outs["col-3"]', 'outs["readme-col-3"]')
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(5, 32, 8, 8, 1) (2, 4) (4, 2, 4) {'forward': 25, 'backtransmit': 20, 'evolve': 1}" in result.stdout


def test_readme_insight_example_runs(live_server, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 5, "README lost its pictures / history example"
    code = blocks[4].replace("http://127.0.0.1:8000", live_server.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "True 20 1024" in result.stdout
    assert (tmp_path / "filters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_curl_example_runs(live_server):
    import httpx

    commands = re.findall(r"curl -s (.*?)(?:\n(?!  )|$)", README.split("## Use it from curl")[1].split("##")[0], re.S)
    assert len(commands) >= 2
    body = re.search(r"-d '(.*?)'", commands[0], re.S).group(1)
    assert httpx.post(f"{live_server.url}/v1/synapses", content=body,
                      headers={"Content-Type": "application/json"}).status_code == 201
    body = re.search(r"-d '(.*?)'", commands[1], re.S).group(1)
    r = httpx.post(f"{live_server.url}/v1/synapses/tiny/forward", content=body,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["outputs"]["shape"] == [1, 2, 2, 1]


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    assert "./scripts/serve.sh" in README and "./scripts/test.sh" in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci
