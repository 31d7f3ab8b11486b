"""DreamBooth (Ruiz et al., 2023) as a differentiable inner loop: ``finetune`` is the attacker's fine-tuning that
PersGuard's retention loss and the purification workflow simulate inside their own objectives.

The command (``persguard personalize``, workflows/personalize.py) runs the same loss (``losses.dreambooth_loss``,
batches laid out by ``losses.pairs_to_examples``) on the engine; here it runs inside ``train.unroll``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax

from persguard_jax import losses
from persguard_jax.losses import dreambooth_loss
from persguard_jax.models.functional import merge, partition
from persguard_jax.train.optim import Optimizer, OptimizerConfig
from persguard_jax.train.unroll import unroll

def finetune(params: Any, data: Mapping[str, jax.Array], steps: int, *, model, schedule, rng: jax.Array,
             trainable: Sequence[str] = ("unet",), learning_rate: float = 5e-6,
             loss_cfg: losses.LossConfig = losses.LossConfig(), prior_weight: float = 1.0,
             optimizer: Optimizer | None = None, per_step_data: bool = False, order: int = 2,
             remat: bool = False) -> tuple[Any, jax.Array]:
    """``steps`` DreamBooth updates of the ``trainable`` parameters on ``data`` (example layout, see
    ``pairs_to_examples``; fresh noise and timesteps each step from ``fold_in(rng, i)``), as one
    ``jax.lax.scan`` (``train.unroll``): returns (all params after, the loss before each step).

    Pure and differentiable: ``jax.grad`` of an outer objective of the returned params flows through every
    inner step, inner gradients included (``order=2``, PersGuard's unrolled retention loss), or treats them as
    constants (``order=1``, first-order). ``remat`` recomputes each step's activations in the backward pass
    instead of keeping them. With ``per_step_data`` every ``data`` leaf carries a leading ``steps`` dimension:
    step ``i`` trains on ``data[i]``.

    ``optimizer``: an ``OptimizerConfig`` or any optax transform. The default is the recipe ``persguard
    personalize`` runs, the config's AdamW with global-norm clipping: ``OptimizerConfig(learning_rate=
    learning_rate, total_steps=steps)``; pass the run's own ``OptimizerConfig`` to simulate exactly that run.
    """
    if optimizer is None:
        optimizer = OptimizerConfig(learning_rate=learning_rate, total_steps=steps)
    train, frozen = partition(params, trainable)

    def loss(p, batch, key):
        return dreambooth_loss(merge(p, frozen), batch, key, model=model, schedule=schedule, cfg=loss_cfg,
                               prior_weight=prior_weight)

    inner = unroll(loss, optimizer, steps, order=order, remat=remat, per_step_data=per_step_data)
    tuned, history = inner(train, data, rng)
    return merge(tuned, frozen), history
