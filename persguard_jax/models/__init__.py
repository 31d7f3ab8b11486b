"""Flax NNX ports of the Stable Diffusion UNet, VAE and CLIP encoders, and diffusers-format I/O."""
from persguard_jax.models.clip import CLIPModel, CLIPTextModel, CLIPVisionModelWithProjection
from persguard_jax.models.convert import WeightsError
from persguard_jax.models.pretrained import (Pipeline, load_pipeline, load_text_encoder, load_unet, load_vae,
                                             save_model, save_pipeline)
from persguard_jax.models.tokenizer import CLIPTokenizer
from persguard_jax.models.unet import UNet2DConditionModel
from persguard_jax.models.vae import AutoencoderKL

__all__ = [
    "AutoencoderKL", "CLIPModel", "CLIPTextModel", "CLIPTokenizer", "CLIPVisionModelWithProjection", "Pipeline",
    "UNet2DConditionModel", "WeightsError", "load_pipeline", "load_text_encoder", "load_unet", "load_vae",
    "save_model", "save_pipeline",
]
