"""Flax NNX port of transformers' CLIP: the Stable Diffusion text encoder, and the vision tower / full model.

Attribute names mirror transformers (``text_model.encoder.layers.3.self_attn.q_proj``, ``vision_model.pre_layrnorm``
[sic]) so convert.load_state_dict maps a transformers state dict directly. transformers 5 saves a bare
``CLIPTextModel`` without the ``text_model.`` prefix that real SD checkpoints carry: ``add_text_model_prefix``
accepts both. Images are NHWC and already normalised with the CLIP mean/std.

Config classes read transformers ``config.json`` files. Those carry many generic ``PretrainedConfig`` keys
(generation settings, ``torch_dtype``, ...) that do not change the network, so unknown keys are ignored; values
that would change the maths and are not ported (a non-zero dropout, an unknown activation, a list of EOS ids,
non-square sizes) are refused with a one-line error naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from persguard_jax.config import check_fields
from persguard_jax.models import layers
from persguard_jax.models.attention import attention
from persguard_jax.models.convert import WeightsError
from persguard_jax.models.remat import maybe_remat

LEGACY_RENAMES: list[tuple[str, str]] = []  # transformers has kept CLIP's parameter names since its first release
# position_ids were a persistent buffer before transformers 4.31; older files still hold it
IGNORE_KEYS: list[str] = [r"^(text_model|vision_model)\.embeddings\.position_ids$"]

_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def add_text_model_prefix(tensors: dict) -> dict:
    """Prefix bare ``CLIPTextModel`` keys (``embeddings.``/``encoder.``/``final_layer_norm.``, as transformers 5
    saves them) with ``text_model.``; keys that already have it, and ``text_projection``, are left alone."""
    return {("text_model." + k if k.startswith(_TEXT_MODEL_PARTS) else k): v for k, v in tensors.items()}


# --------------------------------------------------------------------------- configs

def _sub_config(d: dict, key: str, model_type: str, source: str) -> dict:
    """``d`` itself, or its ``text_config``/``vision_config`` when ``d`` is a full ``CLIPModel`` config."""
    if d.get("model_type") == "clip" and key in d:
        d = d[key] or {}
    if d.get("model_type", model_type) != model_type:
        raise WeightsError(f"{source}: model_type={d['model_type']!r} is not a CLIP {model_type.split('_')[1]} "
                           f"config (expected {model_type!r})")
    return d


def _from_dict(cls, d: dict, source: str):
    names = {f.name for f in dataclasses.fields(cls)}
    for key in ("attention_dropout", "dropout"):
        if d.get(key) not in (None, 0, 0.0):
            raise WeightsError(f"{source}: {key}={d[key]!r} is not supported by the JAX CLIP (the port is "
                               f"deterministic; only 0.0)")
    config = cls(**check_fields(cls, {k: v for k, v in d.items() if k in names}, source, error=WeightsError,
                                key_label="{where}: {key}"))
    config.validate(source)
    return config


def _positive_ints(config, keys: tuple[str, ...], source: str, why: str = "needs a positive int") -> None:
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, int) or value < 1:
            raise WeightsError(f"{source}: {key}={value!r} is not supported by the JAX CLIP ({why})")


def _validate(config, source: str) -> None:
    def refuse(key, why):
        raise WeightsError(f"{source}: {key}={getattr(config, key)!r} is not supported by the JAX CLIP ({why})")

    if config.hidden_act not in layers.ACTIVATIONS:
        refuse("hidden_act", f"known activations: {', '.join(sorted(layers.ACTIVATIONS))}")
    _positive_ints(config, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"), source)
    if config.hidden_size % config.num_attention_heads:
        refuse("num_attention_heads", f"must divide hidden_size {config.hidden_size}")
    if not isinstance(config.layer_norm_eps, (int, float)):
        refuse("layer_norm_eps", "needs a number")


class _TowerConfig:
    """``from_dict`` of the two towers' configs: a tower's own ``config.json``, or its part of a ``CLIPModel``'s."""
    _SUB, _MODEL_TYPE = "", ""

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json"):
        return _from_dict(cls, _sub_config(d, cls._SUB, cls._MODEL_TYPE, source), source)


@dataclass(frozen=True)
class CLIPTextConfig(_TowerConfig):
    """transformers ``CLIPTextConfig`` (its defaults: openai/clip-vit-base-patch32)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02  # informational (training-from-scratch settings), kept for round trips
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    _SUB, _MODEL_TYPE = "text_config", "clip_text_model"

    def validate(self, source: str = "CLIPTextConfig") -> None:
        _validate(self, source)
        if not isinstance(self.eos_token_id, int):
            raise WeightsError(f"{source}: eos_token_id={self.eos_token_id!r} is not supported by the JAX CLIP "
                               f"(needs a single int: the pooled output is taken at that token)")
        _positive_ints(self, ("vocab_size", "max_position_embeddings"), source)

    def to_dict(self) -> dict:
        """A transformers ``config.json`` dict (``CLIPTextConfig(**d)`` builds the same model)."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
                **dataclasses.asdict(self)}


