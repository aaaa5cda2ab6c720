"""Property-based fuzzing of the live server from its own OpenAPI document (schemathesis), reaching real instances.

Schemathesis generates every documented operation's requests and validates each answer (no 5xx;
status codes, content types and 2xx bodies as documented). On top of its cases the test steers
most requests to instances that exist — seeded for two owners, with auth on — and gives them
realistic bodies (valid tensors, references and configs, then mutations of them: wrong shapes,
dtypes and fields, NaN, bad names), with the caller's token, another owner's, an admin's or
none. Coverage is asserted, so the fuzzing cannot silently stop reaching the service again: at
least 30% 2xx answers on each operation, and 2xx answers on every instance route. Loopback
only, bounded by the example counts below.
"""

from __future__ import annotations

from collections import Counter

import httpx
import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import LiveServer

CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
ALICE, BOB, ROOT = "alice-" + "a" * 24, "bob-" + "b" * 24, "root-" + "r" * 24
TOKENS = st.sampled_from([ALICE] * 14 + [BOB] * 3 + [ROOT] * 2 + [None])
# the names a caller mostly uses (their own seeds), and now and then another owner's or one that is missing
NAMES = {ALICE: ["fz-learner"] * 12 + ["fz-plain"] * 2 + ["fz-bobs", "missing-one"],
         BOB: ["fz-bobs"] * 8 + ["fz-learner", "missing-one"], ROOT: ["fz-learner", "missing-one"],
         None: ["fz-learner"]}
KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [3, 3], "eta": 0.1, "optim_type": "adam", "bias": True}
SEEDS = {"fz-learner": (ALICE, KIND, CONFIG), "fz-plain": (ALICE, "DeconvSynapse", {"shape": [2, 2, 1, 2],
                                                                                   "x_shape": [3, 3]}),
         "fz-bobs": (BOB, KIND, CONFIG)}
OPERATIONS = ["forward", "evolve", "backtransmit", "step", "reset"]
IN, OUT = (3, 3, 1), (3, 3, 2)
COMPARTMENTS = ["weights", "biases", "inputs", "outputs", "pre", "post", "dWeights", "dInputs", "key",
                "opt_state/0/mu/0", "opt_state/0/count", "nope"]
EXAMPLES = 50  # per documented operation; the operation route gets OPERATION_EXAMPLES, packed calls PACKED_EXAMPLES
OPERATION_EXAMPLES = 450
PACKED_EXAMPLES = 150


def tensors(shape: tuple[int, ...]):
    """A valid tensor as JSON (nested lists) at a small batch, sometimes a reference."""
    batch = st.integers(1, 3)
    values = st.floats(-2, 2, allow_nan=False, width=32)
    array = batch.flatmap(lambda b: st.lists(values, min_size=b * int(np.prod(shape)),
                                             max_size=b * int(np.prod(shape)))
                          .map(lambda v, b=b: np.asarray(v, np.float32).reshape(b, *shape).tolist()))
    ref = st.sampled_from([{"ref": "inputs"}, {"ref": "outputs"}, {"ref": "post"}, {"ref": "pre"}])
    return st.one_of(array, array, array, ref)


ARGUMENTS = {"forward": {"inputs": IN}, "evolve": {"pre": IN, "post": OUT}, "backtransmit": {"post": OUT},
             "step": {"inputs": IN, "post": OUT}, "reset": {}}


@st.composite
def operation_bodies(draw, operation: str):
    """A body for ``operation``: valid (same batch throughout) most of the time, else one mutation; now and
    then a sequence (a leading time axis, sometimes with its options)."""
    batch = draw(st.integers(1, 3))
    steps = draw(st.sampled_from([None] * 6 + [1, 2, 3]))
    lead = () if steps is None else (steps,)
    body: dict = {}
    for name, shape in ARGUMENTS.get(operation, {}).items():
        if name == "post" and operation == "backtransmit" and draw(st.booleans()):
            continue  # the stored post
        if steps is None and draw(st.integers(0, 9)) == 9:
            body[name] = draw(st.sampled_from([{"ref": "inputs"}, {"ref": "post"}]))
        else:
            body[name] = np.full((*lead, batch, *shape), draw(st.floats(-1, 1, width=32)), np.float32).tolist()
    if steps is not None and body and draw(st.booleans()):
        body["sequence"] = draw(st.sampled_from([{"every": 1}, {"every": steps}, {"last": True}, {"every": 0},
                                                 {"every": 2, "last": True}, {"steps": 2}, "all"]))
    if draw(st.integers(0, 5)) == 5:
        body["return"] = draw(st.lists(st.sampled_from(COMPARTMENTS), max_size=2))
    mutation = draw(st.integers(0, 11))  # 0-7: none
    sent = [k for k in ARGUMENTS.get(operation, {}) if isinstance(body.get(k), list)]
    if mutation == 8 and sent:  # a wrong shape
        body[sent[0]] = np.ones((batch, 2, 2, 1), np.float32).tolist()
    elif mutation == 9:  # an unknown field
        body["bogus"] = [1.0]
    elif mutation == 10 and sent:  # not a tensor
        body[sent[0]] = draw(st.sampled_from(["x", 3, None, {"ref": 5}, {"dtype": "int32"}]))
    elif mutation == 11 and sent:  # extreme values (JSON has no NaN)
        body[sent[0]] = np.full((batch, *ARGUMENTS[operation][sent[0]]), 3e38).tolist()
    return body


