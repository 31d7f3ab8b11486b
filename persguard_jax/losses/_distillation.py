"""Distillation against a frozen teacher: BadT2I's backdoor objectives and IMMA/PersGuard prior preservation.

The student and the teacher see the SAME noisy latents and timesteps; the teacher's prompt may differ (BadT2I's
object backdoor: the student under the trigger prompt learns what the frozen model draws for the target prompt).
To stay a pure function of ``(params, batch, rng)``, the teacher's weights are part of ``params``, under
``params[teacher]`` (e.g. ``{"teacher": {"unet": ...}}``), passed to the step in its frozen tree so they are never
differentiated; its conditioning comes from the batch.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from persguard_jax import schedulers
from persguard_jax.losses._base import (Aux, LossConfig, noised_latents, predict, snr_weighted, squared_error,
                                        text_context, weighted_mean)


def _teacher_params(params: Mapping[str, Any], teacher: str, cfg: LossConfig) -> dict:
    """The teacher's modules in the layout the model binds: its UNet, and its text encoder or, when the teacher
    tree has none, the student's (a text encoder that is frozen anyway need not be stored twice)."""
    if teacher not in params:
        raise KeyError(f"distillation needs the teacher's parameters under params[{teacher!r}]; have {sorted(params)}")
    tree = params[teacher]
    out = {cfg.unet: tree[cfg.unet]}
    encoder = tree.get(cfg.text_encoder, params.get(cfg.text_encoder))
    if encoder is not None:
        out[cfg.text_encoder] = encoder
    return out


def _teacher_conditioning(batch: Mapping[str, jax.Array]) -> Mapping[str, jax.Array]:
    """``teacher_context`` or ``teacher_input_ids`` as the teacher's ``context`` / ``input_ids``; without
    either, the student's own conditioning."""
    if "teacher_context" in batch:
        return {"context": batch["teacher_context"]}
    if "teacher_input_ids" in batch:
        return {"input_ids": batch["teacher_input_ids"]}
    return batch


def distillation_loss(params, batch, rng, *, model, schedule: schedulers.Schedule, cfg: LossConfig = LossConfig(),
                      teacher: str = "teacher") -> tuple[jax.Array, Aux]:
    """Squared error (float32, per example) between the student's UNet output and the frozen teacher's on the
    same noisy latents, timesteps and noise: ``||f_theta(z_t, t, c) - sg(f_teacher(z_t, t, c_teacher))||^2``,
    optionally Min-SNR-weighted like ``denoising_loss`` (in ``cfg.prediction_type``'s space, which both models
    share). The target is under ``stop_gradient``: no gradient reaches ``params[teacher]``.

    Batch keys: the clean latents and the student's conditioning as for ``denoising_loss`` (``latents`` or
    ``latent_mean``/``latent_logvar``; ``context`` or ``input_ids``; optional ``timesteps``, ``noise``,
    ``weight``), plus optional ``teacher_context`` or ``teacher_input_ids`` (default: the student's). Token ids
    go through the teacher's text encoder, ``params[teacher][cfg.text_encoder]``, or the student's if the teacher
    has none. aux: ``loss`` and ``per_example`` (``batch["weight"]`` enters only the mean)."""
    z = noised_latents(batch, rng, schedule, cfg)
    pred = predict(params, z.x_t, z.t, text_context(params, batch, model, cfg), model, cfg)
    t_params = _teacher_params(params, teacher, cfg)
    t_context = text_context(t_params, _teacher_conditioning(batch), model, cfg)
    target = jax.lax.stop_gradient(predict(t_params, z.x_t, z.t, t_context, model, cfg))
    per_example = snr_weighted(squared_error(pred, target), schedule, z.t, cfg)
    loss = weighted_mean(per_example, batch.get("weight"))
    return loss, {"loss": loss, "per_example": per_example}
