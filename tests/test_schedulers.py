"""Noise schedules and samplers against diffusers' PyTorch schedulers (the oracles), plus torch-free checks."""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nchw_to_nhwc, nhwc_to_nchw
from persguard_jax.sample import guided, sample_latents
from persguard_jax.schedulers import (SchedulerConfig, add_noise, ddim_step, diffusers_ddim_prev_timesteps,
                                      dpmpp_2m_init, dpmpp_2m_step, make_schedule, next_timesteps,
                                      predict_x0_eps, sampling_timesteps, snr, training_target, velocity)

SD15_SCHEDULER_JSON = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def _diffusers():
    return pytest.importorskip("diffusers")


def fake_model_torch(torch, x, t):
    """A smooth deterministic stand-in for a UNet, ~x at high noise so trajectories stay O(1) for any
    prediction type (an absolute 1e-5 tolerance then means ~10 float32 ulps)."""
    t = t.float()
    return x * (t / 1000.0) + 0.1 * torch.tanh(0.3 * x) * torch.cos(t / 300.0)


def fake_model_jax(x, t):
    t = t.astype(jnp.float32)[:, None, None, None]
    return x * (t / 1000.0) + 0.1 * jnp.tanh(0.3 * x) * jnp.cos(t / 300.0)


def _x_T(seed=0):
    return np.random.RandomState(seed).randn(2, 8, 8, 4).astype(np.float32)


# ---------------------------------------------------------------------------------------------- schedules

@pytest.mark.torch
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_alphas_cumprod_match_diffusers(torch, beta_schedule, zero_snr):
    diffusers = _diffusers()
    cfg = SchedulerConfig(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr,
                          beta_start=0.0001 if beta_schedule == "linear" else 0.00085,
                          beta_end=0.02 if beta_schedule == "linear" else 0.012)
    ref = diffusers.DDIMScheduler.from_config(cfg.to_dict())
    ours = make_schedule(cfg)
    # The rescaled late betas are 1 - (ratio of two nearly cancelled float32 numbers); diffusers computes them
    # with torch's CPU float32 sqrt, which is not correctly rounded (about 1 in 5 values is 1 ulp off), so
    # those betas can only agree to a few 1e-6. alphas_cumprod, what the samplers use, agrees to 1e-6 always.
    beta_tol = 2e-5 if zero_snr else 1e-6
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=0, atol=beta_tol)
    np.testing.assert_allclose(np.asarray(ours.alphas), ref.alphas.numpy(), rtol=0, atol=beta_tol)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(ours.final_alpha_cumprod), float(ref.final_alpha_cumprod), rtol=0, atol=1e-6)
    if zero_snr:
        assert float(ours.alphas_cumprod[-1]) == 0.0


def test_trained_betas_and_config_round_trip():
    betas = np.linspace(1e-4, 2e-2, 10)
    cfg = SchedulerConfig.from_dict({"num_train_timesteps": 10, "trained_betas": betas.tolist(),
                                     "beta_schedule": "anything: unused with trained_betas"})
    np.testing.assert_allclose(np.asarray(make_schedule(cfg).betas), betas.astype(np.float32))
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)  # frozen and hashable, so usable as a static jit argument


