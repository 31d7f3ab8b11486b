"""Optimizer from config: optax transforms chained (clipping, then AdamW with a learning-rate schedule)."""
from __future__ import annotations

from dataclasses import dataclass

import optax

from persguard_jax.config import Section


@dataclass(frozen=True)
class OptimizerConfig(Section):
    SECTION = "optimizer"
    learning_rate: float = 5e-6
    schedule: str = "constant"     # constant | cosine | linear (decay to 0 over total_steps, after warmup)
    warmup_steps: int = 0
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0  # global-norm clipping; None = off



def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
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
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)