@dataclass(frozen=True)
class CLIPVisionConfig(_TowerConfig):
    """transformers ``CLIPVisionConfig`` (its defaults: openai/clip-vit-base-patch32)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    _SUB, _MODEL_TYPE = "vision_config", "clip_vision_model"

    def validate(self, source: str = "CLIPVisionConfig") -> None:
        _validate(self, source)
        _positive_ints(self, ("image_size", "patch_size", "num_channels"), source,
                       "needs a positive int: square images and patches")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
                "attention_dropout": 0.0, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class CLIPConfig:
    """transformers ``CLIPConfig``: both towers, the shared projection size and the initial logit scale."""
    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "CLIPConfig":
        if d.get("model_type", "clip") != "clip":
            raise WeightsError(f"{source}: model_type={d['model_type']!r} is not a CLIPModel config")
        shared = check_fields(cls, {k: d[k] for k in ("projection_dim", "logit_scale_init_value") if k in d}, source,
                              error=WeightsError, key_label="{where}: {key}")
        return cls(text_config=CLIPTextConfig.from_dict(d.get("text_config") or {}, source),
                   vision_config=CLIPVisionConfig.from_dict(d.get("vision_config") or {}, source), **shared)

    def to_dict(self) -> dict:
        strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "architectures"}
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value,
                "text_config": strip(self.text_config), "vision_config": strip(self.vision_config)}


def text_config_sd15() -> "CLIPTextConfig":
    """The SD 1.x text encoder (openai/clip-vit-large-patch14's text tower, runwayml/stable-diffusion-v1-5
    ``text_encoder/config.json``)."""
    return CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                          num_attention_heads=12, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)


def text_config_sd21() -> "CLIPTextConfig":
    """The SD 2.x text encoder (OpenCLIP ViT-H/14's text tower, 23 of its 24 layers, stabilityai/stable-diffusion-2-1
    ``text_encoder/config.json``)."""
    return CLIPTextConfig(hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23,
                          num_attention_heads=16, hidden_act="gelu", bos_token_id=0, eos_token_id=2)


# --------------------------------------------------------------------------- transformer

class CLIPAttention(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = partial(layers.Linear, cfg.hidden_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = lin(axes=("embed", "heads"))
        self.v_proj = lin(axes=("embed", "heads"))
        self.q_proj = lin(axes=("embed", "heads"))
        self.out_proj = lin(axes=("heads", "embed"))
        self.num_heads = cfg.num_attention_heads
        self.attention_impl = "auto"  # models.attention.set_attention

    def __call__(self, x: jax.Array, *, is_causal: bool) -> jax.Array:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, is_causal=is_causal,
                        implementation=self.attention_impl)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = layers.Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(layers.activation(self.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LayerNorm self-attention and MLP, each residual."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm1 = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array, *, is_causal: bool) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), is_causal=is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.remat = "none"  # rematerialisation policy of the layers (models/remat.py)

    def __call__(self, x: jax.Array, *, is_causal: bool) -> tuple[jax.Array, ...]:
        """All hidden states, as transformers' ``hidden_states``: the input, then each layer's output."""
        states = [x]
        call = maybe_remat(lambda layer, h: layer(h, is_causal=is_causal), self.remat)
        for layer in self.layers:
            states.append(call(layer, states[-1]))
        return tuple(states)


# --------------------------------------------------------------------------- text tower

class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = layers.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.position_embedding = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"), **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"CLIP text: {length} tokens, the model has {self.position_embedding.num_embeddings} "
                             f"positions")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]


class CLIPTextTransformer(nnx.Module):
    """embeddings -> causal encoder -> final_layer_norm (transformers' ``text_model``)."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, **kw)
        self.final_layer_norm = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.eos_token_id = cfg.eos_token_id

    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Last hidden state after ``final_layer_norm``, and all hidden states (before it)."""
        states = self.encoder(self.embeddings(input_ids), is_causal=True)
        return self.final_layer_norm(states[-1]), states

    def pool(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
        """The hidden state at each sequence's EOS token, by transformers' rule."""
        if self.eos_token_id == 2:  # configs from before transformers#24773: EOS is the largest id
            pos = jnp.argmax(input_ids, axis=-1)
        else:  # the first EOS (padding may use the same id)
            pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(last_hidden_state, pos[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nnx.Module):
    """``te(input_ids (B, L)) -> last_hidden_state (B, L, D)``; the Stable Diffusion text encoder."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False):
        """``last_hidden_state``, or ``(last_hidden_state, hidden_states)`` with ``output_hidden_states``:
        ``hidden_states`` is the embedding output then every layer's output, without the final LayerNorm
        (so ``hidden_states[-2]`` is the penultimate layer some SD 2 tools condition on)."""
        last, states = self.text_model(input_ids)
        return (last, states) if output_hidden_states else last

    def pooled(self, input_ids: jax.Array) -> jax.Array:
        """``(B, D)``: the final hidden state at the EOS token (transformers' ``pooler_output``)."""
        last, _ = self.text_model(input_ids)
        return self.text_model.pool(last, input_ids)


def _projection(in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> layers.Linear:
    return layers.Linear(in_features, out_features, axes=("embed", None), use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


class CLIPTextModelWithProjection(nnx.Module):
    """``model(input_ids) -> text_embeds (B, projection_dim)`` (not normalised), as transformers."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        if config.projection_dim is None:
            raise WeightsError("CLIPTextConfig: projection_dim=None, CLIPTextModelWithProjection needs one")
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_model = CLIPTextTransformer(config, **kw)
        self.text_projection = _projection(config.hidden_size, config.projection_dim, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        last, _ = self.text_model(input_ids)
        return self.text_projection(self.text_model.pool(last, input_ids))


# --------------------------------------------------------------------------- vision tower

class CLIPVisionEmbeddings(nnx.Module):
    """Class token + non-overlapping patches (a strided conv), plus learned positions."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        init = layers.partitioned(nnx.initializers.normal(d ** -0.5), ("embed",))
        self.class_embedding = nnx.Param(init(rngs.params(), (d,), param_dtype))
        self.patch_embedding = layers.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, padding=0,
                                             use_bias=False, **kw)
        self.position_embedding = layers.Embed(cfg.num_patches + 1, d, axes=(None, "embed"), **kw)
        self.image_size, self.dtype = cfg.image_size, dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP vision: input image size ({h}*{w}) doesn't match the model "
                             f"({self.image_size}*{self.image_size})")
        patches = self.patch_embedding(pixel_values)  # (B, h/p, w/p, D), row-major patches like torch's flatten
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPVisionTransformer(nnx.Module):
    """embeddings -> pre_layrnorm -> encoder; pooled = post_layernorm(class token) (transformers' ``vision_model``)."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        self.pre_layrnorm = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)  # [sic], transformers' name
        self.encoder = CLIPEncoder(cfg, **kw)
        self.post_layernorm = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(last_hidden_state (B, 1 + patches, D), pooled (B, D))``."""
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), is_causal=False)
        return states[-1], self.post_layernorm(states[-1][:, 0])


