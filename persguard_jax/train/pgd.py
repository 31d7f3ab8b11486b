"""Projected sign-gradient steps as optax transforms: the optimizer of protective perturbations.

A protection (AdvDM, FSMG, ASPL, MetaCloak) treats the photos' pixels as the parameters and runs sign-PGD on them
(Madry et al., 2018): ``x <- clip(proj_ball(x + alpha sign(grad)), low, high)``. As optax transforms this is
``scale_by_sign`` then ``scale(-alpha)`` then ``project_linf``, a descent step: to maximise an objective, minimise
its negative. Any loop that takes an optax transform runs it (``train.unroll``, the engine's step).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def project(params: Any, origin: Any, radius: float, low: float = -1.0, high: float = 1.0) -> Any:
    """Every leaf clipped into the l_inf ball of ``radius`` around ``origin``'s leaf, then into ``[low, high]``
    (the released protections' order: the ball first, then the valid range)."""
    return jax.tree.map(lambda p, o: jnp.clip(jnp.clip(p, o - radius, o + radius), low, high), params, origin)


def project_linf(origin: Any, radius: float, low: float = -1.0, high: float = 1.0) -> optax.GradientTransformation:
    """Updates replaced by the ones that land the parameters on ``project(params + updates, ...)``. Needs
    ``params`` in ``update`` (optax's convention for transforms that read them). ``origin`` may be a traced array:
    build the transform inside the jitted function that owns it."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("project_linf needs the parameters: call update(updates, state, params)")
        landed = project(jax.tree.map(jnp.add, params, updates), origin, radius, low, high)
        return jax.tree.map(jnp.subtract, landed, params), state

    return optax.GradientTransformation(init, update)


def sign_pgd(step_size: float, origin: Any, radius: float, low: float = -1.0, high: float = 1.0
             ) -> optax.GradientTransformation:
    """One descent step of sign-PGD: ``x <- project(x - step_size * sign(grad))``. Stateless, so a run split
    into chunks equals the run in one piece."""
    return optax.chain(optax.scale_by_sign(), optax.scale(-step_size), project_linf(origin, radius, low, high))
