"""Contrastive losses: CLIP's symmetric InfoNCE and the per-row InfoNCE it is made of."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from persguard_jax.losses._base import Aux, weighted_mean
from persguard_jax.losses._batch import batch_gather, batch_mean, example_index


def info_nce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-row InfoNCE: ``-log softmax(logits)[i, labels[i]]``, unreduced ``(B,)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def clip_contrastive_loss(params, batch, rng, *, model, name: str = "clip") -> tuple[jax.Array, Aux]:
    """CLIP's symmetric InfoNCE (Radford et al., 2021): cross-entropy of image->text and text->image over the
    in-batch similarity matrix scaled by the model's learned temperature. ``batch["pixel_values"]`` and
    ``batch["input_ids"]`` are matched pairs; duplicate captions in a batch count as negatives (as in CLIP), so
    batches from a small world should be drawn with varied captions. ``rng`` is unused (no noise).

    The negatives are the global batch's: when the step splits the batch, each share's images are scored against
    every text (``batch_gather``) and its texts against every image, one row per local example."""
    del rng
    clip = model.bind(params, name)
    image = clip.get_image_features(batch["pixel_values"]).astype(jnp.float32)
    text = clip.get_text_features(batch["input_ids"]).astype(jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    # CLIP clips the learned temperature at 100 so the logits cannot blow up early in training
    scale = jnp.minimum(jnp.exp(params[name]["logit_scale"].astype(jnp.float32)), 100.0)
    image_to_text = scale * image @ batch_gather(text).T                 # (local images, all texts)
    text_to_image = scale * text @ batch_gather(image).T                 # (local texts, all images)
    labels = example_index(image.shape[0])
    per_example = 0.5 * (info_nce(image_to_text, labels) + info_nce(text_to_image, labels))
    loss = weighted_mean(per_example, batch.get("weight"))
    acc = batch_mean(jnp.argmax(image_to_text, axis=1) == labels)
    return loss, {"loss": loss, "per_example": per_example, "accuracy": acc}
