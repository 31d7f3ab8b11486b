"""The shared library pieces below the workflows: the trainable split, sampling from a parameter tree, DreamBooth's
data, and the run skeleton (config sections, --print-config, output-folder rules)."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax import lora as L
from persguard_jax.models import functional as F
from persguard_jax.trainable import split_trainable, trainable_mode


def _leaves(tree) -> set[str]:
    return set(F.flatten(tree))


# --------------------------------------------------------------------------- the trainable split

def test_modes(micro):
    _, params, logical = micro
    assert trainable_mode(True, None) == "unet+text_encoder" and trainable_mode(False, None) == "unet"
    assert trainable_mode(False, L.LoRAConfig(rank=2)) == "lora"

    unet = split_trainable(params, logical, "unet")
    assert set(unet.params) == {"unet"} and set(unet.frozen) == {"text_encoder"}
    assert _leaves(unet.params_logical) == _leaves(unet.params)  # axes follow the trees they describe
    both = split_trainable(params, logical, "unet+text_encoder")
    assert set(both.params) == {"unet", "text_encoder"} and both.frozen == {}
    assert _leaves(both.full_params(both.params)) == _leaves(params)
    assert unet.trains("unet") and not unet.trains("text_encoder") and both.trains("text_encoder")
    # LoRA trains the text encoder exactly when a target names it (then its prompts must be encoded live:
    # dreambooth_source(text_trains=...)), whatever train_text_encoder says
    rng = jax.random.key(0)
    assert not split_trainable(params, logical, "lora", lora=L.LoRAConfig(rank=2), rng=rng).trains("text_encoder")
    text_lora = L.LoRAConfig(rank=2, targets=L.UNET_ATTENTION + L.TEXT_ENCODER_ATTENTION)
    assert split_trainable(params, logical, "lora", lora=text_lora, rng=rng).trains("text_encoder")
    with pytest.raises(ValueError, match="trainable mode must be one of"):
        split_trainable(params, logical, "vae")
    with pytest.raises(ValueError, match="needs a LoRAConfig"):
        split_trainable(params, logical, "lora")


def test_lora_split_trains_adapters_and_exports_merged_kernels(micro):
    model, params, logical = micro
    cfg = L.LoRAConfig(rank=2)
    split = split_trainable(params, logical, "lora", lora=cfg, rng=jax.random.key(0))
    assert split.frozen is params and _leaves(split.params) == _leaves(split.params_logical)
    assert all(k.rsplit("/", 1)[-1] in ("lora_A", "lora_B") for k in _leaves(split.params))
    # a trained adapter (B no longer zero): full_params folds it into the kernels, nothing else moves
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), split.params)
    full = split.full_params(trained)
    np.testing.assert_array_equal(_leaves(full), _leaves(params))
    merged = L.merge_lora_into(params, trained, cfg)
    changed = [k for k, v in F.flatten(full).items() if not np.array_equal(v, F.flatten(params)[k])]
    assert changed and all(k.endswith("kernel") and "attn" in k for k in changed)
    for k, v in F.flatten(full).items():
        np.testing.assert_array_equal(v, F.flatten(merged)[k])

    # the loss wrapper evaluates the inner loss on the merged model: same value as the full params directly
    def probe(p, batch, rng):
        return jnp.sum(F.flatten(p)[changed[0]]), {}
    wrapped = split.loss(probe)(F.merge(trained, split.frozen), None, None)[0]
    closed = split.closed_loss(probe)(trained, None, None)[0]
    direct = probe(full, None, None)[0]
    np.testing.assert_allclose([wrapped, closed], [direct, direct], rtol=1e-6)


# --------------------------------------------------------------------------- sampling from a parameter tree

def _programs(pipe) -> list:
    """The jitted programs one ``text_to_image`` call runs: text encoder, the sampler loop, the VAE decoder."""
    from flax import nnx

    from persguard_jax import sample
    from persguard_jax.schedulers import SchedulerConfig
    prediction = SchedulerConfig.from_dict(pipe.scheduler_config).prediction_type
    loop = sample._runner(sample._pipeline_denoise(nnx.graphdef(pipe.unet), False), "ddim", prediction, 0.0,
                          False, False)  # lru-cached: the very object text_to_image used
    return [sample._apply, loop, sample._decode]


def test_sampling_a_parameter_tree_compiles_nothing_new_and_leaves_the_pipeline_alone():
    from persguard_jax.models.tiny import tiny_pipeline
    from persguard_jax.sample import text_to_image
    pipe = tiny_pipeline(0)
    _, params = pipe.split()
    kw = dict(num_steps=3, guidance_scale=3.0, seed=0, progress=False)
    prompts = ["a photo of a dog"] * 2
    base = text_to_image(pipe, prompts, **kw)
    compiled = [f._cache_size() for f in _programs(pipe)]
    assert all(compiled)
    shifted = jax.tree.map(lambda x: x * 1.05, params)
    moved = text_to_image(pipe, prompts, params=shifted, **kw)
    assert [f._cache_size() for f in _programs(pipe)] == compiled, "a new parameter tree recompiled"
    assert np.abs(moved - base).max() > 1e-3  # the given weights were used ...
    np.testing.assert_array_equal(text_to_image(pipe, prompts, **kw), base)  # ... the pipeline's own untouched
    exported = pipe.with_params(shifted)  # a new pipeline carrying the tree: what an export writes
    np.testing.assert_allclose(text_to_image(exported, prompts, **kw), moved, atol=1e-6)
    assert [f._cache_size() for f in _programs(pipe)] == compiled