def create_bodies():
    names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True) | st.sampled_from(["../x", "", "fz-learner"])
    config = st.fixed_dictionaries({"shape": st.just([2, 2, 1, 2]), "x_shape": st.just([3, 3])}, optional={
        "eta": st.floats(0, 1) | st.just(-1), "stride": st.integers(1, 3) | st.just(0),
        "optim_type": st.sampled_from(["sgd", "adam", "nag", "adm"]), "bias": st.booleans(),
        "padding": st.sampled_from(["SAME", "valid", "sideways"]), "etaa": st.just(0.1)})
    return st.fixed_dictionaries({"name": names, "kind": st.sampled_from([KIND, "DeconvSynapse", "Nope"]),
                                  "config": config}, optional={"seed": st.integers(-1, 10),
                                                               "durability": st.sampled_from(["off", "sync", "x"])})


@st.composite
def packed_bodies(draw, operation: str):
    """A packed call on the seeded instances (mostly alice's own), each with a realistic body."""
    names = draw(st.lists(st.sampled_from(["fz-learner"] * 6 + ["fz-plain", "fz-bobs", "missing-one"]),
                          min_size=1, max_size=3, unique=True))
    calls = []
    for name in names:
        tensors = draw(operation_bodies(operation))
        tensors.pop("return", None)
        tensors.pop("sequence", None)
        calls.append({"name": name, "tensors": tensors})
    body: dict = {"calls": calls}
    if draw(st.integers(0, 2)) == 2:  # the stacked form: the first call's tensors, one slice per name
        body = {"names": names, "tensors": {k: [v] * len(names) if isinstance(v, list) else v
                                            for k, v in calls[0]["tensors"].items()}}
    if draw(st.integers(0, 5)) == 5:
        body["return"] = draw(st.lists(st.sampled_from(COMPARTMENTS), max_size=2))
    return body


def body_for(template: str, method: str, operation: str | None, compartment: str | None):
    """A realistic body strategy for a route, or None to keep schemathesis's own."""
    if template == "/v1/packed/{operation}":
        return packed_bodies(operation)
    if template.endswith("/{operation}"):
        return operation_bodies(operation)
    if template == "/v1/synapses" and method == "POST":
        return create_bodies()
    if template.endswith("/compartments/{compartment}") and method == "PUT":
        shapes = {"weights": (2, 2, 1, 2), "inputs": (1, *IN), "post": (2, *OUT), "biases": (2,)}
        shape = shapes.get(compartment, (2, 2))
        value = st.sampled_from([np.full(shape, 0.5, np.float32).tolist(), np.ones((3, 3)).tolist(), "x"])
        return st.fixed_dictionaries({"value": value})
    if template.endswith("/snapshots") and method == "POST":
        return st.fixed_dictionaries({"snapshot": st.from_regex(r"[a-z]{1,6}", fullmatch=True) | st.just("../s")})
    if template == "/v1/admin/evict":
        return st.fixed_dictionaries({"idle_s": st.sampled_from([3600.0, 1e9, -1.0, 0.5])})
    return None


