"""The mutation lists (``tests/**/mutations.toml``, run by ``scripts/mutation_check.py`` before an issue is
resolved) stay applicable: code that moved left five of them finding nothing, so the guarantees they name went
unchecked without anyone noticing. Each mutation's ``find`` occurs exactly once in its file, and the tests it
names exist."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MUTATIONS = [(path.relative_to(ROOT), mutation) for path in sorted(ROOT.glob("tests/**/mutations.toml"))
             for mutation in tomllib.loads(path.read_text())["mutation"]]


def test_there_are_mutation_lists():
    assert len(MUTATIONS) > 50


@pytest.mark.parametrize("listed, mutation", MUTATIONS, ids=[f"{p}: {m['name']}" for p, m in MUTATIONS])
def test_each_mutation_applies_once_and_names_tests_that_exist(listed, mutation):
    source = (ROOT / mutation["file"]).read_text()
    assert source.count(mutation["find"]) == 1, f"{listed}: {mutation['name']!r}: find must occur once"
    assert mutation["replace"] != mutation["find"]
    for test in mutation["tests"]:
        if test.startswith("-"):  # a pytest option (-x)
            continue
        path, _, function = test.partition("::")
        assert (ROOT / path).is_file(), f"{listed}: {mutation['name']!r}: no test file {path}"
        if function:
            assert f"def {function.split('[')[0]}(" in (ROOT / path).read_text(), \
                f"{listed}: {mutation['name']!r}: no test {function} in {path}"
