"""Reconstruction losses: the diffusion model's denoising loss and the autoencoder's loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from persguard_jax import schedulers
from persguard_jax.losses._base import (Aux, LossConfig, mean_per_example, noised_latents, predict, snr_weighted,
                                        squared_error, text_context, weighted_mean)
from persguard_jax.losses._batch import batch_draw, batch_mean


def denoising_loss(params, batch, rng, *, model, schedule: schedulers.Schedule,
                   cfg: LossConfig = LossConfig()) -> tuple[jax.Array, Aux]:
    """The diffusion training loss: noise the clean latents at random timesteps, predict the target
    (epsilon / v / x0) with the UNet, squared error per example, optionally Min-SNR-weighted and
    per-example weighted. Returns the weighted mean and ``aux["per_example"]`` (weights applied, except
    ``batch["weight"]``, which only enters the mean, so combinators can re-weight)."""
    z = noised_latents(batch, rng, schedule, cfg)
    pred = predict(params, z.x_t, z.t, text_context(params, batch, model, cfg), model, cfg)
    target = schedulers.training_target(schedule, z.x0, z.noise, z.t, cfg.prediction_type)
    per_example = snr_weighted(squared_error(pred, target), schedule, z.t, cfg)
    loss = weighted_mean(per_example, batch.get("weight"))
    return loss, {"loss": loss, "per_example": per_example}


def vae_loss(params, batch, rng, *, model, kl_weight: float = 1e-4, edge_weight: float = 0.0,
             name: str = "vae") -> tuple[jax.Array, Aux]:
    """The autoencoder's training loss (Kingma & Welling; SD's VAE adds perceptual and GAN terms, omitted here):
    squared reconstruction error of a posterior draw, mean per pixel, plus ``kl_weight`` times the KL divergence
    to N(0, I), mean per latent element. ``batch["images"]`` is ``(B, H, W, 3)`` in [-1, 1]. A small weight keeps
    the latents informative while bounding their scale (the diffusion model's ``scaling_factor`` is fitted after).
    ``edge_weight`` adds that many times ``edge_error``: the squared error of the images' finite differences, a
    high-pass weighting of the same error (Mathieu et al., 2016), so fine texture is not averaged away."""
    vae = model.bind(params, name)
    images = batch["images"].astype(jnp.float32)
    mean, logvar = vae.encode(images.astype(vae.dtype))
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = mean + jnp.exp(0.5 * logvar) * batch_draw(lambda s: jax.random.normal(rng, s), mean.shape)
    recon = vae.decode(z.astype(vae.dtype)).astype(jnp.float32)
    rec = squared_error(recon, images)
    kl = mean_per_example(0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar))
    per_example = rec + kl_weight * kl
    aux = {"reconstruction": batch_mean(rec), "kl": batch_mean(kl)}
    if edge_weight:
        edges = edge_error(recon, images)
        per_example = per_example + edge_weight * edges
        aux["edges"] = batch_mean(edges)
    loss = weighted_mean(per_example, batch.get("weight"))
    return loss, {"loss": loss, "per_example": per_example, **aux}


def edge_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example mean squared error of the horizontal and vertical finite differences of ``(B, H, W, C)``
    images, ``(B,)``: zero for a constant offset, four times the pixel error for a checkerboard's."""
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    dx = jnp.diff(pred, axis=2) - jnp.diff(target, axis=2)
    dy = jnp.diff(pred, axis=1) - jnp.diff(target, axis=1)
    return 0.5 * (mean_per_example(jnp.square(dx)) + mean_per_example(jnp.square(dy)))
