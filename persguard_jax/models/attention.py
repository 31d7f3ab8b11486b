"""Scaled dot-product attention with one implementation per backend, chosen by name from config.

``IMPLEMENTATIONS`` (``step.attention`` in a workflow config, ``load_pipeline(..., attention=)``):
- ``auto``: the fastest this backend has for the shapes at hand: CPU the einsum path, GPU cuDNN's flash kernel,
  TPU the Pallas flash kernel; whatever a kernel cannot take falls back to ``xla``;
- ``einsum``: the explicit matmul path (``einsum_attention``), any backend;
- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, any backend;
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention``, where the shapes allow;
- ``pallas``: the Pallas TPU flash-attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``), where
  the shapes allow.
``choose`` is the rule that turns a name into the kernel one call runs; it is pure, so a test checks the GPU and
TPU choices on a CPU. The setting is a static attribute of the attention modules (``set_attention``), so it lives
in the graph definition, as the remat policy does.
"""
from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

Implementation = Literal["auto", "einsum", "xla", "cudnn", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)
# cuDNN's fused flash attention (cudnn >= 9, as jax.nn.dot_product_attention calls it): half precision inputs, a
# head dimension that is a multiple of 8 up to 128
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128
# the Pallas TPU kernel tiles queries and keys in blocks of 128 and the head dimension in lanes of 128
PALLAS_BLOCK = 128


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    return name


def cudnn_fits(dtype, head_dim: int) -> bool:
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and head_dim % 8 == 0 \
        and head_dim <= CUDNN_MAX_HEAD_DIM


def pallas_fits(q_len: int, kv_len: int, head_dim: int) -> bool:
    # SD's self-attention (64x64 = 4096 tokens and the lower levels) fits; cross-attention on 77 text tokens does not
    return q_len % PALLAS_BLOCK == 0 and kv_len % PALLAS_BLOCK == 0 and head_dim <= PALLAS_BLOCK


def choose(name: str, *, backend: str, dtype, head_dim: int, q_len: int, kv_len: int) -> str:
    """The kernel one attention call runs: ``einsum``, ``xla``, ``cudnn`` or ``pallas``.

    ``auto`` picks by ``backend`` (``jax.default_backend()``): ``cpu`` einsum (cheaper backward on XLA:CPU,
    docs/benchmarks.md), ``gpu``/``cuda`` cuDNN, ``tpu`` Pallas, any other (``rocm``) XLA's; ``cudnn`` and ``pallas`` (asked for or
    picked) become ``xla`` for a call whose dtype or shapes the kernel cannot take, and off their backend."""
    check_implementation(name)
    gpu = backend in ("gpu", "cuda")
    if name == "auto":
        name = {"cpu": "einsum", "tpu": "pallas"}.get(backend, "cudnn" if gpu else "xla")
    if name == "cudnn" and not (gpu and cudnn_fits(dtype, head_dim)):
        return "xla"
    if name == "pallas" and not (backend == "tpu" and pallas_fits(q_len, kv_len, head_dim)):
        return "xla"
    return name


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, *, is_causal: bool = False,
              upcast: bool = False, implementation: str = "auto", backend: str | None = None) -> jax.Array:
    """Multi-head scaled dot-product attention on ``(B, T, heads * head_dim)`` projections, through the kernel
    ``choose`` picks for ``implementation`` on ``backend`` (default: ``jax.default_backend()``). ``upcast`` runs
    the whole product in float32 (diffusers' ``upcast_attention`` for SD 2.x at fp16/bf16)."""
    b, tq, d = q.shape
    out_dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    head_dim = d // num_heads
    kernel = choose(implementation, backend=backend or jax.default_backend(), dtype=q.dtype, head_dim=head_dim,
                    q_len=tq, kv_len=k.shape[1])
    if kernel == "einsum":
        out = einsum_attention(q, k, v, num_heads, is_causal)
    else:
        split = lambda a: a.reshape(a.shape[0], a.shape[1], num_heads, head_dim)
        if kernel == "pallas":
            out = pallas_attention(split(q), split(k), split(v), is_causal)
        else:
            out = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=is_causal,
                                               implementation=kernel)
    return out.reshape(b, tq, d).astype(out_dtype)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool) -> jax.Array:
    """The Pallas TPU flash kernel on ``(B, T, H, D)`` (it takes ``(B, H, T, D)``); off TPU it runs only under
    ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (the parity test). Inside the engine's per-device
    data-parallel step (shard_map) each device runs it on its own shard; a GSPMD-partitioned step (fsdp or
    tensor axes) hands it global arrays, where ``xla`` is the safer setting."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention
    heads_first = lambda a: a.transpose(0, 2, 1, 3)
    out = flash_attention(heads_first(q), heads_first(k), heads_first(v), causal=is_causal,
                          sm_scale=q.shape[-1] ** -0.5)
    return heads_first(out)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, is_causal: bool) -> jax.Array:
    """Softmax attention as plain matmuls with heads as a batch dimension; float32 scores and softmax.

    Same maths as ``jax.nn.dot_product_attention``, arranged for a cheap autodiff backward on CPU: the
    softmax is left unnormalised (``e = exp(s - max)``) and the row sums divide the small ``(Tq, head_dim)``
    output instead of the ``(Tq, Tk)`` matrix (as flash attention does), so forward and backward make fewer
    passes over the big matrix, and the matmuls see row-major operands with no transposed copies of it. On
    XLA:CPU the backward derived for ``jax.nn.dot_product_attention`` transposes the (B, H, Tq, Tk) probability
    matrix several times: in the tiny UNet training step this path cut the whole step ~35% (86.6 -> 56.7 ms).
    Returns ``(B, Tq, heads * head_dim)``.
    """
    b, tq, d = q.shape
    head_dim = d // num_heads
    heads = lambda a: a.reshape(a.shape[0], a.shape[1], num_heads, head_dim).transpose(0, 2, 1, 3)
    bdot = lambda x, y, cx, cy: jax.lax.dot_general(x, y, (((cx,), (cy,)), ((0, 1), (0, 1))),
                                                  preferred_element_type=jnp.float32)
    qh = heads(q * jnp.asarray(head_dim ** -0.5, q.dtype))
    kh, vh = heads(k), heads(v)
    s = bdot(qh, kh, 3, 3)                                                 # (B, H, Tq, Tk) float32
    if is_causal:  # query i sees keys 0..i, as jax.nn.dot_product_attention (every row keeps key 0)
        tk = s.shape[-1]
        s = jnp.where(jnp.arange(tq)[:, None] >= jnp.arange(tk)[None, :], s, -jnp.inf)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    out = bdot(e.astype(vh.dtype), vh, 3, 2) / e.sum(-1, keepdims=True)   # (B, H, Tq, head_dim)
    return out.transpose(0, 2, 1, 3).reshape(b, tq, d)


def set_attention(module: nnx.Module, name: str) -> nnx.Module:
    """Set implementation ``name`` on every attention sub-module (those with an ``attention_impl`` attribute: the
    UNet's, the VAE's mid-block and CLIP's); returns ``module``."""
    check_implementation(name)
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, nnx.Module) and hasattr(sub, "attention_impl"):
            sub.attention_impl = name
    return module
