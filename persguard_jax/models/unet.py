"""Flax NNX port of diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x and similar configs).

Attribute names mirror the diffusers modules (``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q``)
so convert.load_state_dict maps a diffusers ``unet/`` state dict with no model-specific rules. Images are
NHWC. Only the block types Stable Diffusion uses are ported; ``UNetConfig.from_dict`` refuses every other
option with a one-line error naming the key, rather than silently computing something else.

Behaviour follows diffusers exactly, including its naming quirk: ``attention_head_dim`` is really the
*number of heads* per block (diffusers: ``num_attention_heads = num_attention_heads or attention_head_dim``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from persguard_jax.models import layers
from persguard_jax.models.attention import attention
from persguard_jax.models.convert import WeightsError, config_kwargs
from persguard_jax.models.remat import maybe_remat

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"

# diffusers.models.activations.get_activation names (not the transformers names layers.ACTIVATIONS uses).
ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": layers.gelu, "relu": jax.nn.relu, "mish": jax.nn.mish,
}

# --------------------------------------------------------------------------- config

# Keys diffusers accepts that only matter for blocks/embeddings we do not port (SimpleCrossAttn, ResnetDownsample,
# text_time / projection embeddings), so any value is harmless once those are refused.
_IGNORED_KEYS = {
    "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm", "mid_block_only_cross_attention",
    "addition_embed_type_num_heads", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
}
# Keys whose non-default values need modules we do not port: only the default is accepted.
_DEFAULT_ONLY = {
    "num_attention_heads": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "addition_embed_type": None, "time_cond_proj_dim": None, "reverse_transformer_layers_per_block": None,
}


def _freeze(v: Any) -> Any:
    """JSON lists -> tuples, so the config is hashable (it is static data of the jitted module)."""
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


class HashableFields:
    """For the frozen config dataclasses read from ``config.json``: list values become tuples on construction."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))


def native_latent_size(config: "UNetConfig", source: str = "unet/config.json") -> tuple[int, int]:
    """(height, width) in latent pixels a pipeline samples at by default: ``sample_size``, an int or a pair;
    ValueError naming ``source`` when the config has none."""
    size = config.sample_size
    if size is None:
        raise ValueError(f"{source}: no sample_size, so the model has no default image size; give the size "
                         f"(--height/--width, --resolution)")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def native_latent_side(config: "UNetConfig", source: str = "unet/config.json") -> int:
    """The side of ``native_latent_size`` for what needs square images (training, evaluation, memory plans)."""
    height, width = native_latent_size(config, source)
    if height != width:
        raise ValueError(f"{source}: sample_size {height}x{width} is not square; give the resolution")
    return height


