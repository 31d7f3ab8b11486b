"""Building blocks shared by the UNet, VAE and CLIP ports.

Conventions every port follows (convert.py relies on them):
- Images are NHWC. Attribute names mirror the diffusers/transformers module names, so the flat
  parameter path ``down_blocks/0/resnets/1/conv1/kernel`` *is* the PyTorch key
  ``down_blocks.0.resnets.1.conv1.weight``; leaf names are ``kernel``, ``bias``, ``scale``, ``embedding``
  or the PyTorch name itself (e.g. ``class_embedding``).
- Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``conv_in``, ``conv_out``,
  ``norm``, ``vocab``); sharding.py maps them to mesh axes, the modules never see a mesh. Annotations are
  created with ``eager_sharding=False`` so models can be built (and loaded) with no mesh active.
- ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. Normalisation statistics and the
  attention softmax are always computed in float32.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

CONV_AXES: Axes = (None, None, "conv_in", "conv_out")
NORM_AXES: Axes = ("norm",)


def partitioned(init, axes: Axes):
    """An initializer whose parameters carry logical axis names but are not sharded eagerly."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


class Conv2d(nnx.Conv):
    """NHWC convolution with PyTorch-style symmetric integer padding and logical axes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | Sequence[tuple[int, int]] = 1, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else tuple(padding)
        super().__init__(
            in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride), padding=pad,
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), CONV_AXES),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("conv_out",)),
            rngs=rngs)


class Linear(nnx.Linear):
    """Dense layer whose kernel ``(in, out)`` is annotated with the given logical axes."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes = ("embed", "mlp"),
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(
            in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), axes),
            bias_init=partitioned(nnx.initializers.zeros_init(), (axes[-1],)),
            rngs=rngs)


class Embed(nnx.Embed):
    """Lookup table ``(num, features)``; ``attend``-free, used for token and position embeddings."""

    def __init__(self, num_embeddings: int, features: int, *, axes: Axes = ("vocab", "embed"),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=partitioned(nnx.initializers.normal(0.02), axes), rngs=rngs)


def _norm_params(num_features: int, param_dtype, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    ones = partitioned(nnx.initializers.ones_init(), NORM_AXES)
    zeros = partitioned(nnx.initializers.zeros_init(), NORM_AXES)
    key = rngs.params()
    return (nnx.Param(ones(key, (num_features,), param_dtype)),
            nnx.Param(zeros(key, (num_features,), param_dtype)))


class GroupNorm(nnx.Module):
    """GroupNorm over the channel (last) axis with float32 statistics, as torch.nn.GroupNorm."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale, self.bias = _norm_params(num_channels, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, c = x.shape
        g, n = self.num_groups, lead[0]
        xf = x.astype(jnp.float32)
        xg = xf.reshape(n, -1, g, c // g)
        mean = xg.mean(axis=(1, 3))                                        # (N, G), two-pass variance
        var = jnp.square(xg - mean[:, None, :, None]).mean(axis=(1, 3))
        # Normalisation and affine folded into one per-(example, channel) scale and shift, y = x * a + b: the
        # full-size tensor is touched by one multiply-add (and its backward by fewer passes) instead of
        # subtract, multiply, multiply, add. CPU, fwd+bwd of the tiny UNet's 6 GroupNorm shapes: 5.9 -> 3.9 ms
        # (docs/benchmarks.md).
        a = jax.lax.rsqrt(var + self.eps)[:, :, None] * self.scale[...].astype(jnp.float32).reshape(g, c // g)
        b = self.bias[...].astype(jnp.float32).reshape(g, c // g) - mean[:, :, None] * a
        shape = (n,) + (1,) * (len(lead) - 1) + (c,)
        return (xf * a.reshape(shape) + b.reshape(shape)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with float32 statistics, as torch.nn.LayerNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale, bias = _norm_params(num_features, param_dtype, rngs)
        self.bias = bias if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


# erf as a rational function of x^2 on [-4, 4] (the float32 coefficients of Eigen's fast erf; beyond 4, erf is 1 in
# float32). Why not ``jax.lax.erf``: from jax 0.12 it (and ``erfc``, hence ``jax.nn.gelu``) lowers through a
# ``polynomial`` primitive whose varying-axes rule rejects a device-varying input inside ``jax.shard_map``, which
# is where the engine's per-device data-parallel step runs the model (train/step.py). Plain multiply-adds have no
# such rule. Max abs error against math.erf over [-8, 8] in float32: 3.2e-7 (lax.erf: 2.8e-7).
_ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                  -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                    -1.42647390514189e-02)


def erf(x: jax.Array) -> jax.Array:
    """The error function, in ``x``'s floating dtype (computed in at least float32)."""
    dtype = x.dtype
    x = jnp.clip(x.astype(jnp.promote_types(dtype, jnp.float32)), -4.0, 4.0)
    x2 = x * x
    num, den = jnp.full_like(x, _ERF_NUMERATOR[0]), jnp.full_like(x, _ERF_DENOMINATOR[0])
    for c in _ERF_NUMERATOR[1:]:
        num = num * x2 + c
    for c in _ERF_DENOMINATOR[1:]:
        den = den * x2 + c
    return (x * num / den).astype(dtype)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    """GELU: exact (``0.5 x (1 + erf(x / sqrt 2))``, PyTorch's default) or its tanh approximation."""
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": gelu, "quick_gelu": quick_gelu,
    "gelu_new": lambda x: gelu(x, approximate=True), "gelu_pytorch_tanh": lambda x: gelu(x, approximate=True),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
