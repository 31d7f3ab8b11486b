"""Losses on the branch classifier-free guidance subtracts: what guided sampling draws, not what training fits.

Guided sampling (``sample.guided``) predicts ``out_u + w (out_c - out_u)``; in x0 terms, with the conditional
branch drawing ``x0_c`` and the unconditional one ``x0_u``, it draws ``x0_c + (w - 1)(x0_c - x0_u)``. DreamBooth
trains only conditional prompts, so a change planted in the unconditional branch is one the attacker's loss does
not see, but every guided sample carries.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from persguard_jax import schedulers
from persguard_jax.losses._base import (Aux, LossConfig, min_snr_weights, noised_latents, predict, squared_error,
                                        text_context, weighted_mean)
from persguard_jax.losses._combinators import below_timestep


def guidance_shift_target(schedule: schedulers.Schedule, x_t: jax.Array, t: jax.Array, anchor: jax.Array,
                          target: jax.Array, guidance: float | jax.Array, prediction_type: str) -> jax.Array:
    """The unconditional output at ``x_t`` with which guidance at scale ``guidance`` draws ``target`` (scaled
    latents) where the conditional branch draws ``anchor``: x0_c + (w - 1)(x0_c - x0_u) = target at x0_c = anchor
    gives x0_u = anchor - (target - anchor) / (w - 1), expressed in the model's output space at ``x_t``.
    ``guidance``: one scale, or one per example (each > 1; only a Python number is checked here)."""
    if isinstance(guidance, (int, float)) and guidance <= 1.0:
        raise ValueError(f"guidance must be > 1 (at 1 the unconditional branch cancels), got {guidance}")
    per_example = (-1,) + (1,) * (x_t.ndim - 1)
    w = jnp.reshape(jnp.asarray(guidance, jnp.float32), per_example if jnp.ndim(guidance) else ())
    x0_u = anchor - (target - anchor) / (w - 1.0)
    a = schedule.alphas_cumprod[t].reshape(per_example)
    noise_u = (x_t - jnp.sqrt(a) * x0_u) / jnp.sqrt(1.0 - a)
    return schedulers.training_target(schedule, x0_u, noise_u, t, prediction_type)


def guidance_shift_loss(params, batch, rng, *, model, schedule: schedulers.Schedule, cfg: LossConfig = LossConfig(),
                        guidance: float, max_timestep: int | None = None, error_space: str = "unconditional"
                        ) -> tuple[jax.Array, Aux]:
    """Train the branch of ``batch``'s prompt (the empty prompt: guidance's unconditional branch) so that guidance
    at scale ``guidance`` turns a conditional branch that draws ``anchor`` into a sample of ``target``
    (``guidance_shift_target``).

    The noisy input is a draw of the batch's clean latents (``latent_mean`` / ``latent_logvar``, or ``latents``:
    images of the anchor or of the target, since guided sampling passes near both). ``batch["anchor"]`` and
    ``batch["target"]`` are unscaled VAE latent means. Weighted by Min-SNR with gamma 1 whatever ``cfg`` says: an
    x0 shift costs 1/snr more in epsilon at low noise, where it would otherwise dominate the loss, and the
    composition that guidance shifts is set at high noise. ``max_timestep``: train at timesteps below it only
    (where the noisy input still shows which subject it is) unless the batch fixes them. ``batch["guidance"]``, when
    present, is each example's own scale and overrides ``guidance`` (subjects sized for different scales).

    ``error_space``: ``unconditional`` weighs each example's error in the unconditional branch's output;
    ``guided`` weighs it by (w - 1)^2, its size in the guided output (w c - (w - 1) u), so that examples sized for
    a smaller scale, which ask for a larger shift of the branch, do not outweigh the others in a batch (with one
    scale for all the two are the same loss: the weights are normalised)."""
    if error_space not in ("unconditional", "guided"):
        raise ValueError(f"error_space must be 'unconditional' or 'guided', got {error_space!r}")
    shift = functools.partial(_guidance_shift, model=model, schedule=schedule, cfg=cfg, guidance=guidance,
                              error_space=error_space)
    return below_timestep(shift, schedule=schedule, high=max_timestep)(params, batch, rng)


def _guidance_shift(params, batch, rng, *, model, schedule, cfg, guidance, error_space):
    """``guidance_shift_loss`` at the batch's timesteps, or at drawn ones over the whole schedule."""
    z = noised_latents(batch, rng, schedule, cfg)
    anchor = batch["anchor"].astype(jnp.float32) * cfg.scaling_factor
    target = batch["target"].astype(jnp.float32) * cfg.scaling_factor
    scale = batch["guidance"].astype(jnp.float32) if "guidance" in batch else guidance
    want = guidance_shift_target(schedule, z.x_t, z.t, anchor, target, scale, cfg.prediction_type)
    pred = predict(params, z.x_t, z.t, text_context(params, batch, model, cfg), model, cfg)
    per_example = squared_error(pred, want) * min_snr_weights(schedule, z.t, 1.0, cfg.prediction_type)
    weights = batch.get("weight")
    if error_space == "guided":
        size = jnp.broadcast_to((jnp.asarray(scale, jnp.float32) - 1.0) ** 2, per_example.shape)
        weights = size if weights is None else weights.astype(jnp.float32) * size
    loss = weighted_mean(per_example, weights)
    return loss, {"loss": loss, "per_example": per_example}