@pytest.mark.torch
def test_to_dict_loads_in_diffusers(torch):
    diffusers = _diffusers()
    cfg = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=True,
                          set_alpha_to_one=True, rescale_betas_zero_snr=True, steps_offset=0)
    d = cfg.to_dict()
    assert d["_class_name"] == "DDIMScheduler"
    ref = diffusers.DDIMScheduler.from_config(d)
    for key, value in d.items():
        if not key.startswith("_"):
            assert ref.config[key] == value, key
    np.testing.assert_allclose(np.asarray(make_schedule(cfg).alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)


def test_from_dict_reads_sd15_config_and_refuses_bad_values():
    cfg = SchedulerConfig.from_dict(SD15_SCHEDULER_JSON)
    assert cfg == SchedulerConfig()  # our defaults are SD's
    cases = {
        "beta_schedule": "cosine",
        "prediction_type": "flow_prediction",
        "timestep_spacing": "uniform",
        "use_karras_sigmas": True,
        "thresholding": True,
        "num_train_timesteps": 0,
        "clip_sample": "yes",
    }
    for key, bad in cases.items():
        with pytest.raises(ValueError) as err:
            SchedulerConfig.from_dict({**SD15_SCHEDULER_JSON, key: bad}, source="sd/scheduler_config.json")
        msg = str(err.value)
        assert msg.startswith("sd/scheduler_config.json: ") and key in msg and "\n" not in msg, msg
    with pytest.raises(ValueError, match="scaled_linear"):  # the allowed values are listed
        SchedulerConfig.from_dict({"beta_schedule": "cosine"})
    # Keys that do not touch the noise schedule, or carry their inert values, are ignored.
    SchedulerConfig.from_dict({**SD15_SCHEDULER_JSON, "solver_order": 3, "use_karras_sigmas": False,
                               "lambda_min_clipped": -math.inf, "variance_type": "fixed_small"})


# ------------------------------------------------------------------------------------------- timesteps

@pytest.mark.torch
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_sampling_timesteps_match_diffusers(torch, spacing):
    diffusers = _diffusers()
    for offset in (0, 1):
        cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
        ddim = diffusers.DDIMScheduler.from_config(cfg.to_dict())
        dpm = diffusers.DPMSolverMultistepScheduler.from_config(cfg.to_dict())
        for n in (1, 4, 7, 10, 20, 25, 50, 333, 999, 1000):
            ddim.set_timesteps(n)
            dpm.set_timesteps(n)
            ours_ddim, ours_dpm = sampling_timesteps(cfg, n, "ddim"), sampling_timesteps(cfg, n, "dpmpp_2m")
            assert ours_ddim.dtype == np.int64
            np.testing.assert_array_equal(ours_ddim, ddim.timesteps.numpy(), err_msg=f"ddim {spacing} n={n}")
            np.testing.assert_array_equal(ours_dpm, dpm.timesteps.numpy(), err_msg=f"dpm {spacing} n={n}")
    with pytest.raises(ValueError):
        sampling_timesteps(SchedulerConfig(), 1001)


# ---------------------------------------------------------------------------- forward process, targets

@pytest.mark.torch
def test_add_noise_and_velocity_match_diffusers(torch):
    diffusers = _diffusers()
    cfg = SchedulerConfig(rescale_betas_zero_snr=True)
    ref = diffusers.DDIMScheduler.from_config(cfg.to_dict())
    schedule = make_schedule(cfg)
    rs = np.random.RandomState(1)
    x0 = rs.randn(4, 8, 8, 4).astype(np.float32)
    noise = rs.randn(4, 8, 8, 4).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    want_xt = ref.add_noise(torch.from_numpy(nhwc_to_nchw(x0)), torch.from_numpy(nhwc_to_nchw(noise)),
                            torch.from_numpy(t)).numpy()
    want_v = ref.get_velocity(torch.from_numpy(nhwc_to_nchw(x0)), torch.from_numpy(nhwc_to_nchw(noise)),
                              torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(add_noise(schedule, x0, noise, t)), nchw_to_nhwc(want_xt), atol=1e-6)
    np.testing.assert_allclose(np.asarray(velocity(schedule, x0, noise, t)), nchw_to_nhwc(want_v), atol=1e-6)
    np.testing.assert_allclose(np.asarray(training_target(schedule, x0, noise, t, "v_prediction")),
                               nchw_to_nhwc(want_v), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_eps_inverts_the_training_target(prediction_type):
    schedule = make_schedule(SchedulerConfig())
    rs = np.random.RandomState(2)
    x0, noise = rs.randn(2, 2, 3, 4, 4).astype(np.float32)
    t = jnp.array([10, 900])

    @jax.jit  # one compilation instead of a dozen eager ops
    def round_trip(x0, noise):
        x_t = add_noise(schedule, x0, noise, t)
        target = training_target(schedule, x0, noise, t, prediction_type)
        return predict_x0_eps(schedule, target, x_t, t, prediction_type)
    got_x0, got_eps = round_trip(x0, noise)
    np.testing.assert_allclose(np.asarray(got_x0), x0, atol=2e-4)
    np.testing.assert_allclose(np.asarray(got_eps), noise, atol=2e-4)
    a = np.asarray(schedule.alphas_cumprod)[[10, 900]]
    np.testing.assert_allclose(np.asarray(snr(schedule, t)), a / (1 - a), rtol=1e-6)


# ---------------------------------------------------------------------------------------- full loops

def _torch_loop(torch, scheduler, x_T, noises=None, **step_kwargs):
    x = torch.from_numpy(nhwc_to_nchw(x_T).copy())
    for i, t in enumerate(scheduler.timesteps):
        kwargs = dict(step_kwargs)
        if noises is not None:
            kwargs["variance_noise"] = torch.from_numpy(nhwc_to_nchw(noises[i]).copy())
        x = scheduler.step(fake_model_torch(torch, x, t), t, x, **kwargs).prev_sample
    return nchw_to_nhwc(x.numpy())


DDIM_CASES = [  # prediction_type, spacing, zero_snr, steps, eta, progress, extra config
    ("epsilon", "leading", False, 10, 0.0, False, {}),
    ("epsilon", "leading", False, 12, 0.7, True, {}),
    ("v_prediction", "leading", False, 20, 0.0, True, {}),
    ("v_prediction", "trailing", True, 25, 0.0, False, {}),
    ("v_prediction", "trailing", True, 7, 0.5, False, {}),  # 1000 % 7 != 0: diffusers' own prev timesteps
    ("epsilon", "linspace", False, 10, 0.0, True, {}),
    ("epsilon", "leading", False, 10, 0.0, False, {"clip_sample": True, "clip_sample_range": 1.5,
                                                    "set_alpha_to_one": True}),
]


@pytest.mark.torch
@pytest.mark.parametrize("case", DDIM_CASES, ids=lambda c: f"{c[0]}-{c[1]}-zsnr{c[2]}-n{c[3]}-eta{c[4]}-p{c[5]}")
def test_ddim_loop_matches_diffusers(torch, case):
    diffusers = _diffusers()
    prediction_type, spacing, zero_snr, n, eta, progress, extra = case
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing,
                          rescale_betas_zero_snr=zero_snr, **extra)
    ref = diffusers.DDIMScheduler.from_config(cfg.to_dict())
    ref.set_timesteps(n)
    x_T = _x_T()
    # An "rbg" key: XLA:CPU takes seconds to compile each partitionable-threefry sampler, RngBitGenerator not.
    rng = jax.random.key(3, impl="rbg")
    noises = None
    if eta:  # sample_latents documents the noise it feeds step i; hand diffusers the same draws
        draw = jax.jit(lambda i: jax.random.normal(jax.random.fold_in(rng, i), x_T.shape, jnp.float32))
        noises = [np.asarray(draw(jnp.int32(i))) for i in range(n)]  # not vmap: rbg draws are not vmap-invariant
    want = _torch_loop(torch, ref, x_T, noises, eta=eta)

    ts = sampling_timesteps(cfg, n, "ddim")
    prev = diffusers_ddim_prev_timesteps(cfg, ts)
    if spacing == "leading":  # there our default targets (the next timestep) are diffusers' targets
        np.testing.assert_array_equal(prev, next_timesteps(ts))
        prev = None
    got = sample_latents(fake_model_jax, x_T, make_schedule(cfg), ts, sampler="ddim",
                         prediction_type=prediction_type, eta=eta, rng=rng if eta else None,
                         progress=progress, prev_timesteps=prev)
    assert got.dtype == jnp.float32 and got.shape == x_T.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


DPM_CASES = [  # prediction_type, spacing, zero_snr, steps, progress
    ("epsilon", "leading", False, 10, False),
    ("epsilon", "linspace", False, 20, True),  # >= 15 steps: diffusers' lower_order_final branch differs
    ("v_prediction", "leading", False, 12, True),
    ("v_prediction", "trailing", True, 25, False),
    ("sample", "trailing", False, 1, False),
]


@pytest.mark.torch
@pytest.mark.parametrize("case", DPM_CASES, ids=lambda c: f"{c[0]}-{c[1]}-zsnr{c[2]}-n{c[3]}-p{c[4]}")
def test_dpmpp_2m_loop_matches_diffusers(torch, case):
    diffusers = _diffusers()
    prediction_type, spacing, zero_snr, n, progress = case
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg.to_dict())
    assert (ref.config.algorithm_type, ref.config.solver_order, ref.config.final_sigmas_type) == (
        "dpmsolver++", 2, "zero")
    ref.set_timesteps(n)
    x_T = _x_T(1)
    want = _torch_loop(torch, ref, x_T)
    got = sample_latents(fake_model_jax, x_T, make_schedule(cfg), sampling_timesteps(cfg, n, "dpmpp_2m"),
                         sampler="dpmpp_2m", prediction_type=prediction_type, progress=progress)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_progress_mode_traces_the_step_once_and_agrees_with_scan(sampler):
    traces = []

    def denoise(x, t):
        traces.append(1)  # runs at trace time only
        return fake_model_jax(x, t)

    cfg = SchedulerConfig()
    ts = sampling_timesteps(cfg, 8, sampler)
    schedule = make_schedule(cfg)
    looped = sample_latents(denoise, _x_T(), schedule, ts, sampler=sampler, progress=True)
    assert len(traces) == 1
    scanned = sample_latents(denoise, _x_T(), schedule, ts, sampler=sampler)
    assert len(traces) == 2
    np.testing.assert_allclose(np.asarray(looped), np.asarray(scanned), atol=1e-6)


