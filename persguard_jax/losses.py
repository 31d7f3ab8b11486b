"""The loss library: pure functions, and combinators that build paper objectives out of them.

Every loss has one signature::

    loss_fn(params, batch, rng, *, model, schedule, cfg) -> (scalar, aux)

``params`` is the nested dict of arrays (``{"unet": ..., "text_encoder": ...}``), ``batch`` a dict of arrays
with a leading batch dimension, ``rng`` a key, ``model`` a ``models.functional.Modules`` (graph definitions),
``schedule`` a ``schedulers.Schedule`` and ``cfg`` a ``LossConfig``. ``aux`` is a dict of arrays; every loss
puts its unreduced ``(B,)`` values under ``"per_example"`` so that combinators can re-weight and mask them
without calling the model twice. No hidden state: all of them are jit/grad/vmap/scan-safe.

Bind the keyword arguments with ``functools.partial`` (or ``bind``) to get the ``(params, batch, rng)`` form
the step factory takes. Combinators take and return that same form, the way optax transforms compose::

    inner = bind(denoising_loss, model=model, schedule=schedule, cfg=LossConfig(min_snr_gamma=5.0))
    loss = prior_preservation(inner, weight=1.0)            # DreamBooth
    loss = weighted_sum({"fit": (1.0, loss), "reg": (0.1, other)})

Batch keys read by ``denoising_loss`` (first present wins):
- the clean latents: ``latents`` (already scaled), or ``latent_mean`` + ``latent_logvar`` (VAE posterior,
  sampled here and multiplied by ``cfg.scaling_factor``: the latent cache keeps the distribution, not a draw);
- the conditioning: ``context`` (cached text embeddings ``(B, L, D)``) or ``input_ids`` (run through
  ``model.bind(params, "text_encoder")``, so the text encoder is trained when it is among the trainable params);
- optional ``weight`` ``(B,)``: per-example weights; optional ``timesteps`` ``(B,)`` and ``noise``: fixed
  instead of drawn from ``rng`` (tests, and objectives that need the same noise twice).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from persguard_jax import schedulers
from persguard_jax.config import Section

Aux = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Aux]]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class LossConfig(Section):
    SECTION = "loss"
    """Hyperparameters of the denoising loss (hashable: safe to close over in jitted code)."""
    prediction_type: str = "epsilon"    # what the UNet predicts: epsilon | v_prediction | sample
    min_snr_gamma: float | None = None  # Min-SNR-gamma weighting (Hang et al. 2023); None = uniform
    scaling_factor: float = 0.18215     # VAE latent scale, applied when sampling from latent_mean/logvar
    noise_offset: float = 0.0           # per-channel offset noise (0 = off)
    unet: str = "unet"                  # names of the modules in ``params`` / ``model``
    text_encoder: str = "text_encoder"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")



def bind(loss_fn: LossFn, **kwargs) -> LossFn:
    """``loss_fn`` with its keyword arguments fixed: the ``(params, batch, rng)`` form."""
    return functools.partial(loss_fn, **kwargs)


# --------------------------------------------------------------------------- pieces (array functions)

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


def weighted_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``sum(w * v) / sum(w)`` (plain mean when ``weights`` is None; 0 when all weights are 0)."""
    if weights is None:
        return values.mean()
    weights = weights.astype(values.dtype)
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)


def sample_timesteps(rng: jax.Array, batch: int, schedule: schedulers.Schedule) -> jax.Array:
    return jax.random.randint(rng, (batch,), 0, schedule.alphas_cumprod.shape[0])


def clean_latents(batch: Mapping[str, jax.Array], rng: jax.Array, cfg: LossConfig) -> jax.Array:
    """``batch["latents"]``, or a draw from the cached VAE posterior times ``cfg.scaling_factor``."""
    if "latents" in batch:
        return batch["latents"].astype(jnp.float32)
    if "latent_mean" in batch:
        mean = batch["latent_mean"].astype(jnp.float32)
        std = jnp.exp(0.5 * batch["latent_logvar"].astype(jnp.float32))
        return (mean + std * jax.random.normal(rng, mean.shape)) * cfg.scaling_factor
    raise KeyError(f"batch needs 'latents' or 'latent_mean' + 'latent_logvar'; has {sorted(batch)}")


