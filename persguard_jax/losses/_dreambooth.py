"""DreamBooth's objective (Ruiz et al., 2023) and its batch layout.

Each row of a DreamBooth batch is one instance example and one class (prior) example, so a batch of B pairs
carries arrays ``(B, 2, ...)``; ``pairs_to_examples`` lays them out as ``(2B, ...)`` with ``is_prior`` = 0, 1, 0,
1, ... (done on the host by the data pipeline, or inside the loss for arrays built in-graph).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from persguard_jax.losses._base import Aux, LossConfig, bind
from persguard_jax.losses._combinators import prior_preservation
from persguard_jax.losses._denoising import denoising_loss


def pairs_to_examples(batch: Mapping[str, Any]) -> dict:
    """``(B, 2, ...)`` -> ``(2B, ...)`` for every array, adding ``is_prior`` (0 for instance, 1 for class)."""
    xp = jnp if any(isinstance(v, jax.Array) for v in batch.values()) else np
    out = {k: v.reshape((-1,) + tuple(v.shape[2:])) for k, v in batch.items()}
    n = next(iter(batch.values())).shape[0]
    out["is_prior"] = xp.tile(xp.asarray([0, 1], dtype=xp.int32), n)
    return out


def dreambooth_loss(params, batch, rng, *, model, schedule, cfg: LossConfig = LossConfig(),
                    prior_weight: float = 1.0) -> tuple[jax.Array, Aux]:
    """Denoising loss on instance examples + ``prior_weight`` x the loss on class examples (``is_prior``), one
    UNet call on the whole batch. ``batch`` in example layout (``pairs_to_examples``); without ``is_prior``
    every example counts as an instance example (plain fine-tuning)."""
    inner = bind(denoising_loss, model=model, schedule=schedule, cfg=cfg)
    if "is_prior" not in batch:
        return inner(params, batch, rng)
    return prior_preservation(inner, weight=prior_weight)(params, batch, rng)