def test_steps_are_grad_and_vmap_safe():
    # Zero-SNR (alphas_cumprod[-1] == 0) and the final steps to sigma = 0 / alpha = 1 are where infinities
    # could leak into gradients through the unselected branch of a where.
    cfg = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
                          set_alpha_to_one=True)
    schedule = make_schedule(cfg)
    x_T = jnp.asarray(_x_T())
    for sampler in ("ddim", "dpmpp_2m"):
        ts = sampling_timesteps(cfg, 4, sampler)

        def loss(x):
            return jnp.sum(sample_latents(fake_model_jax, x, schedule, ts, sampler=sampler,
                                          prediction_type="v_prediction") ** 2)
        g = jax.grad(loss)(x_T)
        assert bool(jnp.all(jnp.isfinite(g))), sampler

    # A single step, vmapped over per-example timesteps, equals the batched call.
    t, t_prev = jnp.array([999, 500]), jnp.array([500, -1])
    out = fake_model_jax(x_T, t)
    batched = jax.jit(partial(ddim_step, schedule, prediction_type="v_prediction"))(out, t, t_prev, x_T)
    mapped = jax.jit(jax.vmap(lambda o, a, b, x: ddim_step(schedule, o[None], a, b, x[None],
                                                           prediction_type="v_prediction")[0]))(out, t, t_prev, x_T)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(mapped), atol=1e-6)
    x1, state = jax.jit(lambda o, x, s: dpmpp_2m_step(schedule, o, 999, 500, x, s,
                                                      prediction_type="v_prediction"))(out, x_T, dpmpp_2m_init(x_T))
    assert x1.shape == x_T.shape and bool(state.valid) and int(state.t) == 999
    with pytest.raises(ValueError, match="noise"):
        ddim_step(schedule, out, t, t_prev, x_T, eta=0.5)


