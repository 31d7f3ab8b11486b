"""K optimizer steps whose exact (second-order) gradient takes memory that does not grow with K.

Reverse mode through ``train.unroll`` keeps every step's carry (the trained parameters and the optimizer state:
3x the parameters per step for AdamW, with ``remat``) or every step's activations too (without): for SD 1.5's UNet
the carry alone is ~10 GB per inner step. Here the backward pass keeps only the loop's inputs, which the caller
holds anyway, and replays the steps from them: to pull the cotangents back through step ``i`` it runs steps
``0 .. i-1`` forward again (no derivatives, one carry in place), then differentiates step ``i`` alone. It holds one
carry, its cotangents and one step's residuals, whatever K is, and the numbers are those of the stored scan.
The price is compute: K (K - 1) / 2 extra gradient evaluations (K = 2: 1, 4: 6, 8: 28) on top of a rematerialised
scan's; Griewank's binomial checkpointing ("revolve") would trade a few stored carries for less of it.

Tried first and dropped: running AdamW backwards (the moments after a step fix its direction, so parameters and
moments can be rebuilt from the next step's, as in Maclaurin, Duvenaud and Adams, ICML 2015). In float32 the
rebuilt moments of parameters whose early gradients are near Adam's eps lose their sign, and the outer gradient
was off by 60-700% at K = 4-8 on a small MLP (1e-5 in float64): Adam's first steps are sign-like, so rounding is
not a small perturbation of them.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zero_cotangent(x):
    """A zero cotangent: of ``x``'s dtype for floats, ``float0`` for integers and keys (JAX's rule)."""
    return jnp.zeros_like(x) if _is_float(x) else np.zeros(np.shape(x), jax.dtypes.float0)


def replay_unroll(loss_fn: LossFn, tx: optax.GradientTransformation, steps: int, *, per_step_data: bool = False
                  ) -> Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]:
    """``run(params, data, rng) -> (params_after, losses)``, the same function as ``train.unroll(loss_fn, tx,
    steps, order=2)`` (a fresh optimizer state, step ``i`` on ``fold_in(rng, i)``), with a reverse pass that replays
    the steps from the inputs instead of storing them (module docstring). ``losses[i]`` (the loss before update
    ``i``) is differentiated too, and so is whatever ``loss_fn`` closes over (frozen parts of a model that an outer
    objective trains: ``jax.closure_convert`` makes them explicit inputs). ``data`` and ``rng`` get zeros."""

    def batch_at(data, i):
        return jax.tree.map(lambda x: x[i], data) if per_step_data else data

    def run(params, data, rng):
        if steps == 0:
            return params, jnp.zeros((0,), jnp.float32)
        closed, consts = jax.closure_convert(loss_fn, params, batch_at(data, 0), rng)
        return _replayed(closed, tx, steps, batch_at)(params, list(consts), data, rng)

    return run


def _replayed(loss_fn, tx, steps, batch_at):
    """The custom-VJP loop over ``loss_fn(params, batch, rng, *consts)``; ``consts`` get their cotangents."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(p, state, i, consts, data, rng):
        (value, _), grads = grad_fn(p, batch_at(data, i), jax.random.fold_in(rng, i), *consts)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    def replay(params, consts, data, rng, n):
        """The carry (params, optimizer state) after the first ``n`` steps (``n`` traced)."""
        def body(i, carry):
            return step(*carry, i, consts, data, rng)[:2]
        return jax.lax.fori_loop(0, n, body, (params, tx.init(params)))

    def forward(params, consts, data, rng):
        def body(carry, i):
            p, state, value = step(*carry, i, consts, data, rng)
            return (p, state), value
        (p, _), values = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
        return (p, values), (params, consts, data, rng)

    def backward(residuals, cotangents):
        params, consts, data, rng = residuals
        ct_params, ct_values = cotangents
        state_def = jax.tree.structure(tx.init(params))

        def back(carry, xs):
            ct_p, ct_float, ct_consts = carry  # step i's output cotangents; the consts' accumulated so far
            i, ct_value = xs
            p, state = replay(params, consts, data, rng, i)
            leaves = jax.tree.leaves(state)
            floats = [x for x in leaves if _is_float(x)]

            def one(p, floats, consts):
                it = iter(floats)
                full = jax.tree.unflatten(state_def, [next(it) if _is_float(x) else x for x in leaves])
                p1, s1, value = step(p, full, i, consts, data, rng)
                return p1, [x for x in jax.tree.leaves(s1) if _is_float(x)], value

            _, pull = jax.vjp(one, p, floats, consts)
            ct_p, ct_float, ct_c = pull((ct_p, ct_float, ct_value))
            return (ct_p, ct_float, jax.tree.map(jnp.add, ct_consts, ct_c)), None

        zero_state = [jnp.zeros_like(x) for x in jax.tree.leaves(jax.eval_shape(tx.init, params)) if _is_float(x)]
        init = (ct_params, zero_state, jax.tree.map(jnp.zeros_like, consts))
        (ct_p, _, ct_consts), _ = jax.lax.scan(back, init, (jnp.arange(steps), ct_values), reverse=True)
        return ct_p, ct_consts, jax.tree.map(_zero_cotangent, data), jax.tree.map(_zero_cotangent, rng)

    @jax.custom_vjp
    def run(params, consts, data, rng):
        return forward(params, consts, data, rng)[0]

    run.defvjp(forward, backward)
    return run
