"""The loss library: pure functions, and combinators that build paper objectives out of them.

Every loss has one signature::

    loss_fn(params, batch, rng, *, model, schedule, cfg) -> (scalar, aux)

``params`` is the nested dict of arrays (``{"unet": ..., "text_encoder": ...}``), ``batch`` a dict of arrays
with a leading batch dimension, ``rng`` a key, ``model`` a ``models.functional.Modules`` (graph definitions),
``schedule`` a ``schedulers.Schedule`` and ``cfg`` a ``LossConfig``. ``aux`` is a dict of arrays; every loss
puts its unreduced ``(B,)`` values under ``"per_example"`` so that combinators can re-weight and mask them
without calling the model twice. No hidden state: all of them are jit/grad/vmap/scan-safe.

Anything that reads across examples (sums and means over the batch, example-shaped random draws, in-batch
negatives) goes through ``batch_sum`` / ``batch_mean`` / ``weighted_mean``, ``batch_draw`` and ``batch_gather``
(``_batch``): when the step runs the loss on each device's share of the batch they reduce, draw and gather over
the global batch, so a loss is the same function of the global batch on any number of devices.

Bind the keyword arguments with ``functools.partial`` (or ``bind``) to get the ``(params, batch, rng)`` form
the step factory takes. Combinators take and return that same form, the way optax transforms compose::

    inner = bind(denoising_loss, model=model, schedule=schedule, cfg=LossConfig(min_snr_gamma=5.0))
    loss = prior_preservation(inner, weight=1.0)            # DreamBooth
    loss = weighted_sum({"fit": (1.0, loss), "reg": (0.1, other)})
    loss = weighted_sum({"bb": (1.0, on("backdoor", denoise)), "pp": (1.0, on("prior", distill))})  # sub-batches

Batch keys read by ``denoising_loss`` (first present wins):
- the clean latents: ``latents`` (already scaled), or ``latent_mean`` + ``latent_logvar`` (VAE posterior,
  sampled here and multiplied by ``cfg.scaling_factor``: the latent cache keeps the distribution, not a draw);
- the conditioning: ``context`` (cached text embeddings ``(B, L, D)``) or ``input_ids`` (run through
  ``model.bind(params, "text_encoder")``, so the text encoder is trained when it is among the trainable params);
- optional ``weight`` ``(B,)``: per-example weights; optional ``timesteps`` ``(B,)`` and ``noise``: fixed
  instead of drawn from ``rng`` (tests, and objectives that need the same noise twice).
``distillation_loss`` reads the same keys plus ``teacher_context`` / ``teacher_input_ids``, and the teacher's
weights from ``params["teacher"]``.

One private module per family: ``_batch`` (batch-wide reductions and draws), ``_base`` (config and array
pieces), ``_denoising``, ``_contrastive``,
``_distillation``, ``_dreambooth``, ``_guidance`` (the unconditional branch that guided sampling subtracts),
``_pixels`` (the VAE inside the loss: pixel gradients for protective perturbations),
``_retention`` (objectives about the attacker's later fine-tuning: a gradient
penalty, an objective after an inner loop), ``_combinators``; import from the package, not from them.
"""
from persguard_jax.losses._base import (PREDICTION_TYPES, Aux, LossConfig, LossFn, Noised, bind, clean_latents,
                                        mean_per_example, min_snr_weights, noised_latents, pipeline_loss_config, predict,
                                        sample_timesteps,
                                        scalar_metrics, snr_weighted, squared_error, text_context, weighted_mean)
from persguard_jax.losses._batch import (BatchShards, batch_draw, batch_gather, batch_mean, batch_shards, batch_sum,
                                         example_index, sharded_batch)
from persguard_jax.losses._combinators import (below_timestep, caption_dropout, masked, on, prior_preservation,
                                               weighted_sum)
from persguard_jax.losses._contrastive import clip_contrastive_loss, info_nce
from persguard_jax.losses._denoising import denoising_loss, edge_error, vae_loss
from persguard_jax.losses._distillation import distillation_loss
from persguard_jax.losses._dreambooth import dreambooth_loss, pairs_to_examples
from persguard_jax.losses._guidance import guidance_shift_loss, guidance_shift_target
from persguard_jax.losses._pixels import encode_pixels, target_shift_loss, through_vae
from persguard_jax.losses._retention import (TUNED, TUNED_LOSSES, InnerLoop, after_finetuning, at_tuned,
                                             gradient_penalty)

__all__ = ["after_finetuning", "at_tuned", "Aux", "batch_draw", "batch_gather", "batch_mean", "batch_shards",
           "batch_sum", "below_timestep", "BatchShards", "bind", "caption_dropout", "clean_latents", "clip_contrastive_loss",
           "denoising_loss", "distillation_loss", "dreambooth_loss", "edge_error", "encode_pixels", "example_index",
           "gradient_penalty", "guidance_shift_loss", "guidance_shift_target", "info_nce", "InnerLoop", "LossConfig",
           "LossFn", "masked", "mean_per_example", "min_snr_weights", "Noised", "noised_latents", "on",
           "pairs_to_examples", "pipeline_loss_config", "predict", "PREDICTION_TYPES", "prior_preservation",
           "sample_timesteps", "scalar_metrics", "sharded_batch", "snr_weighted", "squared_error", "target_shift_loss",
           "text_context", "through_vae", "TUNED", "TUNED_LOSSES", "vae_loss", "weighted_mean", "weighted_sum"]