# ------------------------------------------------------------------------------------------- guidance

@pytest.mark.parametrize("g", [1.0, 7.5])
def test_guided_is_batched_cfg(g):
    calls = []
    rs = np.random.RandomState(4)
    cond = jnp.asarray(rs.randn(2, 3, 5).astype(np.float32))
    uncond = jnp.asarray(rs.randn(1, 3, 5).astype(np.float32))  # one empty-prompt embedding for the batch

    def unet_apply(x, t, context):
        calls.append(x.shape[0])
        return x * jnp.mean(context, axis=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000.0

    x = jnp.asarray(_x_T())
    t = jnp.array([999, 999], jnp.int32)
    got = jax.jit(guided(unet_apply, cond, uncond, g))(x, t)
    assert calls == [2 if g == 1.0 else 4]  # one call; the uncond half only when it matters

    @jax.jit
    def manual(x, t):
        out_c = unet_apply(x, t, cond)
        out_u = unet_apply(x, t, jnp.broadcast_to(uncond, cond.shape))
        return out_u + g * (out_c - out_u)
    np.testing.assert_allclose(np.asarray(got), np.asarray(manual(x, t)), atol=1e-5)

    # It is a plain denoise callable for the samplers.
    cfg = SchedulerConfig()
    x0 = sample_latents(guided(unet_apply, cond, uncond, g), x, make_schedule(cfg), sampling_timesteps(cfg, 3))
    assert x0.shape == x.shape and bool(jnp.all(jnp.isfinite(x0)))
