"""The step factory: any pure loss becomes one jitted, donated, sharded training step.

``make_train_step(loss_fn, optimizer, ...)`` returns ``step(state, frozen, batch) -> (state, metrics)``:

- ``loss_fn(params, batch, rng) -> (loss, aux)`` sees the full parameters: the trainable ones from the state
  merged with ``frozen`` (which is only read, never differentiated).
- Mixed precision: with ``compute_dtype`` (e.g. bfloat16) the parameters are cast before the loss; the state
  keeps float32 master weights and the cast's transpose brings float32 gradients back. Casting before use also
  halves the bytes FSDP all-gathers.
- Gradient accumulation: the batch is cut into ``grad_accum`` micro-batches scanned with ``jax.lax.scan``
  (one optimizer update, the activation memory of one micro-batch).
- The optimizer is any optax ``GradientTransformation`` (a PGD sign step with projection, an ascent step) or an
  ``OptimizerConfig`` (clipping, AdamW, schedule: ``optim.make_optimizer``). The learning rate of each update is
  logged as ``learning_rate``: the config's schedule, or ``lr_schedule`` given with a transform.
- EMA of the trainable parameters when the state has one.
- Rematerialisation is a property of the modules (``models.remat``): set it before splitting the model.

The returned function is ``jax.jit`` with in/out shardings and ``donate_argnums=0``; ``step.lower(state,
frozen, batch).compile()`` compiles ahead of time (and ``.memory_analysis()`` reports its memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from persguard_jax.config import Section
from persguard_jax.losses import scalar_metrics
from persguard_jax.models.functional import cast_floating, merge
from persguard_jax.train.optim import Optimizer, resolve_optimizer
from persguard_jax.train.state import TrainState


@dataclass(frozen=True)
class StepConfig(Section):
    """How one step computes: compute dtype, gradient accumulation, EMA decay, PRNG implementation."""
    SECTION = "step"
    compute_dtype: str | None = None   # None: the parameters' dtype; "bfloat16": bf16 compute, fp32 master weights
    grad_accum: int = 1
    ema_decay: float | None = None     # used when the state carries an EMA
    rng_impl: str | None = None        # PRNG implementation of state.rng (None: jax's default)



def _micro_batches(batch: Any, n: int) -> Any:
    """``(B, ...) -> (n, B/n, ...)``, example ``i`` going to micro-batch ``i % n``: the reshape keeps the leading
    (sharded) dimension whole, so each device's share of every micro-batch is already local."""
    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
        return jnp.moveaxis(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 1, 0)
    return jax.tree.map(one, batch)


def loss_and_grads(loss_fn: Callable, params: Any, frozen: Any, batch: Any, rng: jax.Array,
                   cfg: StepConfig) -> tuple[jax.Array, dict, Any]:
    """(mean loss, mean scalar metrics, mean gradients w.r.t. ``params``) over ``cfg.grad_accum`` micro-batches."""
    dtype = jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype else None

    def objective(p, b, key):
        full = merge(cast_floating(p, dtype), cast_floating(frozen, dtype))
        loss, aux = loss_fn(full, b, key)
        return loss.astype(jnp.float32), scalar_metrics(aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if cfg.grad_accum == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, metrics, grads

    micro = _micro_batches(batch, cfg.grad_accum)

    def body(carry, xs):
        i, b = xs
        (loss, metrics), grads = grad_fn(params, b, jax.random.fold_in(rng, i))
        acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return acc, None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1], shapes[1]))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(cfg.grad_accum), micro))
    return jax.tree.map(lambda x: x / cfg.grad_accum, total)


def train_step(state: TrainState, frozen: Any, batch: Any, *, loss_fn: Callable,
               optimizer: optax.GradientTransformation, cfg: StepConfig,
               lr_schedule: Callable | None = None) -> tuple[TrainState, dict]:
    """One update (unjitted; ``make_train_step`` jits it). The step's randomness is ``fold_in(rng, step)``: a
    resumed run draws the same noise as an uninterrupted one."""
    key = jax.random.wrap_key_data(state.rng, impl=cfg.rng_impl) if cfg.rng_impl else jax.random.wrap_key_data(state.rng)
    loss, metrics, grads = loss_and_grads(loss_fn, state.params, frozen, batch, jax.random.fold_in(key, state.step), cfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        decay = cfg.ema_decay if cfg.ema_decay is not None else 0.999
        ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(state.step)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng, ema=ema)
    return new, metrics


def make_train_step(loss_fn: Callable, optimizer: Optimizer, *,
                    state_shardings: TrainState | None = None, frozen_shardings: Any = None,
                    batch_shardings: Any = None, cfg: StepConfig = StepConfig(),
                    lr_schedule: optax.ScalarOrSchedule | None = None, donate: bool = True) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``, jitted with the given shardings (None: let jit infer
    them from the arguments) and the state donated (its buffers are reused for the new state).

    ``optimizer``: an optax transform, or an ``OptimizerConfig`` (made with ``make_optimizer``, so the state must
    come from the same config). ``lr_schedule`` (a schedule or a constant, with a transform only) is evaluated at
    ``state.step`` and logged as ``learning_rate``; a config logs its own schedule."""
    optimizer, lr_schedule = resolve_optimizer(optimizer, lr_schedule)

    def step(state, frozen, batch):
        return train_step(state, frozen, batch, loss_fn=loss_fn, optimizer=optimizer, cfg=cfg,
                          lr_schedule=lr_schedule)

    kwargs = {}
    if state_shardings is not None:
        kwargs["in_shardings"] = (state_shardings, frozen_shardings, batch_shardings)
        kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,) if donate else (), **kwargs)
