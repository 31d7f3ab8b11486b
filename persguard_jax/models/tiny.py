"""A tiny random Stable-Diffusion-shaped pipeline, built by our own code (no PyTorch, no downloads).

Used by ``make demo`` until the synthetic world's pre-trained model exists, by tests, and by the benchmark.
Same architecture family as SD 1.x, a few hundred thousand parameters.
"""
from __future__ import annotations

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
