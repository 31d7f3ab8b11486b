"""Image -> 4x image with a pipeline in the SD x4 upscaler's layout, as diffusers' ``StableDiffusionUpscalePipeline``.

The upscaler is a latent diffusion model whose latent has the low-resolution image's size: each UNet call sees
the latent beside the low-resolution image (concatenated on channels), the image noised by the pipeline's
DDPM ``low_res_scheduler`` to ``noise_level`` and that level given as the UNet's class label; the VAE then
decodes the latent at 4x (``latents / scaling_factor``). DiffShortcut's super-resolution purifier runs it
(``purifiers.SuperResolution`` with ``sr.model``).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from persguard_jax.models import Pipeline, load_pipeline
from persguard_jax.sample import decode_latents, encode_text, pipeline_denoise, sample_latents
from persguard_jax.schedulers import (SchedulerConfig, add_noise, diffusers_ddim_prev_timesteps, make_schedule,
                                      sampling_timesteps)

IMAGE_CHANNELS = 3
DEFAULT_MAX_NOISE_LEVEL = 350  # diffusers' StableDiffusionUpscalePipeline default (model_index max_noise_level)


def check_upscaler(pipe: Pipeline, source: str = "the pipeline") -> None:
    """Raise ValueError (one line naming ``source``) unless ``pipe`` has the x4 upscaler's layout."""
    latent, unet_cfg = pipe.vae.config.latent_channels, pipe.unet.config
    problems = []
    if unet_cfg.in_channels != latent + IMAGE_CHANNELS:
        problems.append(f"its UNet takes {unet_cfg.in_channels} channels, not latent {latent} + image 3")
    if unet_cfg.num_class_embeds is None or unet_cfg.class_embed_type is not None:
        problems.append("its UNet has no noise-level class embedding (num_class_embeds)")
    if pipe.low_res_scheduler_config is None:
        problems.append("it has no low_res_scheduler/ folder")
    if problems:
        raise ValueError(f"{source}: not an SD x4-upscaler pipeline: {'; '.join(problems)}")


def max_noise_level(pipe: Pipeline) -> int:
    return int(pipe.model_index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))


@functools.lru_cache(maxsize=4)
def load_upscaler(folder: str) -> Pipeline:
    """``load_pipeline`` of an x4-upscaler folder, checked (one line naming the folder when it is not one) and
    kept: a purifier chain over many batches loads it once."""
    pipe = load_pipeline(folder)
    check_upscaler(pipe, str(Path(folder)))
    return pipe


def upscale_noise(seed: int, num_images: int, low_res_shape: tuple[int, int], latent_channels: int
                  ) -> tuple[jax.Array, jax.Array]:
    """(initial latents ``(N, h, w, latent_channels)``, low-resolution image noise ``(N, h, w, 3)``), image ``i``
    drawn from ``fold_in(key(seed), i)`` whatever the batch, so an upscale in chunks equals one made at once."""
    h, w = low_res_shape

    def draw(i):
        k_latent, k_image = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
        return (jax.random.normal(k_latent, (h, w, latent_channels), jnp.float32),
                jax.random.normal(k_image, (h, w, IMAGE_CHANNELS), jnp.float32))
    return jax.vmap(draw)(jnp.arange(num_images))


def upscale(pipe: Pipeline, images: Any, prompt: str, negative_prompt: str = "", *, num_steps: int = 75,
            guidance_scale: float = 9.0, noise_level: int = 20, seed: int = 0, latents: Any = None,
            image_noise: Any = None) -> np.ndarray:
    """Images ``(N, H, W, 3)`` in [0, 1] -> ``(N, 4H, 4W, 3)`` in [0, 1] (the VAE's factor; 4 for the SD
    x4 upscaler) with one prompt for all, as ``StableDiffusionUpscalePipeline(prompt, image, ...)`` with its
    defaults (75 DDIM steps, guidance 9, noise level 20). ``latents`` and ``image_noise`` (NHWC, unit variance)
    replace the seeded draws of ``upscale_noise``. A ``guidance_scale`` <= 1 runs the prompt alone, as diffusers."""
    check_upscaler(pipe)
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != IMAGE_CHANNELS:
        raise ValueError(f"upscale takes RGB images (N, H, W, 3) in [0, 1], got shape {x.shape}")
    top = max_noise_level(pipe)
    if not 0 <= noise_level <= top:
        raise ValueError(f"noise_level={noise_level}: the upscaler takes 0..{top} (its max_noise_level)")
    n, h, w, _ = x.shape
    drawn = upscale_noise(seed, n, (h, w), pipe.vae.config.latent_channels)
    latents = drawn[0] if latents is None else jnp.asarray(latents, jnp.float32)
    image_noise = drawn[1] if image_noise is None else jnp.asarray(image_noise, jnp.float32)

    low_res_cfg = SchedulerConfig.from_dict(pipe.low_res_scheduler_config, source="low_res_scheduler_config")
    levels = jnp.full((n,), noise_level, jnp.int32)
    low_res = add_noise(make_schedule(low_res_cfg), x * 2.0 - 1.0, image_noise, levels)

    cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
    ts = sampling_timesteps(cfg, num_steps, "ddim")
    cond, uncond = encode_text(pipe, [prompt]), encode_text(pipe, [negative_prompt])
    # diffusers guides only above 1: at or below it the prompt runs alone (scale 1)
    denoise, args = pipeline_denoise(pipe, cond, uncond, guidance_scale if guidance_scale > 1 else 1,
                                     image=(low_res, noise_level))
    z = sample_latents(denoise, latents, make_schedule(cfg), ts, prediction_type=cfg.prediction_type,
                       prev_timesteps=diffusers_ddim_prev_timesteps(cfg, ts), args=args)
    vae_cfg = pipe.vae.config
    return decode_latents(pipe, z / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0))
