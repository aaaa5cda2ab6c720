"""What a call will do, known before it runs: its arguments bound and checked, its sequence options, the
compartments it may return, and its plan — the state it leaves (shapes and bytes) and the program to run.

The registry's calls and packed calls (``local/registry.py``, ``local/packing.py``) ask a ``Planner``
all of this before they touch an instance's state: the arguments are bound before its lock is taken,
the plan (which depends on the compartment shapes the instance has now) under it. A planner never
touches an instance's state or version; what it learns once per shapes it remembers in the instance's
plans (``Instance.plans``) and, shared by equal configs, in its own, so a thousand instances of one
config trace once.
"""

from __future__ import annotations

import functools
import heapq
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from synapse_serve.errors import InvalidConfig, InvalidFields, InvalidRequest, MissingArgument, ShapeMismatch
from synapse_serve.kinds import lean
from synapse_serve.kinds.base import check_finite, check_tensor, leaf_names, require_int, unknown_compartment
from synapse_serve.kinds.sequence import sequence_fn
from synapse_serve.local.capacity import Capacity
from synapse_serve.local.instance import Instance, nbytes_of, plain_option, signature_of
from synapse_serve.names import CompartmentRef

_FLOAT32 = np.dtype(np.float32)
PREDICTIONS_KEPT = 4096  # (operation, config, shapes) -> the state a call leaves: one trace each


def _float32_shapes(tensors: Mapping[str, Any]) -> tuple | None:
    """``((name, shape), …)`` of tensors that are all float32 numpy arrays, else None (checked each time)."""
    shapes = []
    for name, value in tensors.items():
        if type(value) is not np.ndarray or value.dtype != _FLOAT32:
            return None
        shapes.append((name, value.shape))
    return tuple(shapes)


