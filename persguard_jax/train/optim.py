"""Optimizer from config: optax transforms chained (clipping, then AdamW with a learning-rate schedule).

The engine takes either an ``OptimizerConfig`` (the recipe every command runs) or any optax
``GradientTransformation`` (a PGD sign step with projection, gradient ascent, SGD...): ``resolve_optimizer`` turns
both into (transform, learning-rate schedule to log).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax.numpy as jnp
import optax

from persguard_jax.config import Section


@dataclass(frozen=True)
class OptimizerConfig(Section):
    """Global-norm clipping + AdamW with a constant, cosine or linear learning rate after a linear warm-up."""
    SECTION = "optimizer"
    BOUNDS = {"learning_rate": "[0, inf)", "warmup_steps": "[0, inf)", "total_steps": "[1, inf)", "b1": "[0, 1)",
              "b2": "[0, 1)", "eps": "[0, inf)", "eps_root": "[0, inf)", "weight_decay": "[0, inf)",
              "max_grad_norm": "(0, inf)"}
    learning_rate: float = 5e-6
    # decay to 0 over total_steps, after warmup
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # added to Adam's second moment inside the square root; 0 is standard AdamW. Differentiating through updates
    # (train.unroll order 2) needs it > 0: a parameter whose gradient is exactly 0 (an unused token's embedding)
    # has v = 0, where sqrt's derivative is infinite and 0 * inf makes the whole outer gradient NaN
    eps_root: float = 0.0
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0  # global-norm clipping; None = off



def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """The learning rate at each update count (what ``make_optimizer``'s AdamW uses, and what the step logs)."""
    warm = max(cfg.warmup_steps, 0)
    decay_steps = max(cfg.total_steps - warm, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    else:
        raise ValueError(f"optimizer schedule must be constant, cosine or linear, got {cfg.schedule!r}")
    if not warm:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), main], [warm])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm, adamw(learning_rate_schedule(cfg)))`` (no clipping when ``max_grad_norm`` is
    None)."""
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             eps_root=cfg.eps_root, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


Optimizer = OptimizerConfig | optax.GradientTransformation  # what the engine accepts as an optimizer


def resolve_optimizer(optimizer: Optimizer, lr_schedule: optax.ScalarOrSchedule | None = None
                      ) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
    """(transform, learning-rate schedule) of an ``OptimizerConfig`` (``make_optimizer`` and its schedule) or of
    a transform with the schedule the caller says it uses (a number means constant; None: nothing to log). A
    transform cannot report its own learning rate in general (a sign step has none), so it is the caller's to
    give; with a config the schedule is the config's and ``lr_schedule`` must be None."""
    if isinstance(optimizer, OptimizerConfig):
        if lr_schedule is not None:
            raise ValueError("lr_schedule is given only with an optax transform: an OptimizerConfig has its own")
        return make_optimizer(optimizer), learning_rate_schedule(optimizer)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an OptimizerConfig or an optax GradientTransformation, got "
                        f"{type(optimizer).__name__}")
    if lr_schedule is None or callable(lr_schedule):
        return optimizer, lr_schedule
    rate = float(lr_schedule)
    return optimizer, lambda count: jnp.full((), rate, jnp.float32)
