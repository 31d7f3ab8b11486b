"""UNet port: parity with diffusers' UNet2DConditionModel on tiny random configs, config round trips, errors,
bf16 and gradients."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import nchw_to_nhwc, nhwc_to_nchw, torch_state_dict
from persguard_jax.models import convert
from persguard_jax.models.convert import WeightsError
from persguard_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_config_sd15, unet_config_sd21

pytestmark = pytest.mark.torch

TINY = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, cross_attention_dim=32,
            sample_size=16)
CONFIGS = {
    # SD 1.x layout: cross-attention everywhere but the lowest resolution, conv proj_in, int head count.
    "sd1": dict(TINY, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                flip_sin_to_cos=True, freq_shift=0),
    # SD 2.x: per-block head counts (reversed on the way up), linear proj_in/out, fp32 attention.
    # (Head counts change the result, not the weight shapes: a missed reversal would show as a mismatch.)
    "sd2": dict(TINY, norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 8),
                use_linear_projection=True, upcast_attention=True),
    # SD x4 upscaler: 7 input channels (latents + low-res image), noise level as a class label, plain block first,
    # attn1 attending to the text in the cross-attention blocks; per-block layer counts (reversed on the way up).
    "x4_upscaler": dict(TINY, in_channels=7, out_channels=4, num_class_embeds=1000,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                        only_cross_attention=(False, True), attention_head_dim=8, use_linear_projection=True,
                        layers_per_block=(2, 1)),
    # Deeper: 2 resnets and 2 transformer layers per block, one timestep per example. Cross-attention only in
    # one up block and the mid block, as nnx.eval_shape time grows quadratically with the parameter count (see
    # test_real_configs). Also the less common options: right/bottom-only downsample padding, centred input,
    # sin-first timestep embedding with freq_shift 1, gelu, time-embedding size and activations, a timestep class
    # embedding concatenated to the time embedding, mid-block scaling, 1x1 in/out convs, and a size not divisible
    # by 2**num_upsamplers (10 -> 5 -> 2 on the way down, 2 -> 5 -> 10 on the way up).
    "deep": dict(TINY, block_out_channels=(32, 32, 64), layers_per_block=2, transformer_layers_per_block=2,
                 down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
                 norm_eps=1e-6, downsample_padding=0, center_input_sample=True, flip_sin_to_cos=False,
                 freq_shift=1, act_fn="gelu", time_embedding_dim=96, time_embedding_act_fn="silu",
                 timestep_post_act="silu", class_embed_type="timestep", class_embeddings_concat=True,
                 mid_block_scale_factor=2.0, conv_in_kernel=1, conv_out_kernel=1),
}
SIZES = {"deep": 10}


def _build_torch(name: str, torch):
    from diffusers import UNet2DConditionModel as TorchUNet
    torch.manual_seed(0)
    model = TorchUNet(**CONFIGS[name]).eval()
    with torch.no_grad():  # every weight, norms and zero-initialised biases included, must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(name: str, cfg: UNetConfig) -> dict:
    rng = np.random.default_rng(0)
    size = SIZES.get(name, 16)
    x = {"sample": rng.standard_normal((2, size, size, cfg.in_channels)).astype(np.float32),
         "context": rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32),
         "timesteps": np.array([37, 911]) if name == "deep" else np.array(500),
         "class_labels": None}
    if name == "x4_upscaler":
        x["class_labels"] = np.array([20, 350])
    elif name == "deep":
        x["class_labels"] = np.array([3.0, 700.0], np.float32)
    return x


def _torch_forward(model, x, torch):
    kw = {} if x["class_labels"] is None else {"class_labels": torch.from_numpy(x["class_labels"])}
    with torch.no_grad():
        out = model(torch.from_numpy(nhwc_to_nchw(x["sample"]).copy()), torch.from_numpy(x["timesteps"]),
                    torch.from_numpy(x["context"]), **kw).sample
    return nchw_to_nhwc(out.numpy())


def _load(cfg: UNetConfig, sd: dict, **kw) -> UNet2DConditionModel:
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0), **kw))
    return convert.load_state_dict(abstract, sd, source="test")


def _jit(fn):
    return jax.jit(fn)  # at the suite's XLA level (tests/conftest.py: -O0, compile time dominates these runs)


def _jax_forward(model: UNet2DConditionModel, x: dict) -> np.ndarray:
    graphdef, state = nnx.split(model)
    fwd = _jit(lambda state, s, t, c, y: nnx.merge(graphdef, state)(s, t, c, class_labels=y))
    return np.asarray(fwd(state, x["sample"], x["timesteps"], x["context"], x["class_labels"]).astype(jnp.float32))


@functools.lru_cache(maxsize=None)
def _pair(name: str, torch):
    """(torch model, JAX model with its weights, inputs, torch output), built once per config."""
    tmodel = _build_torch(name, torch)
    cfg = UNetConfig.from_dict(dict(tmodel.config), source="test")
    x = _inputs(name, cfg)
    return tmodel, _load(cfg, torch_state_dict(tmodel)), x, _torch_forward(tmodel, x, torch)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name, torch):
    _, model, x, ref = _pair(name, torch)
    out = _jax_forward(model, x)
    assert out.shape == ref.shape
    diff = float(np.abs(out - ref).max())
    print(f"\n{name}: max abs diff {diff:.2e} (output max {np.abs(ref).max():.2f})")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name, torch):
    from diffusers import UNet2DConditionModel as TorchUNet
    tmodel = _build_torch(name, torch)
    cfg = UNetConfig.from_dict(dict(tmodel.config), source="test")
    d = cfg.to_dict()
    assert d["_class_name"] == "UNet2DConditionModel"
    assert UNetConfig.from_dict(d) == cfg
    rebuilt = TorchUNet.from_config(d)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(rebuilt) == shapes(tmodel)


@pytest.mark.parametrize("make, num_params", [(unet_config_sd15, 859_520_964), (unet_config_sd21, 865_910_724),
                                              (lambda: unet_config_sd21(base=True), 865_910_724)])
def test_real_configs(make, num_params, torch):
    """The SD 1.5 / 2.1 helpers give diffusers the real models (built on torch's meta device: no memory).

    The JAX model is built from these configs by the same code the tiny parity tests above check key by key;
    building it here too would take ~10 s per config, as nnx.eval_shape is quadratic in the parameter count
    (each rngs.params() call makes JAX scan the whole trace, in Variable.set_value's sharding probe).
    """
    from diffusers import UNet2DConditionModel as TorchUNet
    cfg = make()
    with torch.device("meta"):
        tmodel = TorchUNet.from_config(cfg.to_dict())
    assert sum(p.numel() for p in tmodel.parameters()) == num_params
    assert UNetConfig.from_dict(dict(tmodel.config)) == cfg


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("addition_embed_type", "text_time"),
    ("time_cond_proj_dim", 256),
    ("cross_attention_dim", [32, 32]),
    ("attention_type", "gated"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "projection"),
    ("dual_cross_attention", True),
    ("num_attention_heads", 8),
    ("encoder_hid_dim", 64),
    ("time_embedding_type", "fourier"),
    ("transformer_layers_per_block", [[1, 2], [1, 2]]),
    ("attention_head_dim", [4, 4, 4]),
    ("act_fn", "softsign"),
    ("some_future_option", True),
])
def test_unsupported_options_are_refused(key, value):
    d = dict(CONFIGS["sd1"], _diffusers_version="0.42.1", **{key: value})
    with pytest.raises(WeightsError) as e:
        UNetConfig.from_dict(d, source="unet/config.json")
    msg = str(e.value)
    assert msg.startswith("unet/config.json: ") and key in msg and "\n" not in msg


def test_harmless_keys_are_accepted():
    d = dict(CONFIGS["sd1"], _class_name="UNet2DConditionModel", num_attention_heads=None, addition_embed_type=None,
             resnet_skip_time_act=False, cross_attention_norm=None, mid_block_only_cross_attention=None)
    assert UNetConfig.from_dict(d) == UNetConfig(**CONFIGS["sd1"])


def test_bf16_close_to_fp32(torch):
    tmodel, model, x, _ = _pair("sd1", torch)
    ref = _jax_forward(model, x)
    bf16 = _load(model.config, torch_state_dict(tmodel), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(v.get_value().dtype == jnp.bfloat16 for _, v in convert.params_of(bf16))
    out = _jax_forward(bf16, x)
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    print(f"\nbf16 relative error {rel:.2e}")
    assert np.isfinite(out).all() and rel < 5e-2


def test_gradients_are_finite(torch):
    _, model, x, _ = _pair("sd1", torch)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @_jit
    def grads(params, sample):
        def loss(params, sample):
            out = nnx.merge(graphdef, params, rest)(sample, x["timesteps"], x["context"])
            return jnp.mean(jnp.square(out))
        return jax.grad(loss, argnums=(0, 1))(params, sample)

    g_params, g_sample = grads(params, jnp.asarray(x["sample"]))
    leaves = jax.tree.leaves(g_params)
    assert len(leaves) == len(convert.params_of(model))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.abs(g).max()) > 0 for g in leaves) == len(leaves)  # every parameter is used
    assert np.isfinite(np.asarray(g_sample)).all() and float(jnp.abs(g_sample).max()) > 0
