"""One jitted training step per recipe and process: ``fit`` reuses the step of an earlier call that would be the
same program instead of tracing, lowering and compiling it again.

``make_train_step`` wraps a new closure in a new ``jax.jit`` at every call, and jit's caches are keyed on the
function object, so a process that trains the same recipe twice built its step twice: the implant check's
attacker runs (one DreamBooth per subject, on the backdoored and on the clean model), the experiments' subject
loops, a test suite calling the commands in one process. On the world recipe that was 21-25 s per run without
the persistent compilation cache and 5-6 s with it (tracing, lowering and reading the executable back);
docs/benchmarks.md.

``value_key`` makes the arguments of ``make_train_step`` comparable by value: a loss from ``losses.bind`` (a
``functools.partial``), closures over configs, NNX graph definitions and small arrays (the noise schedule, by
content), an optimizer config or optax transform, the shardings. Anything it cannot compare by value (an object
whose equality is identity and which jax cannot flatten, a tracer, more than ``MAX_ARRAY_BYTES`` of arrays in
all: a closed-over model's weights) makes the key None, and the step is built afresh as before: a miss costs
time, never correctness. Like ``jax.jit`` itself, a reused step does not see a module-level name rebound after
its first trace (a monkeypatched global); build the step with ``make_train_step`` directly where that matters.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hashlib
import types
from typing import Any, Callable, Hashable

import jax
import numpy as np

from persguard_jax.train.step import StepConfig, make_train_step

MAX_ARRAY_BYTES = 1 << 22  # arrays hashed by content, all together (a schedule is 20 KB): more is not keyed
MAX_STEPS = 8              # jitted steps kept per process (least recently used dropped first)

_STEPS: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()


class _Unkeyable(Exception):
    """Raised inside ``value_key`` for a value that cannot be compared by value."""


def value_key(obj: Any) -> Hashable | None:
    """A hashable key equal for values that make the same traced program, or None when ``obj`` holds something
    that cannot be compared by value (module docstring)."""
    try:
        return _key(obj, frozenset(), [MAX_ARRAY_BYTES])
    except _Unkeyable:
        return None


def _key(obj: Any, seen: frozenset, budget: list[int]) -> Hashable:
    if isinstance(obj, (float, complex)):  # repr keeps -0.0 apart from 0.0 (1 / x differs) and is exact
        return type(obj).__name__, repr(obj)
    if obj is None or isinstance(obj, (bool, int, str, bytes, type)):
        return type(obj).__name__, obj  # the type keeps 1, 1.0 and True apart
    if isinstance(obj, enum.Enum):
        return type(obj), obj.name
    if isinstance(obj, jax.core.Tracer):
        raise _Unkeyable
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        budget[0] -= obj.nbytes
        if budget[0] < 0:  # hashing a model's weights would cost more than tracing it again
            raise _Unkeyable
        kind = str(obj.dtype)  # a typed PRNG key (key<fry>) is keyed by its implementation and its bits
        if jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
            obj = jax.random.key_data(obj)
        a = np.ascontiguousarray(jax.device_get(obj))
        return "array", a.shape, kind, hashlib.sha256(a.tobytes()).hexdigest()
    if id(obj) in seen:  # a cycle (a closure that refers to itself)
        raise _Unkeyable
    seen = seen | {id(obj)}
    key = functools.partial(_key, seen=seen, budget=budget)
    if isinstance(obj, functools.partial):
        return ("partial", key(obj.func), tuple(map(key, obj.args)),
                tuple(sorted((k, key(v)) for k, v in obj.keywords.items())))
    if isinstance(obj, types.FunctionType):
        try:
            cells = tuple(key(c.cell_contents) for c in obj.__closure__ or ())
        except ValueError:  # an empty cell: a closure variable not assigned yet
            raise _Unkeyable from None
        # the code object compares by value (bytecode, constants, names); globals are the module's, as for jit
        return ("function", obj.__module__, obj.__qualname__, obj.__code__, key(obj.__defaults__),
                key(obj.__kwdefaults__), cells)
    if isinstance(obj, types.MethodType):
        return "method", key(obj.__self__), key(obj.__func__)
    if isinstance(obj, (tuple, list)):  # NamedTuples keep their type
        return type(obj), tuple(map(key, obj))
    if isinstance(obj, dict):
        return type(obj), tuple((key(k), key(v)) for k, v in obj.items())
    if type(obj).__eq__ is not object.__eq__ and not dataclasses.is_dataclass(obj):
        try:  # a value with its own equality and hash: a sharding, a mesh, a partition spec
            hash(obj)
            return type(obj), obj
        except TypeError:
            pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # configs, NNX graph definitions
        return type(obj), tuple((f.name, key(getattr(obj, f.name))) for f in dataclasses.fields(obj))
    leaves, treedef = jax.tree.flatten(obj)
    if len(leaves) == 1 and leaves[0] is obj:  # a leaf jax knows nothing more about: identity only
        raise _Unkeyable
    try:
        hash(treedef)
    except TypeError:
        raise _Unkeyable from None
    return "pytree", treedef, tuple(map(key, leaves))


def cached_train_step(loss_fn: Callable, optimizer: Any, *, state_shardings: Any, frozen_shardings: Any,
                      batch_shardings: Any, cfg: StepConfig = StepConfig(), lr_schedule: Any = None) -> Callable:
    """``make_train_step`` with these arguments, or the step an earlier call with equal arguments built (module
    docstring). The state is donated, as ``make_train_step``'s default."""
    args = dict(loss_fn=loss_fn, optimizer=optimizer, state_shardings=state_shardings,
                frozen_shardings=frozen_shardings, batch_shardings=batch_shardings, cfg=cfg, lr_schedule=lr_schedule)
    key = value_key(tuple(args.items()))
    if key is not None and key in _STEPS:
        _STEPS.move_to_end(key)
        return _STEPS[key]
    step = make_train_step(loss_fn, optimizer, state_shardings=state_shardings, frozen_shardings=frozen_shardings,
                           batch_shardings=batch_shardings, cfg=cfg, lr_schedule=lr_schedule)
    if key is not None:
        _STEPS[key] = step
        while len(_STEPS) > MAX_STEPS:
            _STEPS.popitem(last=False)
    return step


def clear_step_cache() -> None:
    """Forget every kept step (their compiled programs are freed with them)."""
    _STEPS.clear()
