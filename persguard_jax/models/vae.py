"""Flax NNX port of diffusers' ``AutoencoderKL``, the Stable Diffusion VAE.

Attribute names mirror diffusers (``encoder.down_blocks.0.resnets.1.conv1``, ``decoder.mid_block.attentions.0.to_q``)
so convert.load_state_dict maps a diffusers ``vae/`` state dict directly; checkpoints written before diffusers
renamed the mid-block attention (``query``/``key``/``value``/``proj_attn``, sometimes 1x1 convs) load through
``LEGACY_RENAMES``. Images are NHWC in [-1, 1]. Only the block types Stable Diffusion VAEs use are ported
(``DownEncoderBlock2D`` / ``UpDecoderBlock2D``); ``VAEConfig.from_dict`` refuses anything else by name.

Latents here are *unscaled*: multiply by ``config.scaling_factor`` (after subtracting ``shift_factor`` if set)
before the UNet, and undo that before ``decode``, as the diffusers pipelines do.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from persguard_jax.models import layers
from persguard_jax.models.attention import attention
from persguard_jax.models.convert import WeightsError, config_kwargs
from persguard_jax.models.unet import ACTIVATIONS, Downsample2D, HashableFields, Upsample2D, _thaw

# Checkpoints saved before diffusers 0.14 name the mid-block attention projections the old way.
LEGACY_RENAMES: list[tuple[str, str]] = [
    (rf"(mid_block\.attentions\.\d+)\.{old}\.", rf"\1.{new}.")
    for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", r"to_out.0"))
]
IGNORE_KEYS: list[str] = []  # diffusers VAE files hold parameters only

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
NORM_EPS = 1e-6  # diffusers hard-codes eps 1e-6 for every VAE GroupNorm


def _strip_res(block_type: str) -> str:
    # diffusers' get_down_block/get_up_block accept an old "UNetRes" prefix for the same blocks
    return block_type[7:] if block_type.startswith("UNetRes") else block_type


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class VAEConfig(HashableFields):
    """The ``config.json`` keys of a diffusers ``AutoencoderKL`` (diffusers defaults)."""
    BOUNDS = {
        k: "[1, inf)" for k in ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                                "latent_channels", "norm_num_groups", "sample_size")} | {"scaling_factor": "(0, inf)"}
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32  # informational (diffusers' tiling size)
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None  # informational, used by some pipelines
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # informational: pipelines run such a VAE in float32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "VAEConfig":
        class_name = d.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise WeightsError(f"{source}: _class_name={class_name!r} is not supported by the JAX VAE "
                               f"(only 'AutoencoderKL')")
        config = cls(**config_kwargs(cls, d, source, "AutoencoderKL", "VAE"))
        config.validate(source)
        return config

    def to_dict(self) -> dict:
        """A ``config.json`` dict diffusers' ``AutoencoderKL.from_config`` builds the same model from."""
        return {"_class_name": "AutoencoderKL", **{f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    def validate(self, source: str = "VAEConfig") -> None:
        def refuse(key, why):
            raise WeightsError(f"{source}: {key}={getattr(self, key)!r} is not supported by the JAX VAE ({why})")

        boc = self.block_out_channels
        if not isinstance(boc, tuple) or not boc or not all(isinstance(c, int) and c > 0 for c in boc):
            refuse("block_out_channels", "needs a non-empty list of channel counts")
        for key, allowed in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = getattr(self, key)
            if not isinstance(types, tuple) or len(types) != len(boc):
                refuse(key, f"needs one entry per block_out_channels ({len(boc)})")
            if any(_strip_res(t) != allowed for t in types):
                refuse(key, f"only {allowed} blocks are ported")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            refuse("layers_per_block", "needs a positive int")
        if self.act_fn not in ACTIVATIONS:
            refuse("act_fn", f"known activations: {', '.join(sorted(ACTIVATIONS))}")
        if not isinstance(self.norm_num_groups, int) or any(c % self.norm_num_groups for c in boc):
            refuse("norm_num_groups", f"must divide every block_out_channels {list(boc)}")
        for key in ("in_channels", "out_channels", "latent_channels"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                refuse(key, "needs a positive int")


def vae_config_sd() -> VAEConfig:
    """The Stable Diffusion 1.x / 2.x VAE (``vae/config.json`` of runwayml/stable-diffusion-v1-5, sd-2-1)."""
    return VAEConfig(down_block_types=(DOWN_BLOCK,) * 4, up_block_types=(UP_BLOCK,) * 4,
                     block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)


# --------------------------------------------------------------------------- blocks

class ResnetBlock2D(nnx.Module):
    """GroupNorm-act-conv twice (no time embedding), residual; 1x1 conv shortcut if the channels change."""

    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.GroupNorm(in_ch, cfg.norm_num_groups, NORM_EPS, **kw)
        self.conv1 = layers.Conv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.norm2 = layers.GroupNorm(out_ch, cfg.norm_num_groups, NORM_EPS, **kw)
        self.conv2 = layers.Conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.conv_shortcut = layers.Conv2d(in_ch, out_ch, 1, padding=0, **kw) if in_ch != out_ch else None
        self.act_fn = cfg.act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act_fn]
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """Single-head self-attention over the pixels: GroupNorm, q/k/v with biases, output projection, residual."""

    def __init__(self, ch: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = layers.GroupNorm(ch, groups, NORM_EPS, **kw)
        self.to_q = layers.Linear(ch, ch, axes=("embed", "heads"), **kw)
        self.to_k = layers.Linear(ch, ch, axes=("embed", "heads"), **kw)
        self.to_v = layers.Linear(ch, ch, axes=("embed", "heads"), **kw)
        self.to_out = nnx.List([layers.Linear(ch, ch, axes=("heads", "embed"), **kw)])  # to_out.1 is a dropout
        self.attention_impl = "auto"  # models.attention.set_attention

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), 1,
                        implementation=self.attention_impl)
        return x + self.to_out[0](out).reshape(b, h, w, c)  # rescale_output_factor is 1 in the VAE


class UNetMidBlock2D(nnx.Module):
    """resnet, attention (unless ``mid_block_add_attention`` is off), resnet."""

    def __init__(self, ch: int, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, cfg, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(ch, cfg.norm_num_groups, **kw)]) if cfg.mid_block_add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig, *, add_downsample: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg, **kw)
                                 for i in range(cfg.layers_per_block)])
        # the encoder downsamples with padding 0: right/bottom padding only, as diffusers
        self.downsamplers = nnx.List([Downsample2D(out_ch, 0, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig, *, add_upsample: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, cfg, **kw)
                                 for i in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            _, h, w, _ = x.shape
            x = self.upsamplers[0](x, (2 * h, 2 * w))
        return x


class Encoder(nnx.Module):
    """conv_in, down blocks, mid block, GroupNorm-SiLU-conv_out to ``2 * latent_channels`` (mean and logvar)."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc = cfg.block_out_channels
        self.conv_in = layers.Conv2d(cfg.in_channels, boc[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(boc[max(i - 1, 0)], boc[i], cfg, add_downsample=i < len(boc) - 1, **kw)
            for i in range(len(boc))])
        self.mid_block = UNetMidBlock2D(boc[-1], cfg, **kw)
        self.conv_norm_out = layers.GroupNorm(boc[-1], cfg.norm_num_groups, NORM_EPS, **kw)
        self.conv_out = layers.Conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # diffusers: SiLU here whatever act_fn is


class Decoder(nnx.Module):
    """conv_in, mid block, up blocks (mirrored channels), GroupNorm-SiLU-conv_out to image channels."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev = tuple(reversed(cfg.block_out_channels))
        self.conv_in = layers.Conv2d(cfg.latent_channels, rev[0], 3, padding=1, **kw)
        self.mid_block = UNetMidBlock2D(rev[0], cfg, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg, add_upsample=i < len(rev) - 1, **kw)
            for i in range(len(rev))])
        self.conv_norm_out = layers.GroupNorm(rev[-1], cfg.norm_num_groups, NORM_EPS, **kw)
        self.conv_out = layers.Conv2d(rev[-1], cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------- the model

def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A reparameterised draw ``mean + exp(logvar / 2) * eps`` from the encoder's diagonal Gaussian."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps).astype(mean.dtype)


class AutoencoderKL(nnx.Module):
    """``encode(images NHWC in [-1, 1]) -> (mean, logvar)``, ``decode(z) -> images``; latents unscaled."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config, self.dtype = config, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lat = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = layers.Conv2d(2 * lat, 2 * lat, 1, padding=0, **kw) if config.use_quant_conv else None
        self.post_quant_conv = layers.Conv2d(lat, lat, 1, padding=0, **kw) if config.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean and log-variance ``(B, H/f, W/f, latent_channels)``; logvar clipped to [-30, 20] as diffusers."""
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction: encode, sample the posterior (its mean when ``rng`` is None), decode."""
        mean, logvar = self.encode(images)
        return self.decode(mean if rng is None else sample_latent(mean, logvar, rng))