def text_context(params, batch: Mapping[str, jax.Array], model, cfg: LossConfig) -> jax.Array:
    """Cached ``batch["context"]``, or the text encoder's last hidden state for ``batch["input_ids"]``."""
    if "context" in batch:
        return batch["context"]
    if "input_ids" in batch:
        return model.bind(params, cfg.text_encoder)(batch["input_ids"])
    raise KeyError(f"batch needs 'context' or 'input_ids'; has {sorted(batch)}")


# --------------------------------------------------------------------------- losses

def denoising_loss(params, batch, rng, *, model, schedule: schedulers.Schedule,
                   cfg: LossConfig = LossConfig()) -> tuple[jax.Array, Aux]:
    """The diffusion training loss: noise the clean latents at random timesteps, predict the target
    (epsilon / v / x0) with the UNet, squared error per example, optionally Min-SNR-weighted and
    per-example weighted. Returns the weighted mean and ``aux["per_example"]`` (weights applied, except
    ``batch["weight"]``, which only enters the mean, so combinators can re-weight)."""
    k_lat, k_t, k_noise, k_off = jax.random.split(rng, 4)
    x0 = clean_latents(batch, k_lat, cfg)
    b = x0.shape[0]
    t = batch["timesteps"] if "timesteps" in batch else sample_timesteps(k_t, b, schedule)
    if "noise" in batch:
        noise = batch["noise"].astype(jnp.float32)
    else:
        noise = jax.random.normal(k_noise, x0.shape)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * jax.random.normal(k_off, (b,) + (1,) * (x0.ndim - 2) + x0.shape[-1:])
    x_t = schedulers.add_noise(schedule, x0, noise, t)
    context = text_context(params, batch, model, cfg)
    unet = model.bind(params, cfg.unet)
    pred = unet(x_t.astype(unet.dtype), t, context.astype(unet.dtype))
    target = schedulers.training_target(schedule, x0, noise, t, cfg.prediction_type)
    per_example = squared_error(pred, target)
    if cfg.min_snr_gamma is not None:
        per_example = per_example * min_snr_weights(schedule, t, cfg.min_snr_gamma, cfg.prediction_type)
    loss = weighted_mean(per_example, batch.get("weight"))
    return loss, {"loss": loss, "per_example": per_example}


def vae_loss(params, batch, rng, *, model, kl_weight: float = 1e-4, name: str = "vae") -> tuple[jax.Array, Aux]:
    """The autoencoder's training loss (Kingma & Welling; SD's VAE adds perceptual and GAN terms, omitted here):
    squared reconstruction error of a posterior draw, mean per pixel, plus ``kl_weight`` times the KL divergence
    to N(0, I), mean per latent element. ``batch["images"]`` is ``(B, H, W, 3)`` in [-1, 1]. A small weight keeps
    the latents informative while bounding their scale (the diffusion model's ``scaling_factor`` is fitted after)."""
    vae = model.bind(params, name)
    images = batch["images"].astype(jnp.float32)
    mean, logvar = vae.encode(images.astype(vae.dtype))
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = vae.decode(z.astype(vae.dtype)).astype(jnp.float32)
    rec = squared_error(recon, images)
    kl = mean_per_example(0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar))
    per_example = rec + kl_weight * kl
    loss = weighted_mean(per_example, batch.get("weight"))
    return loss, {"loss": loss, "per_example": per_example, "reconstruction": jnp.mean(rec), "kl": jnp.mean(kl)}


