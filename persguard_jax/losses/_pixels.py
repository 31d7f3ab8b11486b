"""Losses on pixels: the VAE runs inside the loss, so the gradient reaches the images themselves.

Protective perturbations (AdvDM, Anti-DreamBooth's FSMG and ASPL, MetaCloak) are found by gradient steps on a
photo's pixels through VAE encode -> noising -> UNet; every latent-space loss of the library becomes such a pixel
loss through ``through_vae``. ``target_shift_loss`` is ASPL's targeted term.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from persguard_jax import schedulers
from persguard_jax.losses._base import (Aux, LossConfig, LossFn, noised_latents, predict, squared_error, text_context,
                                        weighted_mean)
from persguard_jax.losses._batch import batch_draw


def encode_pixels(params, images: jax.Array, rng: jax.Array, *, model, cfg: LossConfig, vae: str = "vae",
                  sample: bool = True) -> jax.Array:
    """Scaled latents of ``images`` ``(B, H, W, 3)`` in [-1, 1]: a draw from the VAE posterior (the mean when
    ``sample`` is False) times ``cfg.scaling_factor``, differentiable in the images."""
    module = model.bind(params, vae)
    mean, logvar = module.encode(images.astype(module.dtype))
    mean = mean.astype(jnp.float32)
    if sample:
        std = jnp.exp(0.5 * logvar.astype(jnp.float32))
        mean = mean + std * batch_draw(lambda s: jax.random.normal(rng, s), mean.shape)
    return mean * cfg.scaling_factor


def through_vae(loss_fn: LossFn, *, model, cfg: LossConfig, vae: str = "vae", sample: bool = True) -> LossFn:
    """``loss_fn`` on ``batch["images"]`` (pixels in [-1, 1]) encoded by ``params[vae]`` inside the loss: the
    batch the inner loss sees has ``latents`` instead of ``images``. The released protections draw from the
    posterior (``latent_dist.sample()``), hence ``sample=True``."""
    def fn(params, batch, rng):
        k_vae, k_loss = jax.random.split(rng)
        batch = dict(batch)
        latents = encode_pixels(params, batch.pop("images"), k_vae, model=model, cfg=cfg, vae=vae, sample=sample)
        return loss_fn(params, {**batch, "latents": latents}, k_loss)
    return fn


def target_shift_loss(params, batch, rng, *, model, schedule: schedulers.Schedule,
                      cfg: LossConfig = LossConfig()) -> tuple[jax.Array, Aux]:
    """ASPL's targeted term (Anti-DreamBooth, ``target_image_path``): the squared distance between the UNet's
    one-step denoised latents ``x_{t-1}`` and the target's latents noised to ``t - 1`` with the same noise. A
    protection subtracts it from the denoising loss it maximises, pulling what the model learns towards the
    target. ``batch``: ``latents`` (the photos'), ``target_latents`` (scaled, same shape), conditioning. The step is
    DDIM's deterministic one (the released code takes DDPM's, whose added noise only adds variance)."""
    z = noised_latents(batch, rng, schedule, cfg)
    pred = predict(params, z.x_t, z.t, text_context(params, batch, model, cfg), model, cfg).astype(jnp.float32)
    prev = jnp.maximum(z.t - 1, 0)
    x_prev = schedulers.ddim_step(schedule, pred, z.t, prev, z.x_t, prediction_type=cfg.prediction_type)
    target = schedulers.add_noise(schedule, batch["target_latents"].astype(jnp.float32), z.noise, prev)
    per_example = squared_error(x_prev, target)
    loss = weighted_mean(per_example, batch.get("weight"))
    return loss, {"loss": loss, "per_example": per_example}
