"""Attention per backend (persguard_jax/models/attention.py): the selection rule for CPU, GPU and TPU, and the
parity of every path that runs on a CPU (einsum, XLA, the Pallas TPU kernel in interpret mode), forward and
backward, and through a whole UNet."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax.models.attention import attention, choose, set_attention

BF16, F32 = jnp.bfloat16, jnp.float32
SD_SELF = dict(head_dim=64, q_len=4096, kv_len=4096)      # SD 1.5 at 512 px, the 64x64 level
SD_CROSS = dict(head_dim=64, q_len=4096, kv_len=77)       # cross-attention on the 77 text tokens


@pytest.mark.parametrize("name,backend,dtype,shapes,want", [
    ("auto", "cpu", F32, SD_SELF, "einsum"),
    ("auto", "gpu", BF16, SD_SELF, "cudnn"),
    ("auto", "cuda", jnp.float16, SD_CROSS, "cudnn"),       # cuDNN takes any sequence lengths
    ("auto", "gpu", F32, SD_SELF, "xla"),                   # cuDNN flash is half precision only
    ("auto", "gpu", BF16, dict(SD_SELF, head_dim=160), "xla"),
    ("auto", "gpu", BF16, dict(SD_SELF, head_dim=60), "xla"),
    ("auto", "tpu", BF16, SD_SELF, "pallas"),
    ("auto", "tpu", F32, SD_SELF, "pallas"),
    ("auto", "tpu", BF16, SD_CROSS, "xla"),                 # 77 keys: not a whole number of kernel blocks
    ("auto", "rocm", BF16, SD_SELF, "xla"),
    ("cudnn", "cpu", BF16, SD_SELF, "xla"),                 # asked for off its backend
    ("cudnn", "gpu", BF16, SD_SELF, "cudnn"),
    ("pallas", "gpu", BF16, SD_SELF, "xla"),
    ("pallas", "tpu", BF16, SD_SELF, "pallas"),
    ("einsum", "tpu", BF16, SD_SELF, "einsum"),
    ("xla", "gpu", BF16, SD_SELF, "xla"),
])
def test_choice_per_backend(name, backend, dtype, shapes, want):
    assert choose(name, backend=backend, dtype=dtype, **shapes) == want


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="flash.*must be one of|must be one of"):
        choose("flash", backend="cpu", dtype=F32, **SD_SELF)


def _qkv(tq, tk, d=128, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (2, t, d), F32) for k, t in zip(keys, (tq, tk, tk)))


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_paths_agree_forward_and_backward(causal):
    q, k, v = _qkv(128, 128)
    w = jax.random.normal(jax.random.key(9), q.shape)

    def run(impl, backend="cpu"):
        f = lambda q, k, v: jnp.sum(w * attention(q, k, v, 2, is_causal=causal, implementation=impl,
                                                      backend=backend))
        return f(q, k, v), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    ref_val, ref_grads = run("xla")
    from jax.experimental.pallas import tpu as pltpu
    with pltpu.force_tpu_interpret_mode():  # the TPU kernel, interpreted on the CPU
        pallas = run("pallas", backend="tpu")
    for val, grads in (run("einsum"), pallas):
        np.testing.assert_allclose(val, ref_val, rtol=1e-4, atol=1e-3)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-4)
    # control: the causal mask changes the answer far beyond the tolerance
    other = jnp.sum(w * attention(q, k, v, 2, is_causal=not causal, implementation="xla"))
    assert abs(float(other - ref_val)) > 1.0


def test_set_attention_reaches_every_layer_and_keeps_the_unet_output():
    from flax import nnx

    from persguard_jax.models.tiny import tiny_pipeline
    pipe = tiny_pipeline(0)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    ctx = jax.random.normal(jax.random.key(2), (2, 77, 32))
    t = jnp.array([10, 500])
    ref = pipe.unet(x, t, ctx)  # "auto" -> einsum on CPU
    set_attention(pipe.unet, "xla")
    impls = [m.attention_impl for _, m in nnx.iter_graph(pipe.unet) if hasattr(m, "attention_impl")]
    assert len(impls) == 8 and set(impls) == {"xla"}
    np.testing.assert_allclose(pipe.unet(x, t, ctx), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be one of"):
        set_attention(pipe.unet, "flash")


def test_the_config_key_reaches_the_loaded_models(tmp_path):
    from flax import nnx

    from persguard_jax.models import load_pipeline
    from persguard_jax.resources import assets_dir
    from persguard_jax.workflows import personalize
    config = personalize.parse_config({"step": {"attention": "cudnn"}})
    assert config.step.attention == "cudnn"
    with pytest.raises(Exception, match="step.attention"):
        personalize.parse_config({"step": {"attention": "flash"}})
    pipe = load_pipeline(assets_dir() / "world_tiny", attention=config.step.attention)
    for name in ("unet", "vae", "text_encoder"):  # the world VAE has no attention layer
        impls = {m.attention_impl for _, m in nnx.iter_graph(getattr(pipe, name)) if hasattr(m, "attention_impl")}
        assert impls == ({"cudnn"} if name != "vae" else set()), (name, impls)
