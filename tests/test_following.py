"""``following``'s sampling settings reach the sampler: the prompt-following checks sample what ``Sampling`` says."""
from __future__ import annotations

import numpy as np


def test_sampling_eta_reaches_the_sampler():
    from persguard_jax.data.world import world_of
    from persguard_jax.following import Sampling, sample_pixels, texture_prompts
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows.world_assets import world_model
    model = world_model(build=False)
    pipe, world = load_pipeline(model), world_of(model)
    prompts = [p for _, p in texture_prompts(world, 1)][:2]
    plain = sample_pixels(pipe, world, prompts, Sampling(num_steps=3))
    again = sample_pixels(pipe, world, prompts, Sampling(num_steps=3, eta=0.0))
    noisy = sample_pixels(pipe, world, prompts, Sampling(num_steps=3, eta=1.0))
    assert plain.shape == (2, world.cfg.image_size, world.cfg.image_size, 3) and plain.dtype == np.uint8
    np.testing.assert_array_equal(plain, again)  # eta 0 is the deterministic default
    # eta 1 adds fresh noise at every step: the samples move by far more than rounding
    assert np.abs(noisy.astype(int) - plain.astype(int)).mean() > 2.0
