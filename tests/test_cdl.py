"""Contrastive decoupling learning: the prompt policy, the guidance formula, and ``persguard personalize
cdl.enabled=true`` training and sampling under CDL's prompts while the class images stay the plain class's."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax.config import ConfigError
from persguard_jax.dreambooth import CDLConfig, cdl_guidance
from persguard_jax.sample import guided


def test_cdl_prompts_follow_the_released_strings():
    cdl = CDLConfig(enabled=True)
    assert cdl.instance_prompt("a photo of sks person") == "a photo of sks person, bhj noisy pattern"
    assert cdl.class_prompt("a photo of person") == "a photo of person, without bhj noisy pattern"
    assert cdl.sampling_prompt("a photo of sks person") == "a photo of sks person, without bhj noisy pattern"
    assert cdl.negative_prompt == "noisy, lowres, artifact, pattern"
    assert CDLConfig(phrase="xqz").instance_prompt("p") == "p, xqz noisy pattern"
    with pytest.raises(ConfigError, match="cdl.phrase"):
        CDLConfig(phrase="a, b")


def test_cdl_guidance_is_diffusers_guidance_at_one_plus_w():
    rng = np.random.default_rng(0)
    eps_p, eps_n = (jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32) for _ in range(2))
    w = 6.5
    def unet(x, t, ctx):  # the prompt's context -> eps_p, the negative's -> eps_n (guided stacks both halves)
        both_p, both_n = jnp.concatenate([eps_p, eps_p]), jnp.concatenate([eps_n, eps_n])
        return jnp.where(ctx.reshape(-1, 1, 1, 1) > 0, both_p, both_n)
    cond, neg = jnp.ones((1, 1)), -jnp.ones((1, 1))
    scale = CDLConfig(guidance=w).guidance_scale(eval_guidance=99.0)
    got = guided(unet, cond, neg, scale)(jnp.zeros((2, 4, 4, 4)), jnp.zeros((2,), jnp.int32))
    np.testing.assert_allclose(got, cdl_guidance(eps_p, eps_n, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cdl_guidance(eps_p, eps_n, w), (1 + w) * eps_p - w * eps_n, rtol=1e-6)
    assert CDLConfig().guidance_scale(eval_guidance=7.5) == 7.5  # None: the recipe's own strength


@pytest.mark.slow
def test_personalize_with_cdl_trains_and_samples_under_its_prompts(tmp_path, monkeypatch):
    import persguard_jax.dreambooth as db_pkg
    import persguard_jax.sample as sample_mod
    from persguard_jax.cli import main
    from persguard_jax.models import save_pipeline
    from persguard_jax.models.tiny import tiny_pipeline
    from test_personalize import subject_photos

    model = save_pipeline(tiny_pipeline(0), tmp_path / "base")
    photos = subject_photos(tmp_path / "photos", n=2)
    trained_under, sampled = [], []
    real_source, real_t2i = db_pkg.dreambooth_source, sample_mod.text_to_image
    monkeypatch.setattr(db_pkg, "dreambooth_source", lambda pipe, inst, cls, cfg, **k: trained_under.append(
        (cfg.instance_prompt, cfg.class_prompt)) or real_source(pipe, inst, cls, cfg, **k))
    monkeypatch.setattr(sample_mod, "text_to_image", lambda pipe, prompts, negative=None, **k: sampled.append(
        (sorted(set(prompts)), negative, k["guidance_scale"])) or real_t2i(pipe, prompts, negative, **k))
    out = tmp_path / "out"
    assert main(["personalize", "--model", str(model), "--instance-dir", str(photos), "--instance-prompt",
                 "a photo of sks dog", "--class-prompt", "a photo of dog", "--out", str(out), "--config",
                 "dreambooth_tiny", "dreambooth.steps=2", "dreambooth.eval_steps=2", "dreambooth.class_sample_steps=2",
                 "dreambooth.num_class_images=2", "dreambooth.class_batch_size=2", "dreambooth.eval_num_images=1",
                 "dreambooth.eval_guidance=4.0", "dreambooth.train_text_encoder=false", "cdl.enabled=true",
                 "cdl.guidance=2.5"]) == 0
    assert trained_under == [("a photo of sks dog, bhj noisy pattern", "a photo of dog, without bhj noisy pattern")]
    class_call, eval_call = sampled
    assert class_call[0] == ["a photo of dog"]  # the clean class images: the base model's plain class pictures
    assert eval_call == (["a photo of dog, without bhj noisy pattern", "a photo of sks dog, without bhj noisy pattern"],
                         "noisy, lowres, artifact, pattern", 3.5)
    results = json.loads((out / "results.json").read_text())
    assert results["instance_prompt"] == "a photo of sks dog, bhj noisy pattern"
    assert results["sampling"]["guidance_scale"] == 3.5
