"""VAE port: parity with diffusers' AutoencoderKL on tiny random configs, legacy attention names, config round
trips, errors, sampling and gradients. (No bf16 test: SD VAEs set force_upcast and run in float32; the shared
layers' bf16 path is covered by the UNet tests.)"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import nchw_to_nhwc, nhwc_to_nchw, torch_state_dict
from persguard_jax.models import convert
from persguard_jax.models.convert import WeightsError
from persguard_jax.models.vae import (IGNORE_KEYS, LEGACY_RENAMES, AutoencoderKL, VAEConfig, sample_latent,
                                      vae_config_sd)

pytestmark = pytest.mark.torch

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
CONFIGS = {
    # the SD layout, shrunk: two blocks, one resnet per encoder block
    "small": dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
                  down_block_types=(DOWN,) * 2, up_block_types=(UP,) * 2, sample_size=32),
    # three blocks (two down/upsamplings), two resnets per block, a channel change mid-way
    "deep": dict(block_out_channels=(32, 32, 64), norm_num_groups=8, layers_per_block=2,
                 down_block_types=(DOWN,) * 3, up_block_types=(UP,) * 3, sample_size=32),
    # the less common options: no quant convs, no mid-block attention, gelu, other channel counts
    "misc": dict(block_out_channels=(16, 32), norm_num_groups=4, layers_per_block=1, in_channels=1, out_channels=2,
                 latent_channels=3, act_fn="gelu", use_quant_conv=False, use_post_quant_conv=False,
                 mid_block_add_attention=False, down_block_types=(DOWN,) * 2, up_block_types=(UP,) * 2,
                 scaling_factor=0.13025, shift_factor=0.0609, sample_size=32),
}
ATTN_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _build_torch(name: str, torch):
    from diffusers import AutoencoderKL as TorchVAE
    torch.manual_seed(0)
    model = TorchVAE(**CONFIGS[name]).eval()
    with torch.no_grad():  # every weight, norms and zero-initialised biases included, must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _load(cfg: VAEConfig, sd: dict, **kw) -> AutoencoderKL:
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), **kw))
    return convert.load_state_dict(abstract, sd, source="test", ignore=IGNORE_KEYS)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, z, rng):
    """Everything the tests compare, in one compiled call (cached across models of the same config and dtype)."""
    model = nnx.merge(graphdef, state)
    mean, logvar = model.encode(x)
    out = {"mean": mean, "logvar": logvar, "decode": model.decode(z), "reconstruct": model(x, rng)}
    return jax.tree.map(lambda a: a.astype(jnp.float32), out)


def _run(model: AutoencoderKL, x: np.ndarray, z: np.ndarray, rng=None) -> dict[str, np.ndarray]:
    """encode(x), decode(z) and model(x, rng); rng None decodes the posterior mean."""
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, _forward(graphdef, state, jnp.asarray(x), jnp.asarray(z), rng))


@functools.lru_cache(maxsize=None)
def _pair(name: str, torch):
    """(torch model, JAX model, images, torch mean / logvar / decoded mean), built once per config."""
    tmodel = _build_torch(name, torch)
    cfg = VAEConfig.from_dict(dict(tmodel.config), source="test")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, cfg.in_channels)).astype(np.float32)
    with torch.no_grad():
        dist = tmodel.encode(torch.from_numpy(nhwc_to_nchw(x).copy())).latent_dist
        decoded = tmodel.decode(dist.mean).sample
    ref = {k: nchw_to_nhwc(t.numpy()) for k, t in (("mean", dist.mean), ("logvar", dist.logvar), ("decode", decoded))}
    ref["reconstruct"] = ref["decode"]  # model(x) with no rng decodes the posterior mean
    return tmodel, _load(cfg, torch_state_dict(tmodel)), x, ref


def _max_diff(a, b) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name, torch):
    _, model, x, ref = _pair(name, torch)
    out = _run(model, x, ref["mean"])
    diffs = {k: _max_diff(out[k], ref[k]) for k in ref}
    print(f"\n{name}: max abs diffs " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + f" (output max {np.abs(ref['decode']).max():.2f})")
    assert out["mean"].shape[1:] == (16 if name != "deep" else 8,) * 2 + (model.config.latent_channels,)
    assert max(diffs.values()) <= 1e-4


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "conv1x1"])
def test_legacy_attention_names_load(as_conv, torch):
    """Old files name the mid-block attention query/key/value/proj_attn, sometimes as (O, I, 1, 1) conv weights."""
    tmodel, model, x, ref = _pair("small", torch)
    old = {}
    for key, value in torch_state_dict(tmodel).items():
        m = re.match(r"(.*mid_block\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
        if m:
            key = f"{m[1]}.{ATTN_RENAMES[m[2]]}.{m[3]}"
            if as_conv and m[3] == "weight":
                value = value[:, :, None, None]
        old[key] = value
    assert sum(".query." in k or ".proj_attn." in k for k in old) == 8  # encoder and decoder, weight and bias
    legacy = _load(model.config, convert.rename_keys(old, LEGACY_RENAMES))
    out = _run(legacy, x, ref["mean"])
    assert max(_max_diff(out[k], ref[k]) for k in ref) <= 1e-4


def test_sampling_is_the_reparameterised_posterior(torch):
    _, model, x, ref = _pair("small", torch)
    first = _run(model, x, ref["mean"])
    mean, logvar, rng = first["mean"], first["logvar"], jax.random.key(3)
    z = np.asarray(sample_latent(jnp.asarray(mean), jnp.asarray(logvar), rng))
    eps = np.asarray(jax.random.normal(rng, mean.shape))
    np.testing.assert_allclose(z, mean + np.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-5)
    assert not np.allclose(z, np.asarray(sample_latent(jnp.asarray(mean), jnp.asarray(logvar), jax.random.key(4))))
    out = _run(model, x, z, rng)  # model(x, rng) must decode exactly that sample
    np.testing.assert_allclose(out["reconstruct"], out["decode"], rtol=1e-5, atol=1e-5)


def test_logvar_is_clipped_as_diffusers(torch):
    tmodel, model, x, ref = _pair("small", torch)
    big = _load(model.config, {k: v * 1e3 if k.startswith("quant_conv.") else v
                               for k, v in torch_state_dict(tmodel).items()})
    logvar = _run(big, x, ref["mean"])["logvar"]
    assert logvar.min() == -30.0 and logvar.max() == 20.0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name, torch):
    from diffusers import AutoencoderKL as TorchVAE
    tmodel = _build_torch(name, torch)
    cfg = VAEConfig.from_dict(dict(tmodel.config), source="test")
    d = cfg.to_dict()
    assert d["_class_name"] == "AutoencoderKL"
    assert VAEConfig.from_dict(d) == cfg
    rebuilt = TorchVAE.from_config(d)
    assert VAEConfig.from_dict(dict(rebuilt.config)) == cfg
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(rebuilt) == shapes(tmodel)


def _torch_layout_shape(shape: tuple, leaf: str) -> tuple:
    if leaf == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if leaf == "kernel" else tuple(shape)


def test_sd_config_matches_diffusers_layout(torch):
    """The SD 1.x/2.x VAE config builds the real parameter layout (checked on torch's meta device: no memory)."""
    from diffusers import AutoencoderKL as TorchVAE
    cfg = vae_config_sd()
    with torch.device("meta"):
        tmodel = TorchVAE.from_config(cfg.to_dict())
    torch_shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    ours = {convert.torch_key(path): _torch_layout_shape(var.get_value().shape, str(path[-1]))
            for path, var in convert.params_of(abstract)}
    assert ours == torch_shapes
    assert sum(np.prod(s) for s in ours.values()) == 83_653_863


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),
    ("block_out_channels", []),
    ("act_fn", "softsign"),
    ("norm_num_groups", 12),
    ("layers_per_block", [1, 2]),
    ("_class_name", "AutoencoderTiny"),
    ("some_future_option", True),
])
def test_unsupported_options_are_refused(key, value):
    d = dict(CONFIGS["small"], _diffusers_version="0.42.1", **{key: value})
    with pytest.raises(WeightsError) as e:
        VAEConfig.from_dict(d, source="vae/config.json")
    msg = str(e.value)
    assert msg.startswith("vae/config.json: ") and key in msg and "\n" not in msg


