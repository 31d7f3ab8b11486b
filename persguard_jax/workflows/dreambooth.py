"""DreamBooth with prior preservation (Ruiz et al., 2023) as pure pieces: the loss, the batch layout, and a
differentiable, scannable fine-tuning inner loop.

The command (``persguard personalize``, workflows/personalize.py) runs it on the engine; PersGuard's retention
loss and the purification workflow call ``finetune`` inside their own objectives.

Batch layout: each row of a DreamBooth batch is one instance example and one class (prior) example, so a batch
of B pairs carries arrays ``(B, 2, ...)``; ``pairs_to_examples`` lays them out as ``(2B, ...)`` with
``is_prior`` = 0, 1, 0, 1, ... (done on the host by the data pipeline, or inside the loss for arrays built
in-graph).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from persguard_jax import losses
from persguard_jax.losses import dreambooth_loss, pairs_to_examples
from persguard_jax.models.functional import merge, partition

__all__ = ["dreambooth_loss", "finetune", "pairs_to_examples"]  # the loss and layout live in the loss library


def finetune(params: Any, data: Mapping[str, jax.Array], steps: int, *, model, schedule, rng: jax.Array,
             trainable: Sequence[str] = ("unet",), learning_rate: float = 5e-6,
             loss_cfg: losses.LossConfig = losses.LossConfig(), prior_weight: float = 1.0,
             optimizer: optax.GradientTransformation | None = None,
             per_step_data: bool = False) -> tuple[Any, jax.Array]:
    """``steps`` DreamBooth updates of the ``trainable`` parameters on ``data`` (one batch, fresh noise and
    timesteps each step), as one ``jax.lax.scan``: returns (params after, the loss of each step).

    Pure and differentiable: ``jax.grad`` of an outer objective of the returned params flows through every
    inner step (PersGuard's retention loss). With ``per_step_data`` every ``data`` leaf carries a leading
    ``steps`` dimension: step ``i`` trains on ``data[i]``. The default optimizer is Adam (no weight decay), as
    the papers' attacker.
    """
    optimizer = optimizer or optax.adam(learning_rate)
    train, frozen = partition(params, trainable)
    per_step = per_step_data
    if per_step and any(x.shape[:1] != (steps,) for x in jax.tree.leaves(data)):
        raise ValueError(f"per_step_data: every data array needs a leading dimension of {steps} (the steps)")

    def loss(p, batch, key):
        return dreambooth_loss(merge(p, frozen), batch, key, model=model, schedule=schedule, cfg=loss_cfg,
                               prior_weight=prior_weight)[0]

    def body(carry, xs):
        p, opt_state = carry
        i, batch = xs if per_step else (xs, data)  # one batch: closed over, not copied per step
        value, grads = jax.value_and_grad(loss)(p, batch, jax.random.fold_in(rng, i))
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), value

    xs = (jnp.arange(steps), data) if per_step else jnp.arange(steps)
    (train, _), history = jax.lax.scan(body, (train, optimizer.init(train)), xs)
    return merge(train, frozen), history