class Fuzz:
    """The live server, its seeded instances, and what the fuzzing reached."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)
        self.statuses: Counter[tuple[str, str, str]] = Counter()  # (method, template or operation, class)
        self.imports = 0
        self.seed_all()

    def seed_all(self) -> None:
        for name, (token, kind, config) in SEEDS.items():
            headers = {"Authorization": f"Bearer {token}"}
            if self.http.get(f"/v1/synapses/{name}", headers=headers).status_code == 404:
                self.http.post("/v1/synapses", json={"name": name, "kind": kind, "config": config},
                               headers=headers).raise_for_status()
                if kind == KIND:
                    self.http.post(f"/v1/synapses/{name}/forward", json={"inputs": np.ones((1, *IN)).tolist()},
                                   headers=headers).raise_for_status()
            self.http.post(f"/v1/synapses/{name}/snapshots", json={"snapshot": "s0"}, headers=headers)
        self.export = self.http.get("/v1/synapses/fz-learner/export",
                                    headers={"Authorization": f"Bearer {ALICE}"}).content

    def run(self, operation, examples: int) -> None:
        template, method = operation.path, operation.method.upper()
        kind_ops = st.sampled_from(OPERATIONS * 6 + ["forwrd", "snapshots"])

        @given(case=operation.as_strategy(), data=st.data())
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def one(case, data):
            token = data.draw(TOKENS)
            params = dict(case.path_parameters or {})
            operation_name = compartment = None
            if "name" in params and data.draw(st.integers(0, 9)) < 9:
                params["name"] = data.draw(st.sampled_from(NAMES[token]))
            if "kind" in params and data.draw(st.booleans()):
                params["kind"] = data.draw(st.sampled_from([KIND, "DeconvSynapse"]))
            if "operation" in params:
                params["operation"] = operation_name = data.draw(kind_ops)
            if "compartment" in params:
                params["compartment"] = compartment = data.draw(st.sampled_from(COMPARTMENTS))
            if "snapshot" in params and data.draw(st.booleans()):
                params["snapshot"] = "s0"
            if params:
                case.path_parameters = params
            strategy = body_for(template, method, operation_name, compartment)
            if strategy is not None and data.draw(st.integers(0, 9)) < 9:
                case.body, case.media_type = data.draw(strategy), "application/json"
            if case.query and data.draw(st.integers(0, 9)) < 8:
                case.query = {}  # ?owner= mostly left out: generated owners are mostly refused
            if template == "/v1/synapses/import" and data.draw(st.integers(0, 3)) < 3:
                case.body, case.media_type = self.export, "application/octet-stream"
                case.query = {"name": f"imported-{self.imports}"}
                self.imports += 1
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = case.call_and_validate(checks=CHECKS, headers=headers, timeout=30)
            label = f"{template} {operation_name}" if operation_name else template
            self.statuses[(method, label, f"{response.status_code // 100}xx")] += 1
            if method in ("DELETE", "POST") and response.status_code < 300 and (
                    "evict" in template or method == "DELETE" or template.endswith("/restore")):
                self.seed_all()  # a seed or its snapshot may be gone: bring it back

        one()

    def share_2xx(self, method: str, label: str) -> float:
        total = sum(n for (m, lab, _), n in self.statuses.items() if (m, lab) == (method, label))
        return self.statuses[(method, label, "2xx")] / total if total else 0.0


def test_fuzz_reaches_every_route_with_auth_and_two_owners(tmp_path):
    tokens = f"alice:{ALICE},bob:{BOB},root:{ROOT}:admin"
    with LiveServer(state_dir=tmp_path, tokens=tokens, max_body_bytes=1 << 20) as server:
        fuzz = Fuzz(server.url)
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 20
        try:
            for operation in operations:
                fuzz.run(operation, OPERATION_EXAMPLES if operation.path.endswith("/{name}/{operation}") else
                         PACKED_EXAMPLES if operation.path.endswith("/{operation}") else EXAMPLES)
        finally:
            fuzz.http.close()
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    calls = sum(fuzz.statuses.values())
    print(f"schemathesis: {calls} requests; " + ", ".join(f"{m} {lab} {c}: {n}"
                                                          for (m, lab, c), n in sorted(fuzz.statuses.items())))
    assert calls >= 1200, calls
    assert not any(c == "5xx" for _, _, c in fuzz.statuses), fuzz.statuses
    for operation in OPERATIONS:  # the operation route reaches instances and succeeds often
        share = fuzz.share_2xx("POST", f"/v1/synapses/{{name}}/{{operation}} {operation}")
        assert share >= 0.30, (operation, share)
    packed = sum(fuzz.statuses[("POST", f"/v1/packed/{{operation}} {op}", "2xx")] for op in OPERATIONS)
    assert packed >= 20, fuzz.statuses  # packed calls reach instances and succeed too
    for method, template in (("GET", "/v1/synapses/{name}"), ("GET", "/v1/synapses/{name}/compartments/{compartment}"),
                             ("PUT", "/v1/synapses/{name}/compartments/{compartment}"),
                             ("POST", "/v1/synapses/{name}/snapshots"), ("GET", "/v1/synapses/{name}/snapshots"),
                             ("POST", "/v1/synapses/{name}/snapshots/{snapshot}/restore"),
                             ("GET", "/v1/synapses/{name}/export"), ("POST", "/v1/synapses"),
                             ("DELETE", "/v1/synapses/{name}"), ("GET", "/v1/synapses/{name}/help"),
                             ("POST", "/v1/synapses/import"), ("GET", "/v1/kinds/{kind}")):
        assert fuzz.share_2xx(method, template) > 0, (method, template)
