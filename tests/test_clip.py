"""CLIP port: parity with transformers' CLIPTextModel / CLIPTextModelWithProjection / CLIPVisionModelWithProjection /
CLIPModel on tiny random configs, checkpoint key variants, config round trips and errors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import nhwc_to_nchw, torch_state_dict
from persguard_jax.models import convert
from persguard_jax.models.clip import (IGNORE_KEYS, LEGACY_RENAMES, CLIPConfig, CLIPModel, CLIPTextConfig,
                                       CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                                       CLIPVisionModelWithProjection, add_text_model_prefix)
from persguard_jax.models.convert import WeightsError

pytestmark = pytest.mark.torch

TOL = 1e-5
TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, projection_dim=16, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=998, pad_token_id=1)
TEXT_CONFIGS = {
    # original CLIP activation; eos_token_id 2 is the legacy rule (pool at the largest id)
    "quick_gelu": dict(TEXT, hidden_act="quick_gelu", eos_token_id=2),
    # exact gelu (OpenCLIP / SD 2.x text encoder); pool at the first EOS, padding uses the same id
    "gelu": dict(TEXT, hidden_act="gelu", eos_token_id=999, layer_norm_eps=1e-6),
}
VISION = dict(hidden_size=32, intermediate_size=37, projection_dim=16, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="quick_gelu")


def _noisy(model, torch):
    with torch.no_grad():  # every weight, layer norms and zero-initialised biases included, must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _input_ids() -> np.ndarray:
    """Two sequences: BOS, tokens, EOS, then padding with the EOS id (as SD's tokenizer pads)."""
    ids = np.random.default_rng(0).integers(3, 990, (2, 77))
    ids[:, 0] = TEXT["bos_token_id"]
    for row, n in enumerate((9, 40)):
        ids[row, n:] = 999  # with eos_token_id 2 the largest id (999) is the EOS, as in real legacy configs
    return ids


def _pixels() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)


def _load(cls, cfg, sd: dict, **kw):
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kw))
    return convert.load_state_dict(abstract, convert.rename_keys(sd, LEGACY_RENAMES), source="test",
                                   ignore=IGNORE_KEYS)