class CLIPVisionModelWithProjection(nnx.Module):
    """``model(pixel_values NHWC, CLIP-normalised) -> image_embeds (B, projection_dim)`` (not normalised)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(config, **kw)
        self.visual_projection = _projection(config.hidden_size, config.projection_dim, **kw)

    def __call__(self, pixel_values: jax.Array, *, return_pooled: bool = False):
        """``image_embeds``, or ``(image_embeds, pooled)`` with ``return_pooled`` (pooled: before the projection)."""
        _, pooled = self.vision_model(pixel_values)
        embeds = self.visual_projection(pooled)
        return (embeds, pooled) if return_pooled else embeds


# --------------------------------------------------------------------------- both towers

def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nnx.Module):
    """Both towers with their projections: ``model(input_ids, pixel_values) -> logits_per_image (B_img, B_txt)``."""

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        config.text_config.validate()
        config.vision_config.validate()
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_model = CLIPTextTransformer(config.text_config, **kw)
        self.vision_model = CLIPVisionTransformer(config.vision_config, **kw)
        self.visual_projection = _projection(config.vision_config.hidden_size, config.projection_dim, **kw)
        self.text_projection = _projection(config.text_config.hidden_size, config.projection_dim, **kw)
        init = layers.partitioned(nnx.initializers.constant(config.logit_scale_init_value), ())
        self.logit_scale = nnx.Param(init(rngs.params(), (), param_dtype))

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """Projected EOS hidden state ``(B, projection_dim)``, not normalised."""
        last, _ = self.text_model(input_ids)
        return self.text_projection(self.text_model.pool(last, input_ids))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected pooled class token ``(B, projection_dim)``, not normalised."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> jax.Array:
        """Scaled cosine similarities ``logits_per_image`` (``.T`` is ``logits_per_text``), in float32."""
        text = _normalize(self.get_text_features(input_ids))
        image = _normalize(self.get_image_features(pixel_values))
        return image @ text.T * jnp.exp(self.logit_scale[...].astype(jnp.float32))