def clip_contrastive_loss(params, batch, rng, *, model, name: str = "clip") -> tuple[jax.Array, Aux]:
    """CLIP's symmetric InfoNCE (Radford et al., 2021): cross-entropy of image->text and text->image over the
    in-batch similarity matrix scaled by the model's learned temperature. ``batch["pixel_values"]`` and
    ``batch["input_ids"]`` are matched pairs; duplicate captions in a batch count as negatives (as in CLIP), so
    batches from a small world should be drawn with varied captions. ``rng`` is unused (no noise)."""
    del rng
    clip = model.bind(params, name)
    image = clip.get_image_features(batch["pixel_values"]).astype(jnp.float32)
    text = clip.get_text_features(batch["input_ids"]).astype(jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    # CLIP clips the learned temperature at 100 so the logits cannot blow up early in training
    scale = jnp.minimum(jnp.exp(params[name]["logit_scale"].astype(jnp.float32)), 100.0)
    logits = scale * image @ text.T                                     # (B_img, B_txt)
    labels = jnp.arange(logits.shape[0])
    per_example = 0.5 * (info_nce(logits, labels) + info_nce(logits.T, labels))
    loss = weighted_mean(per_example, batch.get("weight"))
    acc = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    return loss, {"loss": loss, "per_example": per_example, "accuracy": acc}


def info_nce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-row InfoNCE: ``-log softmax(logits)[i, labels[i]]``, unreduced ``(B,)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


# --------------------------------------------------------------------------- combinators

def _example_weights(batch) -> jax.Array | float:
    """``batch["weight"]`` as float32, or 1: the per-example weights every re-weighting combinator keeps."""
    return batch["weight"].astype(jnp.float32) if "weight" in batch else 1.0


def masked(loss_fn: LossFn, mask_key: str, *, invert: bool = False) -> LossFn:
    """The loss over the examples where ``batch[mask_key]`` is true (false with ``invert``): the mean of the
    inner loss's per-example values under the mask (times ``batch["weight"]`` if present). The model still sees
    the whole batch (one call)."""
    def fn(params, batch, rng):
        _, aux = loss_fn(params, batch, rng)
        mask = batch[mask_key].astype(bool)
        mask = (~mask if invert else mask).astype(jnp.float32) * _example_weights(batch)
        loss = weighted_mean(aux["per_example"], mask)
        return loss, {**aux, "loss": loss}
    return fn


def weighted_sum(terms: Mapping[str, tuple[float, LossFn]]) -> LossFn:
    """``sum_i w_i * loss_i``; aux has each term's scalar aux under ``<name>/<key>`` and the total as ``loss``."""
    if not terms:
        raise ValueError("weighted_sum needs at least one term")

    def fn(params, batch, rng):
        total, aux = 0.0, {}
        for i, (name, (w, term)) in enumerate(terms.items()):
            value, term_aux = term(params, batch, jax.random.fold_in(rng, i))
            total = total + w * value
            aux.update({f"{name}/{k}": v for k, v in term_aux.items() if jnp.ndim(v) == 0})
        return total, {**aux, "loss": total}
    return fn


def prior_preservation(loss_fn: LossFn, *, weight: float = 1.0, prior_key: str = "is_prior") -> LossFn:
    """DreamBooth's objective (Ruiz et al., 2023): ``mean(instance) + weight * mean(prior)`` where
    ``batch[prior_key]`` marks the class (prior) examples of a batch that holds both; the UNet runs once on it.
    aux adds ``instance_loss`` and ``prior_loss``."""
    def fn(params, batch, rng):
        _, aux = loss_fn(params, batch, rng)
        prior = batch[prior_key].astype(jnp.float32)
        w = _example_weights(batch)
        instance = weighted_mean(aux["per_example"], (1.0 - prior) * w)
        prior_loss = weighted_mean(aux["per_example"], prior * w)
        loss = instance + weight * prior_loss
        return loss, {**aux, "loss": loss, "instance_loss": instance, "prior_loss": prior_loss}
    return fn


def caption_dropout(loss_fn: LossFn, *, rate: float, empty_ids: jax.Array, key: str = "input_ids") -> LossFn:
    """Replace each example's ``batch[key]`` by ``empty_ids`` (the tokenized empty prompt) with probability
    ``rate``: the unconditional model classifier-free guidance needs (Ho & Salimans, 2022) trained in the same
    network. The draw comes from ``rng``, so it differs every step and is reproducible."""
    empty_ids = jnp.asarray(empty_ids).reshape(-1)

    def fn(params, batch, rng):
        k_drop, k_inner = jax.random.split(rng)
        ids = batch[key]
        drop = jax.random.bernoulli(k_drop, rate, (ids.shape[0],))
        ids = jnp.where(drop[:, None], empty_ids[None, :].astype(ids.dtype), ids)
        return loss_fn(params, {**batch, key: ids}, k_inner)
    return fn


def scalar_metrics(aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The scalar entries of an aux dict (what the step reports as metrics)."""
    return {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