def _jit(model, fn):
    """``fn(model, *args)`` compiled; numpy float32 outputs."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))
    return lambda *a: jax.tree.map(lambda x: np.asarray(x, np.float32), compiled(state, *map(jnp.asarray, a)))


def _max_diff(a, b) -> float:
    b = np.asarray(b.detach().numpy() if hasattr(b, "detach") else b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def _report(name: str, diffs: dict) -> None:
    print(f"\n{name}: max abs diffs " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL


# --------------------------------------------------------------------------- text

@functools.lru_cache(maxsize=None)
def _text_pair(name: str, torch):
    import transformers
    torch.manual_seed(0)
    tcfg = transformers.CLIPTextConfig(**TEXT_CONFIGS[name], attn_implementation="eager")
    tmodel = _noisy(transformers.CLIPTextModelWithProjection(tcfg), torch)
    return tmodel, CLIPTextConfig.from_dict(tcfg.to_dict(), source="test")


@pytest.mark.parametrize("name", list(TEXT_CONFIGS))
def test_text_model_matches_transformers(name, torch):
    tmodel, cfg = _text_pair(name, torch)
    ids = _input_ids()
    with torch.no_grad():
        ref = tmodel.text_model(torch.from_numpy(ids), output_hidden_states=True)
    # the bare text model's weights: drop the projection, as an SD text_encoder/ checkpoint
    sd = {k: v for k, v in torch_state_dict(tmodel).items() if not k.startswith("text_projection.")}
    model = _load(CLIPTextModel, cfg, sd)
    last, states = _jit(model, lambda m, i: m(i, output_hidden_states=True))(ids)
    pooled = _jit(model, lambda m, i: m.pooled(i))(ids)
    assert len(states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    diffs = {"last_hidden_state": _max_diff(last, ref.last_hidden_state),
             "hidden_states": max(_max_diff(a, b) for a, b in zip(states, ref.hidden_states)),
             "pooled": _max_diff(pooled, ref.pooler_output)}
    _report(f"text {name}", diffs)


@pytest.mark.parametrize("name", list(TEXT_CONFIGS))
def test_text_projection_matches_transformers(name, torch):
    tmodel, cfg = _text_pair(name, torch)
    ids = _input_ids()
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(ids)).text_embeds
    model = _load(CLIPTextModelWithProjection, cfg, torch_state_dict(tmodel))
    _report(f"text_embeds {name}", {"text_embeds": _max_diff(_jit(model, lambda m, i: m(i))(ids), ref)})


def test_pooling_rules(torch):
    """The first EOS position; with eos_token_id 2 (configs before transformers#24773) the first largest id."""
    tmodel, _ = _text_pair("gelu", torch)
    sd = {k: v for k, v in torch_state_dict(tmodel).items() if not k.startswith("text_projection.")}
    ids = np.array([[5, 7, 999, 998, 5, 999, 999, 5],   # both rules: position 2 (the first of several)
                    [5, 998, 7, 5, 5, 5, 5, 5]])         # no EOS: position 0 (as transformers); legacy: 1
    for eos, positions in ((999, [2, 0]), (2, [2, 1])):
        model = _load(CLIPTextModel, CLIPTextConfig(**{**TEXT_CONFIGS["gelu"], "eos_token_id": eos}), sd)
        last, pooled = _jit(model, lambda m, i: (m(i), m.pooled(i)))(ids)
        # the pooled row and the gathered one come from two fusions of one program: equal to float rounding
        # (XLA's loop emitters differ in the last bit); a row at another position differs by O(1)
        np.testing.assert_allclose(pooled, last[[0, 1], positions], rtol=0, atol=1e-6)


def test_bare_keys_and_position_ids_buffer(torch):
    """transformers 5 saves CLIPTextModel without ``text_model.``; older files carry a position_ids buffer."""
    import transformers
    tmodel, cfg = _text_pair("quick_gelu", torch)
    bare_torch = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_dict()))
    bare = torch_state_dict(bare_torch)
    assert bare and not any(k.startswith("text_model.") for k in bare)
    prefixed = add_text_model_prefix(bare)
    assert all(k.startswith("text_model.") for k in prefixed)
    full = torch_state_dict(tmodel)
    assert add_text_model_prefix(full) == full  # already prefixed: unchanged, text_projection left alone
    old = dict(prefixed, **{"text_model.embeddings.position_ids": np.arange(77)[None]})
    model = _load(CLIPTextModel, cfg, old)
    ids = _input_ids()
    with torch.no_grad():
        ref = bare_torch(torch.from_numpy(ids)).last_hidden_state
    assert _max_diff(_jit(model, lambda m, i: m(i))(ids), ref) <= TOL
    abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(WeightsError, match=r"missing key text_model\.embeddings\."):
        convert.load_state_dict(abstract, bare, source="test", ignore=IGNORE_KEYS)


# --------------------------------------------------------------------------- vision and both towers

@functools.lru_cache(maxsize=None)
def _clip_pair(torch):
    import transformers
    torch.manual_seed(0)
    tcfg = transformers.CLIPConfig(text_config=TEXT_CONFIGS["gelu"], vision_config=VISION, projection_dim=16,
                                   attn_implementation="eager")
    tmodel = _noisy(transformers.CLIPModel(tcfg), torch)
    return tmodel, CLIPConfig.from_dict(tcfg.to_dict(), source="test")


def test_vision_model_matches_transformers(torch):
    import transformers
    torch.manual_seed(1)
    tcfg = transformers.CLIPVisionConfig(**VISION, attn_implementation="eager")
    tmodel = _noisy(transformers.CLIPVisionModelWithProjection(tcfg), torch)
    cfg = CLIPVisionConfig.from_dict(tcfg.to_dict(), source="test")
    x = _pixels()
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(nhwc_to_nchw(x).copy()))
        ref_pooled = tmodel.vision_model(torch.from_numpy(nhwc_to_nchw(x).copy())).pooler_output
    sd = torch_state_dict(tmodel)
    model = _load(CLIPVisionModelWithProjection, cfg, dict(sd, **{"vision_model.embeddings.position_ids":
                                                                 np.arange(17)[None]}))
    embeds, pooled = _jit(model, lambda m, p: m(p, return_pooled=True))(x)
    _report("vision", {"image_embeds": _max_diff(embeds, ref.image_embeds), "pooled": _max_diff(pooled, ref_pooled)})


