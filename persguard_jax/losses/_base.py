"""The shared pieces of every loss: its config, ``bind``, and array functions (errors, weights, noising).

Array functions here return unreduced values (``(B,)`` per example) so that losses and combinators decide how
to reduce them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from persguard_jax import schedulers
from persguard_jax.config import Section
from persguard_jax.losses._batch import batch_draw, batch_mean, batch_sum

Aux = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Aux]]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class LossConfig(Section):
    """Hyperparameters of the denoising loss (hashable: safe to close over in jitted code)."""
    SECTION = "loss"
    BOUNDS = {"min_snr_gamma": "(0, inf)", "scaling_factor": "(0, inf)", "noise_offset": "[0, inf)"}
    # what the UNet predicts
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    min_snr_gamma: float | None = None  # Min-SNR-gamma weighting (Hang et al. 2023); None = uniform
    scaling_factor: float = 0.18215     # VAE latent scale, applied when sampling from latent_mean/logvar
    noise_offset: float = 0.0           # per-channel offset noise (0 = off)
    unet: str = "unet"                  # names of the modules in ``params`` / ``model``
    text_encoder: str = "text_encoder"


def pipeline_loss_config(pipe, overrides: Mapping | None = None) -> LossConfig:
    """A pipeline's loss config: its scheduler's prediction type and its VAE's latent scale, then ``overrides`` (a
    run config's ``loss`` section)."""
    prediction = schedulers.SchedulerConfig.from_dict(pipe.scheduler_config).prediction_type
    return LossConfig.from_dict({"prediction_type": prediction, "scaling_factor": pipe.vae.config.scaling_factor,
                                 **(overrides or {})})


def bind(loss_fn: LossFn, **kwargs) -> LossFn:
    """``loss_fn`` with its keyword arguments fixed: the ``(params, batch, rng)`` form."""
    return functools.partial(loss_fn, **kwargs)


def mean_per_example(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


def squared_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example mean squared error in float32, ``(B,)``."""
    return mean_per_example(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def min_snr_weights(schedule: schedulers.Schedule, timesteps: jax.Array, gamma: float,
                    prediction_type: str = "epsilon") -> jax.Array:
    """Min-SNR-gamma loss weights ``(B,)`` (Hang et al., 2023) for a loss measured in the given target space:
    ``min(snr, gamma) / snr`` for epsilon, ``min(snr, gamma) / (snr + 1)`` for v, ``min(snr, gamma)`` for x0."""
    s = schedulers.snr(schedule, timesteps)
    clipped = jnp.minimum(s, gamma)
    if prediction_type == "epsilon":
        return jnp.minimum(gamma / s, 1.0)  # = clipped / s, but 1 (its limit) instead of 0/0 where snr == 0
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped


def snr_weighted(per_example: jax.Array, schedule: schedulers.Schedule, timesteps: jax.Array,
                 cfg: LossConfig) -> jax.Array:
    """``per_example`` times the Min-SNR weights when ``cfg.min_snr_gamma`` is set (unchanged otherwise)."""
    if cfg.min_snr_gamma is None:
        return per_example
    return per_example * min_snr_weights(schedule, timesteps, cfg.min_snr_gamma, cfg.prediction_type)


def weighted_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``sum(w * v) / sum(w)`` over the batch (plain mean when ``weights`` is None; 0 when all weights are 0).
    Sums run over the global batch when the step splits it (``batch_sum``)."""
    if weights is None:
        return batch_mean(values)
    weights = weights.astype(values.dtype)
    return batch_sum(weights * values) / jnp.maximum(batch_sum(weights), 1e-12)


def sample_timesteps(rng: jax.Array, batch: int, schedule: schedulers.Schedule, high: int | None = None
                     ) -> jax.Array:
    """``(batch,)`` uniform training timesteps in ``[0, high)`` (default: all of the schedule's), one per example
    (``batch_draw``)."""
    high = schedule.alphas_cumprod.shape[0] if high is None else min(high, schedule.alphas_cumprod.shape[0])
    return batch_draw(lambda s: jax.random.randint(rng, s, 0, high), (batch,))


def clean_latents(batch: Mapping[str, jax.Array], rng: jax.Array, cfg: LossConfig) -> jax.Array:
    """``batch["latents"]``, or a draw from the cached VAE posterior times ``cfg.scaling_factor``."""
    if "latents" in batch:
        return batch["latents"].astype(jnp.float32)
    if "latent_mean" in batch:
        mean = batch["latent_mean"].astype(jnp.float32)
        std = jnp.exp(0.5 * batch["latent_logvar"].astype(jnp.float32))
        return (mean + std * batch_draw(lambda s: jax.random.normal(rng, s), mean.shape)) * cfg.scaling_factor
    raise KeyError(f"batch needs 'latents' or 'latent_mean' + 'latent_logvar'; has {sorted(batch)}")


class Noised(NamedTuple):
    """One forward-diffusion draw: clean latents, the noise, the timesteps and the noisy latents."""
    x0: jax.Array
    noise: jax.Array
    t: jax.Array
    x_t: jax.Array


def noised_latents(batch: Mapping[str, jax.Array], rng: jax.Array, schedule: schedulers.Schedule,
                   cfg: LossConfig) -> Noised:
    """Clean latents (``clean_latents``) noised at random timesteps with fresh noise, both drawn from ``rng``
    unless the batch fixes them (``timesteps``, ``noise``: tests, and objectives that need the same draw twice).
    Offset noise (``cfg.noise_offset``) is added only to drawn noise."""
    k_lat, k_t, k_noise, k_off = jax.random.split(rng, 4)
    x0 = clean_latents(batch, k_lat, cfg)
    b = x0.shape[0]
    t = batch["timesteps"] if "timesteps" in batch else sample_timesteps(k_t, b, schedule)
    if "noise" in batch:
        noise = batch["noise"].astype(jnp.float32)
    else:
        noise = batch_draw(lambda s: jax.random.normal(k_noise, s), x0.shape)
        if cfg.noise_offset:
            offset = batch_draw(lambda s: jax.random.normal(k_off, s), (b,) + (1,) * (x0.ndim - 2) + x0.shape[-1:])
            noise = noise + cfg.noise_offset * offset
    return Noised(x0, noise, t, schedulers.add_noise(schedule, x0, noise, t))


def text_context(params, batch: Mapping[str, jax.Array], model, cfg: LossConfig) -> jax.Array:
    """Cached ``batch["context"]``, or the text encoder's last hidden state for ``batch["input_ids"]``."""
    if "context" in batch:
        return batch["context"]
    if "input_ids" in batch:
        return model.bind(params, cfg.text_encoder)(batch["input_ids"])
    raise KeyError(f"batch needs 'context' or 'input_ids'; has {sorted(batch)}")


def predict(params, x_t: jax.Array, t: jax.Array, context: jax.Array, model, cfg: LossConfig) -> jax.Array:
    """The UNet's output on ``x_t`` (inputs cast to the UNet's dtype: bf16 compute when it is bf16)."""
    unet = model.bind(params, cfg.unet)
    return unet(x_t.astype(unet.dtype), t, context.astype(unet.dtype))


def scalar_metrics(aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The scalar entries of an aux dict (what the step reports as metrics)."""
    return {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
