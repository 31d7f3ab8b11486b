"""The training state: one pytree that holds everything a resumed run needs, born sharded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from persguard_jax import sharding as shd


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """``step`` (int32 scalar), trainable ``params`` (nested dict), ``opt_state`` (optax), ``rng`` (raw key data,
    uint32, so Orbax stores it like any array; the step wraps it with the configured PRNG implementation) and
    ``ema`` (exponential moving average of ``params``, or None). Frozen parameters are not part of it: they come
    from the base model and are passed to the step separately."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema: Any = None


def init_state(params: Any, optimizer, *, seed: int = 0, ema: bool = False,
               rng_impl: str | None = None) -> TrainState:
    """A fresh state for ``params`` (call under ``jax.jit`` with ``out_shardings``: see ``create_state``)."""
    key = jax.random.key(seed, impl=rng_impl) if rng_impl else jax.random.key(seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(key), ema=jax.tree.map(jnp.copy, params) if ema else None)


def state_shardings(params_logical: Any, params_shapes: Any, optimizer, mesh, mesh_cfg: shd.MeshConfig | None = None,
                    *, ema: bool = False) -> TrainState:
    """The ``NamedSharding`` of every leaf of the state, from the parameters' logical axes: the optimizer's
    per-parameter statistics and the EMA are sharded like the parameters, step and rng replicated."""
    p_shard = shd.param_shardings(params_logical, params_shapes, mesh, mesh_cfg)
    rep = shd.replicated(mesh)
    return TrainState(step=rep, params=p_shard,
                      opt_state=shd.opt_state_shardings(optimizer, params_shapes, p_shard, mesh),
                      rng=rep, ema=p_shard if ema else None)


def create_state(params: Any, params_logical: Any, optimizer, mesh, mesh_cfg: shd.MeshConfig | None = None, *,
                 seed: int = 0, ema: bool = False, rng_impl: str | None = None) -> tuple[TrainState, TrainState]:
    """(state, shardings): the state created directly in its sharded layout (``jax.jit`` with
    ``out_shardings``; the optimizer moments are never materialised unsharded). ``params`` may be host arrays
    or already-sharded arrays."""
    def init(p):
        return init_state(p, optimizer, seed=seed, ema=ema, rng_impl=rng_impl)

    shardings = state_shardings(params_logical, jax.eval_shape(lambda p: p, params), optimizer, mesh, mesh_cfg,
                                ema=ema)
    state = jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params)
    return state, shardings
