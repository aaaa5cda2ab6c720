"""Instances packed again and again are kept stacked (``local/stack.py``): nothing a caller sees may change.

From the second packed call on one list of instances, their states live stacked and the packed
calls run on the stack. Every answer, compartment, version, counter, history sample and stored
file must stay what separate calls on twin instances give, bit for bit, whatever touches a member
in between (a single call, a read, a write, a reference, a delete, a flush), and a refused call
must change nothing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from synapse_serve.errors import IdempotencyKeyReused, NotFound, QuotaExceeded, ShapeMismatch, UnknownCompartment
from synapse_serve.local.capacity import Capacity, Limits
from synapse_serve.local.persistence import Persistence
from synapse_serve.local.registry import Registry
from synapse_serve.local.stack import Stack
from synapse_serve.names import CompartmentRef, InstanceKey
from synapse_serve.store import Store, decode

from .test_many_ops import KINDS, assert_as_separate, key, same_instances, shapes, tensors

COUNT = 4


def population(registry: Registry, kind: str, prefix: str, count: int = COUNT) -> list[InstanceKey]:
    for i in range(count):
        registry.create(key(f"{prefix}{i}"), kind=KINDS[kind][0], config=KINDS[kind][1], seed=i)
    return [key(f"{prefix}{i}") for i in range(count)]


def stack_of(registry: Registry, k: InstanceKey) -> Stack | None:
    slot = registry._instances[k].slot
    return None if slot is None else slot[0]


def stacked_tensors(registry: Registry, operation: str, seed: int, count: int = COUNT) -> dict[str, np.ndarray]:
    sent = [tensors(registry, "p0", operation, (), seed=seed + i) for i in range(count)]
    return {name: np.stack([s[name] for s in sent]) for name in sent[0]}


def separately(registry: Registry, keys: list[InstanceKey], operation: str, sent: dict[str, np.ndarray],
               returned: list[str]) -> dict[str, np.ndarray]:
    answers = [registry.call(k, operation, {n: v[i] for n, v in sent.items()}, returned) for i, k in enumerate(keys)]
    return {"versions": [a["version"] for a in answers], **{c: np.stack([a[c] for a in answers]) for c in returned}}


def stacked(registry: Registry, kind: str, operation: str = "forward",
            with_twins: bool = False) -> tuple[list[InstanceKey], list[InstanceKey]]:
    """A population packed twice (so it is stacked) and, if asked, twins given the same calls one by one."""
    packed = population(registry, kind, "p")
    twins = population(registry, kind, "s") if with_twins else []
    for round_ in range(2):
        sent = stacked_tensors(registry, operation, seed=round_)
        registry.call_stacked(packed, operation, sent)
        separately(registry, twins, operation, sent, [])
    assert stack_of(registry, packed[0]) is not None
    return packed, twins


def assert_same_answer(stacked: dict, separate: dict) -> None:
    assert stacked["versions"] == separate["versions"]
    for compartment in separate:
        if compartment != "versions":
            assert stacked[compartment].dtype == separate[compartment].dtype
            assert np.array_equal(stacked[compartment], separate[compartment]), compartment


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("form", ["stacked", "list"])
def test_packed_calls_on_a_stack_are_the_separate_calls_bit_for_bit(kind, form):
    registry = Registry(history_when_off=True)  # history samples too
    packed, twins = population(registry, kind, "p"), population(registry, kind, "s")
    returned = ["outputs", "weights"]
    for round_, operation in enumerate(["forward", "evolve", "forward", "step", "evolve", "backtransmit"]):
        sent = stacked_tensors(registry, operation, seed=100 * round_)
        if operation == "backtransmit":
            returned = ["dInputs", "weights"]
        if form == "stacked":
            # float64 on one round: cast to float32 as a separate call casts it
            answer = registry.call_stacked(packed, operation, {n: v.astype(np.float64) if round_ == 4 else v
                                                               for n, v in sent.items()}, returned)
        else:
            calls = [{n: v[i] for n, v in sent.items()} for i in range(COUNT)]
            answers = registry.call_many(packed, operation, calls, returned)
            answer = {"versions": [a["version"] for a in answers],
                      **{c: np.stack([a[c] for a in answers]) for c in returned}}
        assert_same_answer(answer, separately(registry, twins, operation, sent, returned))
        # the second packed call on the list stacks it, and every later one runs on the stack
        assert (stack_of(registry, packed[0]) is not None) == (round_ >= 1)
    for i in range(COUNT):
        same_instances(registry, f"p{i}", f"s{i}")  # read from the stack: it stays
    assert stack_of(registry, packed[0]) is not None
    for p, s in zip(packed, twins):
        assert len(registry.history(p)["entries"]) == 3  # evolve, step, evolve
        # the samples' reductions run in a loop over the stack, which XLA may order differently: float32 rounding
        assert registry.history(p)["entries"] == [
            {**{f: pytest.approx(v, rel=1e-6, abs=1e-7) for f, v in e.items()}, "time": pytest.approx(e["time"], abs=60)}
            for e in registry.history(s)["entries"]]


@pytest.mark.parametrize("touch", ["call", "forward", "write", "reference", "reset", "learning_stats", "describe"])
def test_touching_one_member_leaves_every_member_right(registry, touch):
    packed, twins = stacked(registry, "deconv", "evolve", with_twins=True)
    x = tensors(registry, "p0", "forward", (), seed=7)
    for keys in (packed, twins):
        if touch == "call":
            registry.call(keys[1], "evolve", tensors(registry, "p0", "evolve", (), seed=8))
        elif touch == "forward":  # its signals now differ in shape from the others'
            registry.call(keys[1], "forward", x)
        elif touch == "write":
            registry.write(keys[1], "weights", np.full(registry.read(keys[1], "weights")[0].shape, 0.5, np.float32))
        elif touch == "reference":
            registry.call(keys[2], "evolve", {"pre": CompartmentRef("inputs", keys[0].name),
                                              "post": CompartmentRef("outputs", keys[0].name)})
        elif touch == "reset":
            registry.call(keys[3], "reset", {})
        elif touch == "learning_stats":
            assert registry.learning_stats(keys[1])["weights"]["size"] > 0
        else:
            assert registry.describe(keys[1])["compartments"]["weights"]["shape"] == list(KINDS["deconv"][1]["shape"])
    # only what was called or written leaves the stack; a reference's source is read in place, as any read on the
    # host, and stays
    touched = {"call": {1}, "forward": {1}, "write": {1}, "reference": {2}, "reset": {3}}.get(touch, set())
    assert [stack_of(registry, k) is None for k in packed] == [i in touched for i in range(COUNT)]
    for round_ in range(2, 5):
        sent = stacked_tensors(registry, "evolve", seed=round_)
        assert_same_answer(registry.call_stacked(packed, "evolve", sent, ["weights"]),
                           separately(registry, twins, "evolve", sent, ["weights"]))
    # stacked again, unless one member's compartments now differ in shape from the others' (never stacked then)
    assert (stack_of(registry, packed[0]) is not None) == (touch != "forward")
    for i in range(COUNT):
        same_instances(registry, f"p{i}", f"s{i}")


def test_another_order_or_a_part_of_the_stack_runs_the_usual_way_with_the_same_numbers(registry):
    packed, twins = stacked(registry, "dense", "evolve", with_twins=True)
    for order in ([3, 1, 2, 0], [0, 2]):
        sent = stacked_tensors(registry, "evolve", seed=50, count=len(order))
        answer = registry.call_stacked([packed[i] for i in order], "evolve", sent, ["weights"])
        assert_same_answer(answer, separately(registry, [twins[i] for i in order], "evolve", sent, ["weights"]))
    for i in range(COUNT):
        same_instances(registry, f"p{i}", f"s{i}")


def test_a_deleted_member_is_not_found_and_the_others_keep_their_state(registry):
    packed, twins = stacked(registry, "deconv", with_twins=True)
    registry.delete(packed[2])
    registry.delete(twins[2])
    with pytest.raises(NotFound, match=r"names\[2\] \('p2'\)"):
        registry.call_stacked(packed, "forward", stacked_tensors(registry, "forward", seed=9))
    for i in (0, 1, 3):
        same_instances(registry, f"p{i}", f"s{i}")


def test_a_keyed_call_on_a_stack_is_applied_once(registry):
    packed, _ = stacked(registry, "dense")
    sent = stacked_tensors(registry, "evolve", seed=3)
    first = registry.call_stacked(packed, "evolve", sent, ["weights"], idempotency_key="k-1")
    assert stack_of(registry, packed[0]) is not None
    again = registry.call_stacked(packed, "evolve", sent, ["weights"], idempotency_key="k-1")
    assert again["versions"] == first["versions"] == [4] * COUNT
    assert np.array_equal(again["weights"], first["weights"])
    assert registry.describe(packed[0])["counters"]["evolve"] == 1
    with pytest.raises(IdempotencyKeyReused):
        registry.call_stacked(packed, "evolve", stacked_tensors(registry, "evolve", seed=4), ["weights"],
                              idempotency_key="k-1")


def test_a_call_on_a_stack_over_quota_changes_nothing():
    registry = Registry(Capacity(Limits(max_state_bytes_per_owner=120_000)))
    packed, _ = stacked(registry, "deconv")
    before = [registry.describe(k) for k in packed]
    weights = [registry.read(k, "weights")[0] for k in packed]
    big = stacked_tensors(registry, "forward", seed=5)["inputs"].repeat(100, axis=1)  # grows the signals
    with pytest.raises(QuotaExceeded, match=r"names\[\d\]"):
        registry.call_stacked(packed, "forward", {"inputs": big})
    for k, b, w in zip(packed, before, weights):
        after = registry.describe(k)
        assert (after["version"], after["state_bytes"]) == (b["version"], b["state_bytes"])
        assert np.array_equal(registry.read(k, "weights")[0], w)
    assert registry.capacity.owner_usage("me")["state_bytes"] == sum(b["state_bytes"] for b in before)


@pytest.mark.parametrize("durability", ["sync", "interval"])
def test_stacked_members_are_stored_as_they_are(tmp_path, durability):
    registry = Registry(persistence=Persistence(Store(tmp_path), durability))
    registry.open()
    packed = population(registry, "deconv", "p")
    twins = population(registry, "deconv", "s")
    for round_ in range(3):
        sent = stacked_tensors(registry, "evolve", seed=round_)
        registry.call_stacked(packed, "evolve", sent)
        separately(registry, twins, "evolve", sent, [])
    assert stack_of(registry, packed[0]) is not None
    if durability == "interval":
        registry.flush()
        assert stack_of(registry, packed[0]) is not None  # written from host copies, still stacked
    for p, s in zip(packed, twins):
        stored_p = decode(registry.persistence.store.path(str(p)).read_bytes())
        stored_s = decode(registry.persistence.store.path(str(s)).read_bytes())
        assert (stored_p.version, stored_p.counters) == (stored_s.version, stored_s.counters)
        assert stored_p.arrays.keys() == stored_s.arrays.keys()
        for name in stored_s.arrays:
            assert np.array_equal(stored_p.arrays[name], stored_s.arrays[name]), name
    registry.close()
    reopened = Registry(persistence=Persistence(Store(tmp_path), durability))
    reopened.open()
    reopened.load_stored()
    for i in range(COUNT):
        same_instances(reopened, f"p{i}", f"s{i}")
    reopened.close()


def test_packed_and_single_calls_racing_on_a_stack_lose_nothing(registry):
    packed, _ = stacked(registry, "dense")
    x = tensors(registry, "p0", "forward", (), seed=1)
    sent = stacked_tensors(registry, "forward", seed=2)
    errors: list[BaseException] = []

    def single(k: InstanceKey) -> None:
        try:
            for _ in range(20):
                registry.call(k, "forward", x)
                registry.read(k, "weights")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def packs() -> None:
        try:
            for _ in range(20):
                registry.call_stacked(packed, "forward", sent)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=packs), *(threading.Thread(target=single, args=(k,)) for k in packed[:2])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    counters = [registry.describe(k)["counters"]["forward"] for k in packed]
    assert counters == [42, 42, 22, 22]  # 2 + 20 packed calls each, and 20 single calls on the first two
    versions = [registry.describe(k)["version"] for k in packed]
    assert versions == [43, 43, 23, 23]


def test_a_loop_mixing_packed_and_separate_calls_on_every_member_is_stacked_less_and_less_often(registry):
    packed = population(registry, "dense", "p")
    x = tensors(registry, "p0", "forward", (), seed=1)
    sent = stacked_tensors(registry, "forward", seed=2)
    stacked_at = []
    for round_ in range(12):
        registry.call_stacked(packed, "forward", sent)
        stacked_at.append(stack_of(registry, packed[0]) is not None)
        for k in packed:  # every member taken out of the stack again
            registry.call(k, "forward", x)
    # stacked after 2 packed calls, then after 4 more (its stack emptied by the separate calls), then 8 more
    assert [i for i, stacked in enumerate(stacked_at) if stacked] == [1, 5]


POPULATIONS = {
    "deconv-adam": ("HebbianDeconvSynapse", {"shape": [3, 3, 2, 3], "x_shape": [6, 6], "eta": 0.05,
                                             "optim_type": "adam"}),
    "deconv-w-norm-in": ("HebbianDeconvSynapse", {"shape": [3, 3, 2, 3], "x_shape": [6, 6], "eta": 0.05,
                                                  "w_norm": 1.0, "w_norm_per": "in"}),
    "deconv-16-latents": ("HebbianDeconvSynapse", {"shape": [3, 3, 16, 1], "x_shape": [8, 8], "eta": 0.01,
                                                   "sign_value": -1.0}),
    "dense-adam-bias": ("HebbianSynapse", {"shape": [6, 4], "eta": 0.05, "optim_type": "adam", "bias": True}),
    "dense-nag-bias-w-norm": ("HebbianSynapse", {"shape": [6, 4], "eta": 0.05, "optim_type": "nag", "bias": True,
                                                 "w_norm": 1.0}),
}


@pytest.mark.parametrize("count", [2, 3, 7, 33])
@pytest.mark.parametrize("kind", list(POPULATIONS))
def test_every_compartment_of_every_population_size_is_the_separate_calls_bit_for_bit(registry, kind, count):
    """Each compartment, after each call, packed (then stacked) against twins called one by one: bit for bit, but for
    the deconvolution, within float32 rounding (2e-5 of the compartment's largest value; measured up to 9e-6, adam's
    moments after 4 evolves). Inside the packed call's loop XLA compiled the body its own way: the dense kind's adam
    update of its biases came out up to 8 ulps apart until each slice was fenced off (kinds/packed.py); and on the
    CPU it runs the deconvolution's filter gradient as Eigen's convolution only outside loops (writing it in Eigen's
    form inside them crashed XLA in long runs: not kept)."""
    config = POPULATIONS[kind]
    for prefix in ("p", "s"):
        for i in range(count):
            registry.create(key(f"{prefix}{i}"), kind=config[0], config=config[1], seed=i)
    packed, twins = [key(f"p{i}") for i in range(count)], [key(f"s{i}") for i in range(count)]
    compartments = [name for name in registry.describe(packed[0])["compartments"] if name != "key"]
    rng = np.random.default_rng(0)
    inputs, outputs = shapes(registry, "p0")
    for _ in range(4):
        x = rng.normal(size=(count, 3, *inputs)).astype(np.float32)
        y = rng.normal(size=(count, 3, *outputs)).astype(np.float32)
        for operation, sent in (("forward", {"inputs": x}), ("evolve", {"pre": x, "post": y}),
                                ("backtransmit", {"post": y})):
            together = registry.call_stacked(packed, operation, sent, compartments)
            alone = separately(registry, twins, operation, sent, compartments)
            for compartment in compartments:
                assert_as_separate(kind, together[compartment], alone[compartment], (operation, compartment))



def test_rows_a_stack_keeps_for_members_taken_out_count_against_their_owner():
    """A red-team probe deleted half a stack's members and created as many again: the stack's arrays still held
    the deleted rows, the quota no longer counted them (1.47x the quota held). They count while they are held."""
    registry = Registry(Capacity(Limits()))
    packed, _ = stacked(registry, "dense")
    usage = registry.capacity.owner_usage("me")["state_bytes"]
    row = registry.describe(packed[0])["state_bytes"]
    registry.delete(packed[0])  # 3 of 4 still in: the stack keeps the deleted row
    assert stack_of(registry, packed[1]) is not None
    assert registry.capacity.owner_usage("me")["state_bytes"] == usage  # the member's own count went, its row stays
    registry.call(packed[1], "forward", tensors(registry, "p1", "forward", (), seed=1))  # taken out: its own state
    assert stack_of(registry, packed[1]) is None
    assert registry.capacity.owner_usage("me")["state_bytes"] == usage + row  # its own state and its row in the stack
    registry.delete(packed[2])  # fewer than half in: the stack empties, its rows go, nothing is counted for them
    assert stack_of(registry, packed[3]) is None
    assert registry.capacity.owner_usage("me")["state_bytes"] == 2 * row  # p1 and p3, each its own state
    assert registry.capacity.owner_usage("me")["state_bytes"] == sum(
        registry.describe(k)["state_bytes"] for k in (packed[1], packed[3]))


def test_a_quota_full_of_a_stack_refuses_creates_while_deleted_members_rows_are_held():
    probe = Registry(Capacity(Limits()))
    stacked(probe, "dense")
    registry = Registry(Capacity(Limits(max_state_bytes_per_owner=probe.capacity.owner_usage("me")["state_bytes"])))
    packed, _ = stacked(registry, "dense")
    registry.delete(packed[0])
    with pytest.raises(QuotaExceeded):  # the deleted member's row is still held by the stack
        registry.create(key("new"), kind=KINDS["dense"][0], config=KINDS["dense"][1])
    registry.delete(packed[1])
    registry.delete(packed[2])  # fewer than half in: the stack empties, the rows go
    registry.create(key("new"), kind=KINDS["dense"][0], config=KINDS["dense"][1])


def test_rows_a_stack_grew_are_charged_at_their_grown_size_once_their_member_is_taken_out():
    """A red-team probe stacked a population at batch 1, ran a packed call at batch 400 on the stack (every row
    grew), deleted a member: its row was still charged at its batch-1 size, so the quota let a new instance grow
    past it. A row is charged at the size the last packed call on the stack left it."""
    registry = Registry(Capacity(Limits()))
    packed, _ = stacked(registry, "dense")
    small = registry.describe(packed[0])["state_bytes"]
    sent = stacked_tensors(registry, "forward", seed=7)
    grown = {name: np.repeat(value, 50, axis=1) for name, value in sent.items()}  # batch 50 on every row
    registry.call_stacked(packed, "forward", grown)
    assert stack_of(registry, packed[0]) is not None  # it ran on the stack
    row = registry.describe(packed[0])["state_bytes"]
    assert row > 2 * small
    usage = registry.capacity.owner_usage("me")["state_bytes"]
    assert usage == COUNT * row
    registry.delete(packed[0])  # its grown row stays in the stack's arrays: still counted, at its grown size
    assert stack_of(registry, packed[1]) is not None
    assert registry.capacity.owner_usage("me")["state_bytes"] == usage


@pytest.mark.parametrize("limit", ["max_state_bytes_per_owner", "device_budget_bytes"])
def test_taking_a_member_out_never_takes_its_owner_past_a_quota_or_the_budget(limit):
    """A red-team probe filled the quota with a stacked population and called its members one by one: each call took
    its member out (its own state, its row still held by the stack), charged unchecked: 35% over the quota. The row
    left behind is checked as any growth is; where it does not fit, the stack empties instead (every member its own
    state, the stacked arrays gone). A refused write leaves its member in the stack and the count as it was."""
    probe = Registry(Capacity(Limits()))
    stacked(probe, "dense")
    full = probe.capacity.owner_usage("me")["state_bytes"]
    registry = Registry(Capacity(Limits(**{limit: full})))
    packed, _ = stacked(registry, "dense")
    row = registry.describe(packed[0])["state_bytes"]

    def used() -> int:
        return registry.capacity.owner_usage("me")["state_bytes"]

    with pytest.raises(ShapeMismatch):
        registry.write(packed[1], "weights", np.ones((1, 1), np.float32))
    assert stack_of(registry, packed[1]) is not None and used() == full  # refused: nothing taken out, nothing counted
    before = registry.read(packed[1], "weights")[0]
    answer = registry.call(packed[1], "forward", tensors(registry, "p1", "forward", (), seed=1))  # answered, and
    assert all(stack_of(registry, k) is None for k in packed)  # its row did not fit: the stack emptied instead
    assert used() == full == sum(registry.describe(k)["state_bytes"] for k in packed)
    assert np.array_equal(registry.read(packed[1], "weights")[0], before) and answer["version"] == 4

    roomy = Registry(Capacity(Limits(**{limit: full + row})))  # room for one row: the stack keeps it
    packed, _ = stacked(roomy, "dense")
    roomy.call(packed[1], "forward", tensors(roomy, "p1", "forward", (), seed=1))
    assert stack_of(roomy, packed[1]) is None and stack_of(roomy, packed[2]) is not None
    assert roomy.capacity.owner_usage("me")["state_bytes"] == full + row
    roomy.call(packed[2], "forward", tensors(roomy, "p2", "forward", (), seed=2))  # a second row would not fit
    assert all(stack_of(roomy, k) is None for k in packed)
    assert roomy.capacity.owner_usage("me")["state_bytes"] == full


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_list_form_call_on_a_stack_answers_every_compartment_as_an_array(kind):
    """A red-team probe: a 0-d compartment (an optimizer's step count) came back from a stack as a numpy scalar, which
    the wire writes as a plain number, where a separate call (and the stacked form) answers a 0-d tensor."""
    registry = Registry()
    packed, _ = stacked(registry, kind)
    layout = registry.describe(packed[0])["compartments"]
    returned = [c for c, d in layout.items() if d["shape"] == []] + ["weights"]
    sent = stacked_tensors(registry, "evolve", seed=5)
    answers = registry.call_many(packed, "evolve", [{n: v[i] for n, v in sent.items()} for i in range(COUNT)],
                                 returned)
    assert stack_of(registry, packed[0]) is not None  # it ran on the stack
    for answer in answers:
        for compartment in returned:
            assert isinstance(answer[compartment], np.ndarray), (compartment, type(answer[compartment]))
            assert answer[compartment].shape == tuple(layout[compartment]["shape"])


@pytest.mark.parametrize("kind", ["dense", "deconv"])
def test_a_refused_call_with_references_or_an_unknown_return_leaves_every_member_in_its_stack(registry, kind):
    """A red-team run (2026-11-30): an evolve of a stacked member refused for its batch, whose pre was a reference to
    another member, took both out of the stack first (the references were read through the members' own states):
    nothing answered, yet the owner's counted bytes grew by the two rows left behind. And a packed call refused for
    an unknown compartment to return had put members back into their stack first. References are read in place
    now, and the return list is checked before anything is readmitted."""
    packed, _ = stacked(registry, kind, "evolve")

    def used() -> int:
        return registry.capacity.owner_usage("me")["state_bytes"]

    full, versions = used(), [registry.describe(k)["version"] for k in packed]
    sent = tensors(registry, "p0", "evolve", (), seed=3)
    post = sent["post"][:1] if sent["post"].shape[0] > 1 else np.concatenate([sent["post"]] * 2)  # another batch
    for pre in (CompartmentRef("pre", packed[2].name), CompartmentRef("pre")):  # another member's, its own
        with pytest.raises(ShapeMismatch):
            registry.call(packed[1], "evolve", {"pre": pre, "post": post})
        assert all(stack_of(registry, k) is not None for k in packed) and used() == full
    registry.call(packed[3], "forward", tensors(registry, "p3", "forward", (), seed=4))  # taken out, answered
    assert stack_of(registry, packed[3]) is None
    out_of_stack = used()
    with pytest.raises(UnknownCompartment):
        registry.call_stacked(packed, "evolve", stacked_tensors(registry, "evolve", seed=5), ["no-such"])
    assert stack_of(registry, packed[3]) is None and used() == out_of_stack  # not readmitted by a refused call
    assert [registry.describe(k)["version"] for k in packed] == [*versions[:3], versions[3] + 1]
    # references to members answer as before, and leave the referenced member where it was
    answer = registry.call(packed[1], "evolve", {"pre": CompartmentRef("pre", packed[2].name),
                                                  "post": sent["post"]}, ["weights"])
    assert answer["version"] == versions[1] + 1 and stack_of(registry, packed[2]) is not None
