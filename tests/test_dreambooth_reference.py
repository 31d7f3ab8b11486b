"""One DreamBooth step of ours against the step diffusers' ``examples/dreambooth/train_dreambooth.py`` takes, on the
committed world model: same instance + class example, same noise, timesteps and token ids; the loss, the gradients
of the UNet and the text encoder, and the parameters after one clipped AdamW update must agree.

The reference step is written here from the script's training loop (diffusers 0.42 examples, read, not copied):
``noise_scheduler.add_noise``, ``F.mse_loss`` on the instance half + ``prior_loss_weight`` x on the class half,
``clip_grad_norm_`` over the UNet and text encoder together, ``torch.optim.AdamW``. The experiment that runs the
script itself end to end is ``experiments/reference_dreambooth.py``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import nhwc_to_nchw

LR, CLIP_NORM, PRIOR_WEIGHT = 2e-4, 1.0, 1.0


@pytest.fixture(scope="module")
def world():
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows.world_assets import world_model
    return world_model(), load_pipeline(world_model())


def _inputs(pipe, rng: np.random.Generator):
    """Two examples (instance, class): latents, noise, timesteps and token ids."""
    from persguard_jax.sample import latent_shape
    shape = latent_shape(pipe, 32, 32)
    latents = rng.normal(size=(2, *shape)).astype(np.float32)
    noise = rng.normal(size=(2, *shape)).astype(np.float32)
    timesteps = np.array([137, 801], np.int32)
    ids = np.asarray(pipe.tokenizer(["a photo of sks dog", "a photo of dog"]), np.int64)
    return latents, noise, timesteps, ids


def _torch_step(torch, folder, latents, noise, timesteps, ids):
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").train()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").train()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    x0, eps = torch.from_numpy(nhwc_to_nchw(latents)), torch.from_numpy(nhwc_to_nchw(noise))
    t = torch.from_numpy(timesteps.astype(np.int64))
    noisy = scheduler.add_noise(x0, eps, t)
    context = text(torch.from_numpy(ids), return_dict=False)[0]
    pred = unet(noisy, t, context, return_dict=False)[0]
    pred_i, pred_c = pred.chunk(2)
    eps_i, eps_c = eps.chunk(2)
    loss = F.mse_loss(pred_i.float(), eps_i.float()) + PRIOR_WEIGHT * F.mse_loss(pred_c.float(), eps_c.float())
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, CLIP_NORM))
    opt.step()
    return float(loss.detach()), grad_norm, unet, text


@pytest.mark.slow
def test_one_step_matches_diffusers_train_dreambooth(torch, world):
    from persguard_jax import losses
    from persguard_jax.models import functional as F
    from persguard_jax.models.convert import state_dict
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    from persguard_jax.train.optim import OptimizerConfig, resolve_optimizer
    folder, pipe = world
    latents, noise, timesteps, ids = _inputs(pipe, np.random.default_rng(0))
    ref_loss, ref_norm, ref_unet, ref_text = _torch_step(torch, folder, latents, noise, timesteps, ids)

    model, params = F.split_modules({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    schedule = make_schedule(SchedulerConfig.from_dict(pipe.scheduler_config))
    loss_fn = losses.bind(losses.dreambooth_loss, model=model, schedule=schedule, prior_weight=PRIOR_WEIGHT,
                          cfg=losses.LossConfig(scaling_factor=pipe.vae.config.scaling_factor))
    # latents are given already scaled, as the script's are after ``* vae.config.scaling_factor``
    batch = {"latents": jnp.asarray(latents), "noise": jnp.asarray(noise), "timesteps": jnp.asarray(timesteps),
             "input_ids": jnp.asarray(ids, jnp.int32), "is_prior": jnp.asarray([0, 1], jnp.int32)}
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, jax.random.key(0))
    tx, _ = resolve_optimizer(OptimizerConfig(learning_rate=LR, schedule="constant", weight_decay=0.0,
                                              max_grad_norm=CLIP_NORM, total_steps=1))
    updates, _ = tx.update(grads, tx.init(params), params)
    after = optax.apply_updates(params, updates)

    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert float(optax.global_norm(grads)) == pytest.approx(ref_norm, rel=1e-4)
    for name, ref in (("unet", ref_unet), ("text_encoder", ref_text)):
        module = model.bind(after, name)
        ours = state_dict(module)
        theirs = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
        theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()} if name == "text_encoder" else theirs
        ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
        common = sorted(set(ours) & set(theirs))
        assert len(common) >= 0.95 * len(theirs), f"{name}: names do not line up ({len(common)} of {len(theirs)})"
        moved_ref = moved_ours = worst = 0.0
        off, total = 0, 0
        before = {k.removeprefix("text_model."): v for k, v in state_dict(model.bind(params, name)).items()}
        for k in common:
            d_ref, d_ours = theirs[k] - before[k], ours[k] - before[k]
            moved_ref += float(np.abs(d_ref).sum())
            moved_ours += float(np.abs(d_ours).sum())
            worst = max(worst, float(np.abs(d_ref - d_ours).max()))
            off, total = off + int(np.sum(np.abs(d_ref - d_ours) > 0.01 * LR)), total + d_ref.size
        # the first AdamW step moves each weight by about lr x sign(grad): the two updates must coincide
        assert moved_ours == pytest.approx(moved_ref, rel=1e-3), name
        # weights whose gradient is near Adam's eps (1e-8) move by less than lr and are sensitive to rounding
        assert off <= 1e-3 * total and worst <= 0.25 * LR, f"{name}: {off} of {total} updates differ by > 1% of " \
                                                          f"lr; worst {worst:.2e} (lr {LR})"
