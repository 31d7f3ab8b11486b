"""A differentiable inner loop: K optimizer steps on a loss as one ``jax.lax.scan``, a pure function of its inputs.

PersGuard's unrolled retention loss, Anti-DreamBooth's surrogate fine-tuning and MAML-style immunisation all need
"the parameters after an attacker's K fine-tuning steps" inside an outer objective that is itself differentiated::

    inner = unroll(bind(dreambooth_loss, model=model, schedule=schedule), optax.adam(5e-6), steps=4, remat=True)
    def outer(params, batch, rng):
        tuned, history = inner(params, batch, rng)
        return backdoor_loss(tuned, batch, rng)       # jax.grad(outer) flows through the 4 steps

``order=2`` (exact): the outer gradient flows through every inner step, inner gradients included (Hessian-vector
products, i.e. double backprop). ``order=1`` (first-order MAML): each inner gradient is a constant
(``stop_gradient``), so for SGD or Adam d(params after)/d(params) is the identity and the outer gradient is the
outer objective's gradient at the fine-tuned parameters; whatever the transform does with the parameters
themselves (weight decay, a projection) is still differentiated. Data and randomness reach the outer gradient
only through the inner gradients, so with ``order=1`` nothing flows back to ``data``.

Memory: reverse-mode through a scan keeps each step's residuals. ``remat=True`` puts ``jax.checkpoint`` around the
step, so only the carry (parameters and optimizer state) is kept per step and each step's activations are
recomputed on the way back: memory grows with K times the parameters, not K times the activations.

Data parallelism: with ``data_parallel`` (replicated parameters, each step's batch split on its leading dimension)
every step's gradient is the engine's per-device one (``train.step.per_device_loss_and_grads``: each device on its
share, one ``psum`` of the raveled gradient), not GSPMD's one all-reduce per parameter, which made three
DreamBooth steps of the world model on 2 CPU devices 1.6x slower than one device alone (docs/benchmarks.md, ASPL).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from persguard_jax.train.optim import Optimizer, OptimizerConfig, resolve_optimizer
from persguard_jax.train.replay import replay_unroll
from persguard_jax.train.step import DataParallel, LocalReductionError, StepConfig, per_device_loss_and_grads

InnerLoop = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]


def unroll(loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]], optimizer: Optimizer, steps: int, *,
           order: int = 2, remat: bool = False, per_step_data: bool = False, scan_unroll: int | bool = 1,
           data_parallel: DataParallel | None = None, replay: bool = False) -> InnerLoop:
    """``run(params, data, rng) -> (params_after, losses)``: ``steps`` updates of ``params`` by ``optimizer`` (an
    optax transform, or an ``OptimizerConfig``; its state starts fresh at every call) on ``loss_fn(params, batch,
    rng) -> (loss, aux)``, as one ``jax.lax.scan``. ``losses[i]`` is the loss before update ``i``.

    Step ``i`` draws from ``jax.random.fold_in(rng, i)`` and trains on ``data`` (one batch, closed over rather
    than copied per step) or, with ``per_step_data``, on ``data[i]`` (every leaf has a leading ``steps`` axis).
    ``order``: 2 differentiates through the inner gradients, 1 treats them as constants (module docstring).
    ``remat`` rematerialises each step in the backward pass. ``scan_unroll`` is ``jax.lax.scan``'s ``unroll``:
    ``True`` lays the steps out in a line, so XLA updates the carried parameters and optimizer state in place
    instead of copying the loop's carry every step (on XLA:CPU the rolled loop made K = 8 first-order steps of the
    world model 1.7x slower than K jitted steps; docs/benchmarks.md); compilation grows with ``steps``.
    ``data_parallel`` (first order only): each step's gradient per device on its share of the step's batch, whose
    leaves are split as ``data_parallel.batch_specs`` say (module docstring); a loss that reduces over one share
    alone falls back to the plain gradient with a warning, as the training step does.
    ``replay`` (order 2): the backward pass keeps only the inputs and replays the steps from them instead of
    storing each step's carry (``train.replay``): memory that does not grow with ``steps``, at steps (steps - 1) / 2
    extra gradient evaluations; ``remat`` and ``scan_unroll`` do not apply, ``data`` gets no gradient.
    An ``OptimizerConfig`` at order 2 gets ``eps_root = eps ** 2`` unless it sets its own (AdamW's square root has
    an infinite derivative at a zero second moment); an optax transform at order 2 must be differentiable itself
    (``optax.adam(..., eps_root=...)``).
    ``run`` is pure: jit, grad, vmap it."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (first-order, inner gradients constant) or 2 (exact), got {order!r}")
    if data_parallel is not None and order != 1:
        raise ValueError("unroll: data_parallel computes first-order steps only (order=1)")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if order == 2 and isinstance(optimizer, OptimizerConfig) and optimizer.eps_root == 0:
        # differentiable AdamW: sqrt(v + eps_root) has a finite derivative at v = 0 (parameters with a zero
        # gradient); eps ** 2 moves an update by at most eps in its denominator. An optax transform is the caller's.
        optimizer = dataclasses.replace(optimizer, eps_root=max(optimizer.eps, 1e-8) ** 2)
    if replay:
        if order != 2 or data_parallel is not None:
            raise ValueError("unroll: replay differentiates exact second-order steps (order=2, no data_parallel)")
        return replay_unroll(loss_fn, resolve_optimizer(optimizer)[0], steps, per_step_data=per_step_data)
    tx, _ = resolve_optimizer(optimizer)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def run(params: Any, data: Any, rng: jax.Array) -> tuple[Any, jax.Array]:
        if per_step_data and any(jnp.shape(x)[:1] != (steps,) for x in jax.tree.leaves(data)):
            raise ValueError(f"per_step_data: every data array needs a leading dimension of {steps} (the steps)")

        def step(carry, xs):
            p, opt_state = carry
            i, batch = xs if per_step_data else (xs, data)
            key = jax.random.fold_in(rng, i)
            grads = None
            if data_parallel is not None:
                try:
                    value, _, grads = per_device_loss_and_grads(loss_fn, p, {}, batch, key, StepConfig(),
                                                                data_parallel)
                except LocalReductionError as e:
                    warnings.warn(f"{e}; these inner steps take the plain gradient instead", stacklevel=2)
            if grads is None:
                (value, _), grads = grad_fn(p, batch, key)
            if order == 1:
                grads = jax.lax.stop_gradient(grads)
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), value

        body = jax.checkpoint(step) if remat else step
        xs = (jnp.arange(steps), data) if per_step_data else jnp.arange(steps)
        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), xs, unroll=scan_unroll)
        return params, losses

    return run