def test_real_config_file_keys_are_accepted():
    """The keys of a real SD 1.5 ``vae/config.json`` (diffusers 0.6 era) and of newer files."""
    d = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
         "block_out_channels": [128, 256, 512, 512], "down_block_types": [DOWN] * 4, "in_channels": 3,
         "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
         "up_block_types": [UP] * 4}
    assert VAEConfig.from_dict(d) == vae_config_sd()
    newer = dict(d, scaling_factor=0.13025, force_upcast=False, shift_factor=None, latents_mean=None,
                 latents_std=None, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)
    assert VAEConfig.from_dict(newer).scaling_factor == 0.13025


def test_wrong_shape_names_the_key(torch):
    tmodel, model, _, _ = _pair("small", torch)
    sd = torch_state_dict(tmodel)
    sd["decoder.mid_block.attentions.0.to_v.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(WeightsError, match=r"decoder\.mid_block\.attentions\.0\.to_v\.weight"):
        _load(model.config, sd)


def test_gradients_through_encoder_and_decoder(torch):
    """Image-space gradients (what an adversarial perturbation needs) and parameter gradients are finite."""
    _, model, x, _ = _pair("small", torch)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grads(params, images):
        def loss(params, images):
            vae = nnx.merge(graphdef, params, rest)
            mean, logvar = vae.encode(images)
            return jnp.mean(jnp.square(vae.decode(mean))) + jnp.mean(logvar)
        return jax.grad(loss, argnums=(0, 1))(params, images)

    g_params, g_images = grads(params, jnp.asarray(x))
    leaves = jax.tree.leaves(g_params)
    assert len(leaves) == len(convert.params_of(model))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.abs(g).max()) > 0 for g in leaves) == len(leaves)  # every parameter is used
    assert np.isfinite(np.asarray(g_images)).all() and float(jnp.abs(g_images).max()) > 0