class Planner:
    """Binds, checks and plans calls against ``capacity``'s limits; the plans of equal configs are shared."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self._predictions: OrderedDict[tuple, tuple] = OrderedDict()
        self._predictions_lock = threading.Lock()

    def bind(self, instance: Instance, op: Any, tensors: Mapping[str, Any]) -> tuple[list[Any], int]:
        """The operation's arguments in order, sent tensors checked (shape, dtype, one batch, max_batch), and the
        number of steps: 0 for one call, T when the tensors carry a leading time axis ``(T, batch, …)``.

        The checks depend only on the names, shapes and dtypes sent (the instance's config and the limits do not
        change), and float32 arrays pass them unchanged: arguments of shapes that passed once on this instance
        are not checked again."""
        shapes = _float32_shapes(tensors)
        if shapes is not None:
            steps = instance.plans.get(("bound", op.name, shapes))
            if steps is not None:
                for name, value in tensors.items():  # the values are new every time: checked every time
                    check_finite(name, value)
                return [tensors.get(a.name) for a in op.args], steps
        args, steps = self._check_args(instance, op, tensors)
        if shapes is not None:
            instance.remember_plan(("bound", op.name, shapes), steps)
        return args, steps

    @staticmethod
    def check_returned(instance: Instance, returned: list[str]) -> None:
        """UnknownCompartment unless the instance has every compartment asked for (its structure never changes:
        names that passed once pass again)."""
        asked = ("returns", *returned)
        if asked in instance.plans:
            return
        names = leaf_names(jax.tree_util.tree_structure(instance.layout()))
        for compartment in returned:
            if compartment not in names:
                raise unknown_compartment(instance.kind, compartment, names, "cannot return")
        instance.remember_plan(asked, True)

    def _check_args(self, instance: Instance, op: Any, tensors: Mapping[str, Any]) -> tuple[list[Any], int]:
        allowed = [a.name for a in op.args]
        unknown = set(tensors) - set(allowed)
        if unknown:
            named = heapq.nsmallest(8, (str(name)[:64] for name in unknown))  # an echo, bounded
            raise InvalidFields(f"{op.name} takes {', '.join(allowed) or 'no tensors'}; unknown: "
                                f"{', '.join(named)}{', …' if len(unknown) > 8 else ''}", argument=named[0])
        sent = {a.name: tensors.get(a.name) for a in op.args}
        timed = [a.name for a in op.args if sent[a.name] is not None and not isinstance(sent[a.name], CompartmentRef)
                 and np.ndim(sent[a.name]) == 2 + len(instance.config.trailing(a.space))]
        steps = 0
        if timed:
            refs = [name for name, value in sent.items() if isinstance(value, CompartmentRef)]
            if refs:
                raise InvalidRequest(f"{refs[0]}: a sequence call (tensors with a leading time axis) takes tensors, "
                                     "not references", argument=refs[0])
            steps = int(np.shape(sent[timed[0]])[0])
            if not steps:
                raise ShapeMismatch(f"{timed[0]}: a sequence of 0 steps (shape {tuple(np.shape(sent[timed[0]]))}); "
                                    "send at least one step", argument=timed[0])
        args: list[Any] = []
        for arg in op.args:
            value = sent[arg.name]
            if value is None and not arg.optional:
                raise MissingArgument(f"{op.name} needs the tensor {arg.name!r} "
                                      f"({'inputs' if arg.space == 'in' else 'outputs'}-shaped: "
                                      f"({'steps, ' if steps else ''}batch, "
                                      f"{', '.join(map(str, instance.config.trailing(arg.space)))}))",
                                      argument=arg.name)
            if value is not None and not isinstance(value, CompartmentRef):
                value = check_tensor(arg.name, value, instance.config.trailing(arg.space), steps=bool(steps))
            args.append(value)
        self.check_batches(instance, op, args, steps)
        return args, steps

    def check_batches(self, instance: Instance, op: Any, args: list[Any], steps: int = 0) -> None:
        """Arguments (sent or resolved): each shaped for its map, all of one batch (and of ``steps`` steps in a
        sequence), within max_batch."""
        batch, lead = None, 2 if steps else 1
        for arg, value in zip(op.args, args):
            if value is None or isinstance(value, CompartmentRef):
                continue
            trailing = tuple(instance.config.trailing(arg.space))
            shown = f"({'steps, ' if steps else ''}batch, {', '.join(map(str, trailing))})"
            if tuple(value.shape[lead:]) != trailing or value.ndim != lead + len(trailing):
                raise ShapeMismatch(f"{arg.name}: expected shape {shown}, received {tuple(value.shape)}",
                                    argument=arg.name)
            if steps and value.shape[0] != steps:
                raise ShapeMismatch(f"{arg.name}: expected {steps} steps (as the arguments before it), received "
                                    f"{value.shape[0]}", argument=arg.name)
            if batch is not None and value.shape[lead - 1] != batch:
                raise ShapeMismatch(f"{arg.name}: expected batch {batch} (as the arguments before it), received "
                                    f"{value.shape[lead - 1]}", argument=arg.name)
            batch = value.shape[lead - 1]
            self.capacity.check_batch(arg.name, batch, steps)

    def sequence(self, op: Any, args: list[Any], steps: int, returned: list[str],
                  options: Mapping[str, Any] | None) -> tuple[Callable[..., Any], int]:
        """The compiled sequence of ``steps`` runs of ``op`` (options checked: every, last), and how many times its
        answer holds the returned compartments."""
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            raise InvalidRequest("sequence: expected a map {every?, last?}", argument="sequence")
        options = {name: plain_option(value) for name, value in options.items()}  # a 0-d tensor as its number
        unknown = set(options) - {"every", "last"}
        if unknown:
            raise InvalidRequest(f"sequence: unknown option {sorted(map(str, unknown))[0][:40]!r}; it takes every "
                                 "(return after every k-th step) and last (return after the last step only)",
                                 argument="sequence")
        if not steps:
            raise InvalidRequest(f"sequence: {op.name} was sent no tensor with a leading time axis; send "
                                 "(steps, batch, …) tensors to run steps in one call", argument="sequence")
        last = options.get("last", False)
        if not isinstance(last, bool):
            raise InvalidRequest(f"sequence.last: expected true or false, received {str(last)[:40]!r}",
                                 argument="sequence")
        every = options.get("every", 1)
        try:
            every = require_int("sequence.every", every, 1, steps)
        except InvalidConfig as exc:
            in_range = isinstance(every, int) and not isinstance(every, bool)  # a number of steps, too many or few
            raise InvalidRequest(f"{exc.detail}{' (the steps sent)' if in_range else ''}",
                                 argument="sequence") from None
        if last and "every" in options:
            raise InvalidRequest("sequence: give every or last, not both", argument="sequence")
        return sequence_fn(op.fn, tuple(returned), every, last), 1 if last else steps // every

    def check_sequence_answer(self, instance: Instance, returned: list[str], signature: tuple, kept: int,
                               steps: int) -> None:
        """A sequence's answer (each returned compartment ``kept`` times) within max_answer_bytes and the quota."""
        names = leaf_names(jax.tree_util.tree_structure(instance.layout()))
        sizes = dict(zip(names, (math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in signature)))
        one = sum(sizes[c] for c in returned)
        how = f"{', '.join(returned)}: {one} bytes, kept {kept} times of {steps} steps"
        self.capacity.check_answer(instance.key.owner, kept * one, how,
                                   "split the sequence" if kept == 1 else "use sequence every=k or last")

    def predict(self, instance: Instance, operation: str, fn: Callable[..., Any], args: list[Any]
                 ) -> tuple[tuple, int, Callable[..., Any], lean.Plan | None]:
        """The compartment shapes and bytes the call will leave, what to run (an operation's plan: only the
        compartments it touches, ``kinds/lean.py``; or a sequence) and the plan. Traced once per shapes."""
        shapes = tuple(None if a is None else (a.shape, a.dtype) for a in args)
        own = (operation, fn, instance.signature, shapes)  # the instance's own plans: no config to hash
        known = instance.plans.get(own)
        if known is not None:
            return known
        key = (operation, fn, instance.config, instance.signature, shapes)
        with self._predictions_lock:
            known = self._predictions.get(key)
            if known is not None:
                self._predictions.move_to_end(key)
                instance.remember_plan(own, known)
                return known
        if fn is instance.kind.operations[operation].fn:
            plan = lean.plan(fn, instance.config, instance.layout(), *args)
            signature, runner = plan.out_signature, plan.run
        else:  # a sequence: (state, kept)
            signature = signature_of(jax.eval_shape(functools.partial(fn, instance.config), instance.layout(), *args)[0])
            plan, runner = None, fn
        known = (signature, nbytes_of(signature), runner, plan)
        instance.remember_plan(own, known)
        with self._predictions_lock:
            self._predictions[key] = known
            while len(self._predictions) > PREDICTIONS_KEPT:
                self._predictions.popitem(last=False)
        return known
