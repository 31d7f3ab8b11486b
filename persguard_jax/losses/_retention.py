"""Retention: objectives about what an attacker's later fine-tuning will do to the parameters (PersGuard's L_br).

Two building blocks, both pure ``(params, batch, rng) -> (loss, aux)`` losses that wrap other losses:

- ``gradient_penalty(loss_fn, wrt)``: ``||d loss_fn / d params[wrt]||^2``, the squared norm of the gradient an
  attacker's first step would follow (double backprop: ``jax.grad`` of it differentiates through ``jax.grad``).
  A small value means fine-tuning on that loss starts with little to change.
- ``after_finetuning(inner, outer)``: ``outer(inner(params, data))``, an objective evaluated at the parameters an
  inner loop (``train.unroll`` / ``dreambooth.finetune``: K of the attacker's steps) reaches. Whether the outer
  gradient flows through the inner steps exactly or first-order is the inner loop's choice (its ``order``).

The third formulation PersGuard's retention is read as, "mirror" (minimise the attacker's own loss now), needs no
new piece: it is the attacker's loss on the attacker's data, ``on("attack", dreambooth_loss)``.

The inner loop is a plain callable here, so the loss library stays below the engine that builds it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from persguard_jax.losses._base import Aux, LossFn

InnerLoop = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]


def _split(params: dict, wrt: Sequence[str]) -> tuple[dict, dict]:
    missing = [k for k in wrt if k not in params]
    if missing:
        raise KeyError(f"gradient_penalty: no parameters {missing} to differentiate; have {sorted(params)}")
    return {k: params[k] for k in wrt}, {k: v for k, v in params.items() if k not in wrt}


def gradient_penalty(loss_fn: LossFn, *, wrt: str | Sequence[str] = ("unet",)) -> LossFn:
    """``||grad_{params[wrt]} loss_fn(params, batch, rng)||^2`` (sum of squares over every leaf of the named
    top-level entries). aux: ``loss`` (the penalty), ``inner_loss`` (the wrapped loss's value) and ``grad_norm``.
    Differentiating this loss is a Hessian-vector product of ``loss_fn``: about three times its cost."""
    names = (wrt,) if isinstance(wrt, str) else tuple(wrt)

    def fn(params, batch, rng):
        sub, rest = _split(params, names)
        value, grads = jax.value_and_grad(lambda s: loss_fn({**rest, **s}, batch, rng)[0])(sub)
        penalty = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
        return penalty, {"loss": penalty, "inner_loss": value, "grad_norm": jnp.sqrt(penalty)}
    return fn


def after_finetuning(inner: InnerLoop, outer: LossFn, *, inner_key: str, outer_key: str | None = None) -> LossFn:
    """``outer(params_after, batch[outer_key])`` where ``params_after, history = inner(params, batch[inner_key])``:
    an objective at the parameters the attacker's fine-tuning reaches (``outer_key`` default: the whole batch).
    aux: the outer loss's scalars, and the inner loop's loss at its first and last step (``inner_first``,
    ``inner_last``)."""
    def fn(params, batch, rng):
        k_inner, k_outer = jax.random.split(rng)
        tuned, history = inner(params, batch[inner_key], k_inner)
        loss, aux = outer(tuned, batch if outer_key is None else batch[outer_key], k_outer)
        return loss, _outer_aux(loss, aux, history)
    return fn


def _outer_aux(loss: jax.Array, aux: Aux, history: jax.Array | None) -> Aux:
    """The outer loss's scalars, and the inner loop's loss at its first and last step."""
    out: Aux = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
    if history is not None and jnp.size(history):
        out.update(inner_first=history[0], inner_last=history[-1])
    return {**out, "loss": loss}


# Where parameters that an inner loop computed outside the loss's program reach it: ``params[TUNED][name]`` (the
# trained entries after the loop) and ``params[TUNED_LOSSES][name]`` (its loss before each of its steps). The
# engine's dispatched first-order steps (``train.dispatch.InnerSteps``) put them there.
TUNED = "tuned"
TUNED_LOSSES = "tuned_losses"


def at_tuned(outer: LossFn, name: str, *, trains: Sequence[str]) -> LossFn:
    """``outer`` at parameters an inner loop computed outside this program, first order: the entries ``trains`` of
    ``params`` replaced by ``params[TUNED][name]`` in value, while the gradient passes straight to ``params`` (the
    identity as d(tuned)/d(params): ``after_finetuning`` with an ``order=1`` loop, without the loop in the
    program). aux: as ``after_finetuning`` (``inner_first`` / ``inner_last`` from ``params[TUNED_LOSSES][name]``)."""
    trains = tuple(trains)

    def fn(params, batch, rng):
        tuned = params[TUNED][name]
        base = {k: v for k, v in params.items() if k not in (TUNED, TUNED_LOSSES)}
        moved = {k: jax.tree.map(lambda p, t: p + (t - jax.lax.stop_gradient(p)), base[k], tuned[k])
                 for k in trains}
        _, k_outer = jax.random.split(rng)
        loss, aux = outer({**base, **moved}, batch, k_outer)
        return loss, _outer_aux(loss, aux, params.get(TUNED_LOSSES, {}).get(name))
    return fn