@dataclass(frozen=True)
class UNetConfig(HashableFields):
    """The ``config.json`` keys of a diffusers ``UNet2DConditionModel`` this port supports (diffusers defaults)."""
    BOUNDS = {
        k: "[1, inf)" for k in ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                                "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
                                "attention_head_dim", "num_class_embeds", "time_embedding_dim", "conv_in_kernel",
                                "conv_out_kernel")} | {"norm_eps": "(0, inf)", "downsample_padding": "[0, inf)"}
    sample_size: int | tuple[int, int] | None = None  # informational (the pipeline's default latent size)
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    mid_block_type: str = MID_BLOCK
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # = number of heads, see the module docstring
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention_type: str = "default"
    class_embeddings_concat: bool = False

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "UNetConfig":
        kw = config_kwargs(cls, d, source, "UNet2DConditionModel", "UNet", ignored=_IGNORED_KEYS,
                           default_only=_DEFAULT_ONLY)
        config = cls(**kw)
        config.validate(source)
        return config

    def to_dict(self) -> dict:
        """A ``config.json`` dict diffusers' ``UNet2DConditionModel.from_config`` builds the same model from."""
        return {"_class_name": "UNet2DConditionModel",
                **{f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    # ------------------------------------------------------------------ validation and per-block values

    def validate(self, source: str = "UNetConfig") -> None:
        def refuse(key, why):
            raise WeightsError(f"{source}: {key}={getattr(self, key)!r} is not supported by the JAX UNet ({why})")

        n = len(self.block_out_channels)
        for key, allowed in (("down_block_types", (CROSS_DOWN, PLAIN_DOWN)), ("up_block_types", (CROSS_UP, PLAIN_UP))):
            types = getattr(self, key)
            if len(types) != n:
                refuse(key, f"needs one entry per block_out_channels ({n})")
            for t in types:
                if _strip_res(t) not in allowed:
                    refuse(key, f"block type {t!r}; supported: {', '.join(allowed)}")
        for key, value, why in (
                ("mid_block_type", MID_BLOCK, "only UNetMidBlock2DCrossAttn"),
                ("dual_cross_attention", False, "only False"),
                ("attention_type", "default", "only 'default'"),
                ("resnet_time_scale_shift", "default", "only 'default'"),
                ("time_embedding_type", "positional", "only 'positional'"),
                ("dropout", 0.0, "the port is deterministic; only 0.0")):
            if getattr(self, key) != value:
                refuse(key, why)
        if self.class_embed_type not in (None, "timestep", "identity"):
            refuse("class_embed_type", "supported: None (with num_class_embeds), 'timestep', 'identity'")
        if not isinstance(self.cross_attention_dim, int):
            refuse("cross_attention_dim", "only a single int, not one per block")
        if self.norm_num_groups is None:
            refuse("norm_num_groups", "GroupNorm is required")
        for key in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
            act = getattr(self, key)
            if act is not None and act not in ACTIVATIONS:
                refuse(key, f"known activations: {', '.join(sorted(ACTIVATIONS))}")
        for key in ("only_cross_attention", "layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, key)
            if isinstance(value, tuple):
                if len(value) != n:
                    refuse(key, f"needs one entry per block ({n})")
                if any(isinstance(v, tuple) or v is None for v in value):
                    refuse(key, "per-layer nesting and None entries are not ported")
            elif value is None:
                refuse(key, "must be set")

    def per_block(self, key: str) -> tuple:
        """``key`` as one value per down block (diffusers broadcasts an int/bool to every block)."""
        value = getattr(self, key)
        return value if isinstance(value, tuple) else (value,) * len(self.down_block_types)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4


def _strip_res(block_type: str) -> str:
    # diffusers' get_down_block/get_up_block accept an old "UNetRes" prefix for the same blocks
    return block_type[7:] if block_type.startswith("UNetRes") else block_type


def unet_config_sd15() -> UNetConfig:
    """runwayml/stable-diffusion-v1-5 ``unet/config.json`` (also SD 1.1-1.4)."""
    return UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                      block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
                      norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu")


def unet_config_sd21(base: bool = False) -> UNetConfig:
    """stabilityai/stable-diffusion-2-1 (768px v-prediction, fp32 attention) or, with ``base``, 2-1-base (512px)."""
    return UNetConfig(sample_size=64 if base else 96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                      block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, use_linear_projection=True,
                      upcast_attention=not base, flip_sin_to_cos=True, freq_shift=0)


# --------------------------------------------------------------------------- embeddings

def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``(N,) -> (N, dim)`` in float32, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    """linear_1 -> act -> linear_2 (-> post_act): the MLP on the sinusoidal embedding."""

    def __init__(self, in_features: int, dim: int, act_fn: str, post_act_fn: str | None = None, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        lin = partial(layers.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = lin(in_features, dim, axes=("embed", "mlp"))
        self.linear_2 = lin(dim, dim, axes=("mlp", "embed"))
        self.act_fn, self.post_act_fn = act_fn, post_act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.linear_2(ACTIVATIONS[self.act_fn](self.linear_1(x)))
        return ACTIVATIONS[self.post_act_fn](x) if self.post_act_fn else x


# --------------------------------------------------------------------------- resnet, resampling

class ResnetBlock2D(nnx.Module):
    """GroupNorm-act-conv twice, with the time embedding added between; 1x1 conv shortcut if channels change."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, cfg: UNetConfig, *, output_scale_factor: float = 1.0,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.GroupNorm(in_ch, cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv1 = layers.Conv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.time_emb_proj = layers.Linear(temb_ch, out_ch, axes=("embed", "conv_out"), **kw)
        self.norm2 = layers.GroupNorm(out_ch, cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv2 = layers.Conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.conv_shortcut = layers.Conv2d(in_ch, out_ch, 1, padding=0, **kw) if in_ch != out_ch else None
        self.act_fn, self.output_scale_factor = cfg.act_fn, output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act_fn]
        h = self.conv1(act(self.norm1(x)))
        h = h + self.time_emb_proj(act(temb))[:, None, None, :]
        h = self.conv2(act(self.norm2(h)))  # dropout is 0 (validated)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=0`` pads right/bottom only, as diffusers does, so sizes still halve."""

    def __init__(self, ch: int, padding: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        pad = padding if padding else [(0, 1), (0, 1)]
        self.conv = layers.Conv2d(ch, ch, 3, stride=2, padding=pad, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC nearest-neighbour resize, as torch ``F.interpolate(mode="nearest")`` (src = floor(dst * in / out))."""
    b, h, w, c = x.shape
    if size == (2 * h, 2 * w):  # the common case: a broadcast, cheaper than a gather
        return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    rows = (jnp.arange(size[0]) * h) // size[0]
    cols = (jnp.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    def __init__(self, ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = layers.Conv2d(ch, ch, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        return self.conv(upsample_nearest(x, size))


# --------------------------------------------------------------------------- attention

class Attention(nnx.Module):
    """Multi-head attention without q/k/v biases (diffusers ``Attention`` with ``bias=False``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, *, upcast: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        lin = partial(layers.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner, kv_in = heads * head_dim, context_dim or dim
        self.to_q = lin(dim, inner, axes=("embed", "heads"), use_bias=False)
        self.to_k = lin(kv_in, inner, axes=("embed", "heads"), use_bias=False)
        self.to_v = lin(kv_in, inner, axes=("embed", "heads"), use_bias=False)
        self.to_out = nnx.List([lin(inner, dim, axes=("heads", "embed"))])  # to_out.1 is a parameterless dropout
        self.heads, self.upcast = heads, upcast
        self.attention_impl = "auto"  # models.attention.set_attention

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast,
                        implementation=self.attention_impl)
        return self.to_out[0](out)


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = layers.Linear(dim, 2 * inner, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * layers.gelu(gate)  # exact (erf) GELU, as torch F.gelu


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, mult: int = 4, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # net.1 is dropout in diffusers; a None keeps net.2's index (and so its checkpoint key)
        self.net = nnx.List([GEGLU(dim, dim * mult, **kw), None,
                             layers.Linear(dim * mult, dim, axes=("mlp", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual.

    With ``only_cross_attention`` the first attention also attends to the text instead of the image tokens.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, cfg: UNetConfig, only_cross: bool, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ctx = cfg.cross_attention_dim
        self.norm1 = layers.LayerNorm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads, head_dim, ctx if only_cross else None, upcast=cfg.upcast_attention, **kw)
        self.norm2 = layers.LayerNorm(dim, 1e-5, **kw)
        self.attn2 = Attention(dim, heads, head_dim, ctx, upcast=cfg.upcast_attention, **kw)
        self.norm3 = layers.LayerNorm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, **kw)
        self.only_cross = only_cross

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, project to tokens, transformer blocks, project back, residual (continuous-input variant)."""

    def __init__(self, ch: int, heads: int, num_layers: int, cfg: UNetConfig, only_cross: bool, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        head_dim = ch // heads
        inner = heads * head_dim
        self.norm = layers.GroupNorm(ch, cfg.norm_num_groups, 1e-6, **kw)  # diffusers hard-codes eps 1e-6 here
        if cfg.use_linear_projection:  # SD 2.x: Linear on tokens; SD 1.x: 1x1 conv (same maths, other key shape)
            self.proj_in = layers.Linear(ch, inner, axes=("conv_in", "embed"), **kw)
            self.proj_out = layers.Linear(inner, ch, axes=("embed", "conv_out"), **kw)
        else:
            self.proj_in = layers.Conv2d(ch, inner, 1, padding=0, **kw)
            self.proj_out = layers.Conv2d(inner, ch, 1, padding=0, **kw)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(inner, heads, head_dim, cfg, only_cross, **kw)
                                            for _ in range(num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        # NHWC makes conv and linear projections the same reshape: tokens are the flattened pixels
        tokens = self.proj_in(self.norm(x))
        tokens = tokens.reshape(b, h * w, tokens.shape[-1])
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.reshape(b, h, w, tokens.shape[-1]))


# --------------------------------------------------------------------------- UNet blocks

class DownBlock(nnx.Module):
    """``CrossAttnDownBlock2D`` (``attentions`` set) or ``DownBlock2D`` (``attentions`` None)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, cfg: UNetConfig, *, num_layers: int, cross: bool,
                 heads: int, transformer_layers: int, only_cross: bool, add_downsample: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, cfg, **kw)
                                 for i in range(num_layers)])
        self.attentions = nnx.List([Transformer2DModel(out_ch, heads, transformer_layers, cfg, only_cross, **kw)
                                    for _ in range(num_layers)]) if cross else None
        self.downsamplers = nnx.List([Downsample2D(out_ch, cfg.downsample_padding, **kw)]) if add_downsample else None

    def __call__(self, x, temb, context) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, ch: int, temb_ch: int, cfg: UNetConfig, *, heads: int, transformer_layers: int,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        scale = cfg.mid_block_scale_factor
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb_ch, cfg, output_scale_factor=scale, **kw)
                                 for _ in range(2)])
        # the mid block never uses only_cross_attention in diffusers (that flag is for the SimpleCrossAttn variant)
        self.attentions = nnx.List([Transformer2DModel(ch, heads, transformer_layers, cfg, False, **kw)])

    def __call__(self, x, temb, context) -> jax.Array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UpBlock(nnx.Module):
    """``CrossAttnUpBlock2D`` / ``UpBlock2D``: each resnet first concatenates one skip from the down path."""

    def __init__(self, in_ch: int, out_ch: int, prev_ch: int, temb_ch: int, cfg: UNetConfig, *, num_layers: int,
                 cross: bool, heads: int, transformer_layers: int, only_cross: bool, add_upsample: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        resnets = []
        for i in range(num_layers):
            skip_ch = in_ch if i == num_layers - 1 else out_ch
            resnets.append(ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip_ch, out_ch, temb_ch, cfg, **kw))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([Transformer2DModel(out_ch, heads, transformer_layers, cfg, only_cross, **kw)
                                    for _ in range(num_layers)]) if cross else None
        self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if add_upsample else None

    def __call__(self, x, skips: list[jax.Array], temb, context, size: tuple[int, int] | None) -> jax.Array:
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


# --------------------------------------------------------------------------- the model

def _up_call(size: tuple[int, int] | None):
    """An up-block call with the output size closed over: remat must see it as a constant, not an argument."""
    return lambda block, x, skips, temb, context: block(x, list(skips), temb, context, size)


class UNet2DConditionModel(nnx.Module):
    """``unet(sample (B,H,W,C) NHWC, timesteps () or (B,), context (B,L,D), class_labels=None) -> (B,H,W,out)``."""

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config, self.dtype = config, dtype
        self.remat = "none"  # rematerialisation policy of the blocks (models/remat.py)
        cfg, kw = config, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc, n = cfg.block_out_channels, len(cfg.block_out_channels)
        temb = cfg.time_embed_dim

        self.conv_in = layers.Conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel,
                                     padding=(cfg.conv_in_kernel - 1) // 2, **kw)
        self.time_embedding = TimestepEmbedding(boc[0], temb, cfg.act_fn, cfg.timestep_post_act, **kw)
        if cfg.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(boc[0], temb, cfg.act_fn, **kw)
        elif cfg.class_embed_type is None and cfg.num_class_embeds is not None:
            # e.g. the SD x4 upscaler embeds its noise level as a class label
            self.class_embedding = layers.Embed(cfg.num_class_embeds, temb, axes=("vocab", "embed"), **kw)
        else:  # None, or "identity" (class_labels are added as they are)
            self.class_embedding = None
        block_temb = 2 * temb if cfg.class_embeddings_concat else temb

        heads, only_cross = cfg.per_block("attention_head_dim"), cfg.per_block("only_cross_attention")
        num_layers, t_layers = cfg.per_block("layers_per_block"), cfg.per_block("transformer_layers_per_block")

        down, out_ch = [], boc[0]
        for i, block_type in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            down.append(DownBlock(in_ch, out_ch, block_temb, cfg, num_layers=num_layers[i],
                                  cross=_strip_res(block_type) == CROSS_DOWN, heads=heads[i],
                                  transformer_layers=t_layers[i], only_cross=only_cross[i],
                                  add_downsample=i < n - 1, **kw))
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2DCrossAttn(boc[-1], block_temb, cfg, heads=heads[-1],
                                                 transformer_layers=t_layers[-1], **kw)

        # the up path mirrors every per-block setting (diffusers reverses heads, layers, only_cross_attention)
        rev = lambda t: tuple(reversed(t))
        r_boc, r_heads, r_only, r_layers, r_tl = map(rev, (boc, heads, only_cross, num_layers, t_layers))
        up, out_ch = [], r_boc[0]
        for i, block_type in enumerate(cfg.up_block_types):
            prev_ch, out_ch, in_ch = out_ch, r_boc[i], r_boc[min(i + 1, n - 1)]
            up.append(UpBlock(in_ch, out_ch, prev_ch, block_temb, cfg, num_layers=r_layers[i] + 1,
                              cross=_strip_res(block_type) == CROSS_UP, heads=r_heads[i], transformer_layers=r_tl[i],
                              only_cross=r_only[i], add_upsample=i < n - 1, **kw))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = layers.GroupNorm(boc[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = layers.Conv2d(boc[0], cfg.out_channels, cfg.conv_out_kernel,
                                      padding=(cfg.conv_out_kernel - 1) // 2, **kw)

    def _time_embedding(self, timesteps, batch: int, class_labels) -> jax.Array:
        cfg = self.config
        sinusoid = partial(timestep_embedding, dim=cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                           downscale_freq_shift=cfg.freq_shift)
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        emb = self.time_embedding(sinusoid(t).astype(self.dtype))
        if cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("this UNet has a class embedding: pass class_labels")
            if cfg.class_embed_type == "timestep":
                class_emb = self.class_embedding(sinusoid(jnp.asarray(class_labels).reshape(-1)).astype(self.dtype))
            elif cfg.class_embed_type == "identity":
                class_emb = jnp.asarray(class_labels, self.dtype)
            else:
                class_emb = self.class_embedding(jnp.broadcast_to(jnp.asarray(class_labels).reshape(-1), (batch,)))
            class_emb = class_emb.astype(emb.dtype)
            emb = jnp.concatenate([emb, class_emb], -1) if cfg.class_embeddings_concat else emb + class_emb
        if cfg.time_embedding_act_fn:
            emb = ACTIVATIONS[cfg.time_embedding_act_fn](emb)
        return emb

    def __call__(self, sample: jax.Array, timesteps, encoder_hidden_states: jax.Array, *,
                 class_labels=None) -> jax.Array:
        cfg = self.config
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._time_embedding(timesteps, sample.shape[0], class_labels)
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        down = maybe_remat(lambda block, *a: block(*a), self.remat)
        for block in self.down_blocks:
            x, block_skips = down(block, x, emb, context)
            skips += block_skips
        x = maybe_remat(lambda block, *a: block(*a), self.remat)(self.mid_block, x, emb, context)
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            # upsample to the next skip's size: 2x normally, exact for sizes not divisible by 2**n (as diffusers)
            size = tuple(skips[-1].shape[1:3]) if skips else None
            up = maybe_remat(_up_call(size), self.remat)
            x = up(block, x, tuple(block_skips), emb, context)
        x = ACTIVATIONS[cfg.act_fn](self.conv_norm_out(x))
        return self.conv_out(x)
