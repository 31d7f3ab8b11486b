"""Combinators: losses in, a loss out, all in the ``(params, batch, rng) -> (loss, aux)`` form (like optax's
``chain``/``masked`` on transforms). They re-weight the inner loss's ``aux["per_example"]`` instead of calling the
model again."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from persguard_jax import schedulers
from persguard_jax.losses._base import LossFn, sample_timesteps, weighted_mean
from persguard_jax.losses._batch import batch_draw


def _example_weights(batch) -> jax.Array | float:
    """``batch["weight"]`` as float32, or 1: the per-example weights every re-weighting combinator keeps."""
    return batch["weight"].astype(jnp.float32) if "weight" in batch else 1.0


def on(key: str, loss_fn: LossFn) -> LossFn:
    """``loss_fn`` on the sub-batch ``batch[key]``: objectives whose terms read different data in one step (a
    backdoor's targets, prior-preservation examples, the attacker's photos) keep each term's examples under its own
    key of one batch, and each term picks its own."""
    def fn(params, batch, rng):
        if key not in batch:
            raise KeyError(f"loss on batch[{key!r}]: the batch has {sorted(batch)}")
        return loss_fn(params, batch[key], rng)
    return fn


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
    """``sum_i w_i * loss_i``; aux has each term's scalar aux under ``<name>/<key>`` and the total as ``loss``.

    When every term reports ``per_example`` of one shape, aux also has ``per_example = sum_i w_i *
    per_example_i``, so ``masked`` and ``prior_preservation`` can wrap the sum (the mean of the sum is the sum of
    the means when each term is the plain mean of its per-example values). Each term draws from its own key
    (``fold_in(rng, i)``)."""
    if not terms:
        raise ValueError("weighted_sum needs at least one term")

    def fn(params, batch, rng):
        total, aux, per = 0.0, {}, []
        for i, (name, (w, term)) in enumerate(terms.items()):
            value, term_aux = term(params, batch, jax.random.fold_in(rng, i))
            total = total + w * value
            aux.update({f"{name}/{k}": v for k, v in term_aux.items() if jnp.ndim(v) == 0})
            per.append((w, term_aux.get("per_example")))
        shapes = {None if p is None else jnp.shape(p) for _, p in per}
        if len(shapes) == 1 and None not in shapes:  # shapes are static: decided when tracing
            aux["per_example"] = sum(w * p for w, p in per)
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
        drop = batch_draw(lambda s: jax.random.bernoulli(k_drop, rate, s), (ids.shape[0],))
        ids = jnp.where(drop[:, None], empty_ids[None, :].astype(ids.dtype), ids)
        return loss_fn(params, {**batch, key: ids}, k_inner)
    return fn


def below_timestep(loss_fn: LossFn, *, schedule: schedulers.Schedule, high: int | None) -> LossFn:
    """``loss_fn`` at timesteps drawn uniformly in ``[0, high)`` (``batch["timesteps"]``, unless the batch fixes
    them; ``high`` None: the loss's own draw over the whole schedule): a term that must act where another term
    acts (``guidance_shift_loss``'s ``max_timestep``; holding the unconditional branch on look-alikes at the
    shift's timesteps). The timesteps come from ``fold_in(rng, 1)``; the inner loss gets ``rng`` itself."""
    if high is None:
        return loss_fn

    def fn(params, batch, rng):
        if "timesteps" in batch:
            return loss_fn(params, batch, rng)
        n = (batch["latents"] if "latents" in batch else batch["latent_mean"]).shape[0]
        t = sample_timesteps(jax.random.fold_in(rng, 1), n, schedule, high)
        return loss_fn(params, {**batch, "timesteps": t}, rng)
    return fn