def test_clip_model_matches_transformers(torch):
    tmodel, cfg = _clip_pair(torch)
    ids, x = _input_ids(), _pixels()
    with torch.no_grad():
        ref = tmodel(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(nhwc_to_nchw(x).copy()))
        text_ref = tmodel.get_text_features(torch.from_numpy(ids)).pooler_output
        image_ref = tmodel.get_image_features(torch.from_numpy(nhwc_to_nchw(x).copy())).pooler_output
    model = _load(CLIPModel, cfg, torch_state_dict(tmodel))
    logits, text, image = _jit(model, lambda m, i, p: (m(i, p), m.get_text_features(i), m.get_image_features(p)))(ids, x)
    _report("clip", {"logits_per_image": _max_diff(logits, ref.logits_per_image),
                     "text_features": _max_diff(text, text_ref), "image_features": _max_diff(image, image_ref)})


# --------------------------------------------------------------------------- configs and errors

@pytest.mark.parametrize("name", list(TEXT_CONFIGS))
def test_text_config_round_trip(name, torch):
    import transformers
    cfg = CLIPTextConfig(**TEXT_CONFIGS[name])
    d = cfg.to_dict()
    assert d["architectures"] == ["CLIPTextModel"] and d["model_type"] == "clip_text_model"
    rebuilt = transformers.CLIPTextConfig(**d)
    assert CLIPTextConfig.from_dict(rebuilt.to_dict()) == cfg
    assert CLIPTextConfig.from_dict(d) == cfg


def test_vision_and_clip_config_round_trip(torch):
    import transformers
    cfg = CLIPVisionConfig(**VISION)
    assert CLIPVisionConfig.from_dict(transformers.CLIPVisionConfig(**cfg.to_dict()).to_dict()) == cfg
    _, full = _clip_pair(torch)
    assert CLIPConfig.from_dict(transformers.CLIPConfig(**full.to_dict()).to_dict()) == full
    # a whole CLIPModel config.json gives each tower its own config
    assert CLIPTextConfig.from_dict(full.to_dict()) == full.text_config
    assert CLIPVisionConfig.from_dict(full.to_dict()) == full.vision_config


def test_real_text_encoder_config_is_accepted():
    """The SD 1.5 text_encoder/config.json (transformers 4.22 era), generic PretrainedConfig keys and all."""
    d = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
         "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
         "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
         "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
         "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
         "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408}
    cfg = CLIPTextConfig.from_dict(d)
    assert (cfg.hidden_size, cfg.eos_token_id, cfg.hidden_act) == (768, 2, "quick_gelu")
    abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(v.get_value().shape)) for _, v in convert.params_of(abstract)) == 123_060_480


@pytest.mark.parametrize("cls, key, value", [
    (CLIPTextConfig, "hidden_act", "swiglu"),
    (CLIPTextConfig, "attention_dropout", 0.1),
    (CLIPTextConfig, "eos_token_id", [2, 49407]),
    (CLIPTextConfig, "num_attention_heads", 5),
    (CLIPTextConfig, "model_type", "t5"),
    (CLIPVisionConfig, "image_size", [224, 336]),
    (CLIPVisionConfig, "hidden_act", "relu6"),
    (CLIPVisionConfig, "dropout", 0.1),
])
def test_unsupported_values_are_refused(cls, key, value):
    base = TEXT_CONFIGS["quick_gelu"] if cls is CLIPTextConfig else VISION
    with pytest.raises(WeightsError) as e:
        cls.from_dict(dict(base, **{key: value}), source="text_encoder/config.json")
    msg = str(e.value)
    assert msg.startswith("text_encoder/config.json: ") and key in msg and "\n" not in msg


def test_wrong_shape_names_the_key(torch):
    tmodel, cfg = _text_pair("quick_gelu", torch)
    sd = torch_state_dict(tmodel)
    sd["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((36, 32), np.float32)
    with pytest.raises(WeightsError, match=r"key text_model\.encoder\.layers\.1\.mlp\.fc1\.weight has shape "
                                           r"\(36, 32\), the config expects \(37, 32\)"):
        _load(CLIPTextModelWithProjection, cfg, sd)


def test_bf16_close_to_fp32(torch):
    tmodel, cfg = _text_pair("gelu", torch)
    sd = torch_state_dict(tmodel)
    ids = _input_ids()
    ref = _jit(_load(CLIPTextModelWithProjection, cfg, sd), lambda m, i: m(i))(ids)
    bf16 = _load(CLIPTextModelWithProjection, cfg, sd, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = _jit(bf16, lambda m, i: m(i))(ids)
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert np.isfinite(out).all() and rel < 5e-2, rel
