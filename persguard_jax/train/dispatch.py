"""First-order inner loops dispatched ahead of the step: K of an attacker's updates, each its own jitted program.

A first-order inner loop (``unroll(order=1)``) differentiates nothing through its K steps: the outer objective
needs only the parameters they reach. So the steps need not sit inside the outer step's program. On XLA:CPU with
two cores they cost 1.1-1.3x more there than the same steps dispatched one by one (the laid-out program leaves
less to run concurrently; docs/benchmarks.md, the implantation step), which kept PersGuard's unrolled step above
1.2x the K attacker steps it simulates. ``InnerSteps`` runs them before each step instead, as separate programs
on the step's parameters, and hands the result to the step's loss through the frozen tree, where
``losses.at_tuned`` reads it::

    inner = InnerSteps({"protected": (attack_loss, "attack")}, trains=("unet", "text_encoder"),
                       optimizer=OptimizerConfig(learning_rate=5e-6), steps=8)
    loss_fn = losses.at_tuned(backdoor_loss, "protected", trains=inner.trains)   # + the other terms
    fit(loss_fn, ..., before_step=inner)

Each run trains the entries ``trains`` of the step's parameters (trainable and frozen merged) on its own entry of
the step's batch, from a fresh optimizer state, with keys folded from the step's key: a resumed run draws what an
uninterrupted one draws. Each update computes its gradient as the engine's step does
(``train.step.loss_and_grads`` with the ``step`` config given: the parameters cast to ``compute_dtype`` for the
loss, ``grad_accum`` micro-batches) and applies it to float32 copies. Where an in-program loop under a
``grad_accum`` > 1 step runs its K steps on each micro-batch's share, these run on the whole batch entry.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from persguard_jax.losses import TUNED, TUNED_LOSSES
from persguard_jax.models.functional import merge
from persguard_jax.sharding import opt_state_shardings
from persguard_jax.train.optim import Optimizer, resolve_optimizer
from persguard_jax.train.step import StepConfig, loss_and_grads

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
_SALT = 0x1D15  # the inner keys' stream, apart from the step's own fold_in(rng, step)


class InnerSteps:
    """``steps`` updates by ``optimizer`` of the parameters' entries ``trains``, once per run of ``runs`` (name ->
    (loss, the batch entry it trains on)), before each step, their gradients computed as ``step`` (the engine's
    step config: compute dtype, micro-batches) says; ``__call__`` returns the frozen tree's additions
    (``losses.TUNED`` and ``losses.TUNED_LOSSES``, keyed by run name)."""

    def __init__(self, runs: Mapping[str, tuple[LossFn, str]], *, trains: Sequence[str], optimizer: Optimizer,
                 steps: int, step: StepConfig | None = None):
        if steps < 1:
            raise ValueError(f"InnerSteps: steps must be >= 1, got {steps}")
        if not runs:
            raise ValueError("InnerSteps: no runs")
        self.runs, self.trains, self.steps = dict(runs), tuple(trains), steps
        self.tx = tx = resolve_optimizer(optimizer)[0]

        # Everything of a run is in its programs, the keys included (an eager op costs a dispatch of its own):
        # a fresh copy of the trained entries (the step's parameters must survive: the updates consume their
        # inputs), a fresh optimizer state and the run's key; then one program per update.
        def start(train, rng, step, run, rng_impl=None):
            raw = jax.random.wrap_key_data(rng, impl=rng_impl) if rng_impl else jax.random.wrap_key_data(rng)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(raw, step), _SALT), run)
            return jax.tree.map(jnp.copy, train), tx.init(train), key

        self._start = jax.jit(start, static_argnames="rng_impl")
        # one jitted update per loss, not per run: runs of one loss (the attacker on protected and unprotected
        # photos) share its compiled program
        updates: dict[Any, Callable] = {}
        for loss_fn, _ in self.runs.values():
            if loss_fn not in updates:
                updates[loss_fn] = jax.jit(self._update_fn(loss_fn, tx, step or StepConfig()),
                                           donate_argnums=(0, 1))
        self._update = {name: updates[loss_fn] for name, (loss_fn, _) in self.runs.items()}

    @staticmethod
    def _update_fn(loss_fn: LossFn, tx: optax.GradientTransformation, cfg: StepConfig) -> Callable:
        def update(train, opt_state, rest, batch, key, i):
            value, _, grads = loss_and_grads(loss_fn, train, rest, batch, jax.random.fold_in(key, i), cfg)
            updates, opt_state = tx.update(grads, opt_state, train)
            return optax.apply_updates(train, updates), opt_state, value
        return update

    def shardings(self, param_shardings: Any, frozen_shardings: Any) -> dict:
        """The shardings of what ``__call__`` adds to the frozen tree: each run's tuned entries laid out as the
        step's parameters are, its losses replicated."""
        train, _ = self._split(param_shardings, frozen_shardings)
        return {TUNED: {name: train for name in self.runs},
                TUNED_LOSSES: {name: NamedSharding(_mesh_of(train), P()) for name in self.runs}}

    def _split(self, params: Any, frozen: Any) -> tuple[dict, dict]:
        """(the entries the runs train, everything else) of the step's parameters and frozen tree merged (or of
        their shardings): a top-level split, cheap enough for every step (``models.functional.partition`` walks
        every leaf). KeyError naming what is missing when an entry to train is in neither."""
        full = merge(params, frozen)
        missing = [k for k in self.trains if k not in full]
        if missing:
            raise KeyError(f"InnerSteps: no parameters {missing} to train; have {sorted(full)}")
        return {k: full[k] for k in self.trains}, {k: v for k, v in full.items() if k not in self.trains}

    def abstract(self, params: Any, frozen: Any) -> dict:
        """What ``__call__`` adds to the frozen tree, as ``jax.ShapeDtypeStruct`` (for ahead-of-time plans)."""
        tuned = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._split(params, frozen)[0])
        return {TUNED: {name: tuned for name in self.runs},
                TUNED_LOSSES: {name: jax.ShapeDtypeStruct((self.steps,), jnp.float32) for name in self.runs}}

    def lower_update(self, name: str, params: Any, frozen: Any, batch: Mapping[str, Any]) -> tuple[Any, Any]:
        """(run ``name``'s update program lowered, its optimizer state as ``ShapeDtypeStruct`` with shardings)
        for the step's abstract parameters, frozen tree and batch (``ShapeDtypeStruct`` with shardings): what a
        memory plan compiles. The optimizer state is laid out as its parameters (``sharding.opt_state_shardings``,
        the engine's rule; ``__call__`` leaves it to GSPMD's propagation from them)."""
        train, rest = self._split(params, frozen)
        train_sh = jax.tree.map(lambda x: x.sharding, train)
        mesh = _mesh_of(train_sh)
        opt_shapes = jax.eval_shape(self.tx.init, train)
        opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_shapes,
                                 opt_state_shardings(self.tx, train, train_sh, mesh))
        rep = NamedSharding(mesh, P())
        key = jax.eval_shape(lambda: jax.random.key(0))
        lowered = self._update[name].lower(
            train, opt_state, rest, batch[self.runs[name][1]], jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
        return lowered, opt_state

    def __call__(self, state: Any, frozen: Any, batch: Mapping[str, Any], *, rng_impl: str | None = None) -> dict:
        train, rest = self._split(state.params, frozen)
        tuned, history = {}, {}
        for j, (name, (_, entry)) in enumerate(self.runs.items()):
            if entry not in batch:
                raise KeyError(f"InnerSteps: run {name!r} trains on batch entry {entry!r}; have {sorted(batch)}")
            p, opt_state, key = self._start(train, state.rng, state.step, np.int32(j), rng_impl=rng_impl)
            values = []
            for i in range(self.steps):
                p, opt_state, value = self._update[name](p, opt_state, rest, batch[entry], key, np.int32(i))
                values.append(value)
            tuned[name], history[name] = p, jnp.stack(values)
        return {TUNED: tuned, TUNED_LOSSES: history}


def _mesh_of(shardings: Any):
    """The mesh of the first ``NamedSharding`` in a tree of shardings."""
    return next(s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding))


def with_inner_steps(step_fn: Callable, inner: InnerSteps, *, rng_impl: str | None = None) -> Callable:
    """``step(state, frozen, batch)`` that runs ``inner`` first and gives ``step_fn`` its result in the frozen
    tree (``step_fn`` compiled for those additions: ``InnerSteps.shardings``)."""
    def step(state, frozen, batch):
        return step_fn(state, {**frozen, **inner(state, frozen, batch, rng_impl=rng_impl)}, batch)
    return step
