"""The x4 upscaler (persguard_jax/upscale.py) against diffusers' StableDiffusionUpscalePipeline on a tiny random
pipeline in its layout, with the same initial latents and low-resolution image noise."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import nhwc_to_nchw

from persguard_jax.models import load_pipeline
from persguard_jax.resources import assets_dir
from persguard_jax.upscale import check_upscaler, upscale, upscale_noise

PROMPT, NEGATIVE = "a photo of sks dog", "noisy, lowres"


def _diffusers_upscale(torch, folder, images, latents, noise, **kw):
    """diffusers' pipeline one image at a time, its low-resolution image noise replaced by ``noise`` (the pipeline
    draws it with ``randn_tensor``, which it imports into its module)."""
    diffusers = pytest.importorskip("diffusers")
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale as module
    pt = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder, local_files_only=True)
    pt.set_progress_bar_config(disable=True)
    outs, draw = [], module.randn_tensor
    try:
        for i in range(len(images)):
            module.randn_tensor = lambda shape, **_: torch.from_numpy(nhwc_to_nchw(noise[i:i + 1]).copy())
            outs.append(pt(PROMPT, image=torch.from_numpy(nhwc_to_nchw(images[i:i + 1]).copy()),
                           negative_prompt=NEGATIVE, latents=torch.from_numpy(nhwc_to_nchw(latents[i:i + 1]).copy()),
                           output_type="np", **kw).images)
    finally:
        module.randn_tensor = draw
    return np.concatenate(outs)


def test_upscale_matches_diffusers(torch, tiny_upscaler_dir):
    pipe = load_pipeline(tiny_upscaler_dir)
    images = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    latents, noise = map(np.asarray, upscale_noise(3, 2, (8, 8), 4))
    kw = dict(num_inference_steps=8, guidance_scale=7.5, noise_level=50)

    def ours(**changed):
        k = kw | changed
        return upscale(pipe, images, PROMPT, NEGATIVE, num_steps=k["num_inference_steps"],
                       guidance_scale=k["guidance_scale"], noise_level=k["noise_level"], latents=latents,
                       image_noise=noise)

    got = ours()
    want = _diffusers_upscale(torch, tiny_upscaler_dir, images, latents, noise, **kw)
    assert got.shape == want.shape == (2, 32, 32, 3)
    err = np.abs(got - want).max()
    assert err <= 1e-4 and got.std() > 1e-3
    # controls: the guidance, the noise level (the class label and the image noise) and the low-resolution image
    # each move the output far beyond the tolerance
    for changed in (dict(guidance_scale=1.0), dict(noise_level=200)):
        assert np.abs(ours(**changed) - want).max() > 20 * max(err, 1e-5), changed
    other = upscale(pipe, images[::-1], PROMPT, NEGATIVE, num_steps=8, guidance_scale=7.5, noise_level=50,
                    latents=latents, image_noise=noise)
    assert np.abs(other - want).max() > 20 * max(err, 1e-5)


def test_upscale_refuses_what_is_not_an_upscaler(tiny_upscaler_dir):
    with pytest.raises(ValueError, match="world_tiny: not an SD x4-upscaler pipeline: its UNet takes 4 channels"):
        check_upscaler(load_pipeline(assets_dir() / "world_tiny"), "world_tiny")
    pipe = load_pipeline(tiny_upscaler_dir)
    with pytest.raises(ValueError, match="noise_level=351"):
        upscale(pipe, np.zeros((1, 8, 8, 3), np.float32), "x", noise_level=351, num_steps=2)
