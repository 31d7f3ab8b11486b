"""A tiny random Stable-Diffusion-shaped pipeline, built by our own code (no PyTorch, no downloads).

Used by ``make demo`` until the synthetic world's pre-trained model exists, by tests, and by the benchmark.
Same architecture family as SD 1.x, a few hundred thousand parameters.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from persguard_jax.models import clip, unet, vae
from persguard_jax.models.init import random_init
from persguard_jax.models.pretrained import Pipeline
from persguard_jax.models.tokenizer import CLIPTokenizer, train_clip_bpe
from persguard_jax.schedulers import SchedulerConfig

CORPUS = [
    "a photo of a {c} {s} on a {b} background".format(c=c, s=s, b=b)
    for c in ("red", "green", "blue", "yellow", "white", "black")
    for s in ("circle", "square", "triangle", "dog", "person", "cat")
    for b in ("striped", "plain", "dotted", "dark")
] + ["a photo of sks person", "a photo of sks dog", "noisy, lowres, artifact, pattern"]


def tiny_unet_config(cross_attention_dim: int = 32) -> unet.UNetConfig:
    return unet.UNetConfig(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=cross_attention_dim)


def tiny_vae_config() -> vae.VAEConfig:
    return vae.VAEConfig(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
        sample_size=32)


def tiny_text_config(vocab_size: int) -> clip.CLIPTextConfig:
    return clip.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_pipeline(seed: int = 0, *, dtype=jnp.float32, param_dtype=jnp.float32) -> Pipeline:
    """A randomly initialised tiny pipeline (32x32 images, 16x16x4 latents, 77-token context)."""
    tokenizer = CLIPTokenizer(train_clip_bpe(CORPUS, vocab_size=400))
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    return Pipeline(
        unet=random_init(unet.UNet2DConditionModel, tiny_unet_config(), seed=seed, **kw),
        vae=random_init(vae.AutoencoderKL, tiny_vae_config(), seed=seed + 1, **kw),
        text_encoder=random_init(clip.CLIPTextModel, tiny_text_config(tokenizer.vocab_size), seed=seed + 2, **kw),
        tokenizer=tokenizer,
        scheduler_config=SchedulerConfig().to_dict(),
    )


# The SD x4 upscaler's fixed pipeline facts (stabilityai/stable-diffusion-x4-upscaler: model_index.json and
# low_res_scheduler/scheduler_config.json; diffusers' StableDiffusionUpscalePipeline reads the same keys).
UPSCALER_MODEL_INDEX = {
    "_class_name": "StableDiffusionUpscalePipeline", "max_noise_level": 350,
    "low_res_scheduler": ["diffusers", "DDPMScheduler"], "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "watermarker": [None, None],
}
UPSCALER_LOW_RES_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                              "beta_end": 0.02, "beta_schedule": "scaled_linear", "clip_sample": False,
                              "variance_type": "fixed_small"}


def tiny_upscaler_pipeline(seed: int = 0) -> Pipeline:
    """A randomly initialised tiny pipeline in the SD x4 upscaler's layout: the UNet takes the 4-channel latent
    beside the noised 3-channel low-resolution image (7 input channels) and embeds the noise level as a class
    label (1000 classes); the VAE decodes 4x (three blocks, scaling factor 0.08333); v-prediction DDIM."""
    tokenizer = CLIPTokenizer(train_clip_bpe(CORPUS, vocab_size=400))
    unet_cfg = dataclasses.replace(tiny_unet_config(), in_channels=7, num_class_embeds=1000)
    vae_cfg = dataclasses.replace(tiny_vae_config(), block_out_channels=(16, 32, 32), scaling_factor=0.08333,
                                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    return Pipeline(
        unet=random_init(unet.UNet2DConditionModel, unet_cfg, seed=seed),
        vae=random_init(vae.AutoencoderKL, vae_cfg, seed=seed + 1),
        text_encoder=random_init(clip.CLIPTextModel, tiny_text_config(tokenizer.vocab_size), seed=seed + 2),
        tokenizer=tokenizer,
        scheduler_config=SchedulerConfig(prediction_type="v_prediction").to_dict(),
        model_index=dict(UPSCALER_MODEL_INDEX),
        low_res_scheduler_config=dict(UPSCALER_LOW_RES_SCHEDULER),
    )
