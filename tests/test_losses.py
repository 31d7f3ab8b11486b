"""The loss library: formulas against numpy, the combinators, and jit/grad/vmap/scan safety.

Most tests use a fake model whose "UNet" is linear in its input (so every loss can be computed by hand and
costs no compilation time); one test runs the real micro UNet and text encoder under ``jit(value_and_grad)``.
"""
from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax import losses
from persguard_jax.losses import LossConfig
from persguard_jax.schedulers import SchedulerConfig, make_schedule

SCHEDULE = make_schedule(SchedulerConfig())
AC = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
T_COEF = 1e-3  # the fake UNet adds T_COEF * t, so the timesteps it receives show in the loss


class FakeUNet:
    dtype = jnp.float32

    def __init__(self, p, calls):
        self.p, self.calls = p, calls

    def __call__(self, x, t, ctx):
        self.calls["unet_call"] += 1
        ctx_mean = ctx.astype(jnp.float32).mean(axis=(1, 2))[:, None, None, None]
        t = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1)
        return x * self.p["w"] + self.p["c"] * ctx_mean + T_COEF * t


class FakeModel:
    """``bind(params, name)`` like ``models.functional.Modules``; counts binds and UNet calls."""

    def __init__(self):
        self.calls = Counter()

    def bind(self, params, name):
        if name not in params:
            raise KeyError(f"parameters for {name!r} missing; have {sorted(params)}")
        self.calls[name] += 1
        if name == "unet":
            return FakeUNet(params["unet"], self.calls)
        e = params[name]["e"]
        return lambda ids: ids[..., None].astype(jnp.float32) * e


B, H, W, C, L, D = 4, 3, 3, 2, 3, 5


def fake_params():
    return {"unet": {"w": jnp.array([0.7, -0.4], jnp.float32), "c": jnp.array(0.3, jnp.float32)},
            "text_encoder": {"e": jnp.linspace(0.1, 0.5, D, dtype=jnp.float32)}}


def fake_batch(seed=0, fixed=True, cond="context"):
    rng = np.random.default_rng(seed)
    b = {"latents": rng.normal(size=(B, H, W, C)).astype(np.float32)}
    if cond == "context":
        b["context"] = rng.normal(size=(B, L, D)).astype(np.float32)
    elif cond == "input_ids":
        b["input_ids"] = rng.integers(2, 10, size=(B, L)).astype(np.int32)
    if fixed:
        b["noise"] = rng.normal(size=(B, H, W, C)).astype(np.float32)
        b["timesteps"] = np.array([0, 100, 500, 999], np.int32)  # both sides of gamma=5 in SNR
    return {k: jnp.asarray(v) for k, v in b.items()}


def np_per_example(params, batch, prediction_type, x0=None, context=None):
    """The denoising loss per example, by hand in float64."""
    f64 = lambda x: np.asarray(x, np.float64)
    x0 = f64(batch["latents"]) if x0 is None else f64(x0)
    noise, t = f64(batch["noise"]), np.asarray(batch["timesteps"])
    a = AC[t][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    ctx = f64(batch["context"]) if context is None else f64(context)
    pred = (x_t * f64(params["unet"]["w"]) + f64(params["unet"]["c"]) * ctx.mean(axis=(1, 2))[:, None, None, None]
            + T_COEF * t[:, None, None, None])
    target = {"epsilon": noise, "v_prediction": np.sqrt(a) * noise - np.sqrt(1 - a) * x0, "sample": x0}[prediction_type]
    return ((pred - target) ** 2).reshape(len(t), -1).mean(axis=1)


def make_loss(model=None, **cfg):
    return losses.bind(losses.denoising_loss, model=model or FakeModel(), schedule=SCHEDULE, cfg=LossConfig(**cfg))


KEY = jax.random.key(0)


# --------------------------------------------------------------------------- the denoising loss

@pytest.mark.parametrize("prediction_type", losses.PREDICTION_TYPES)
def test_denoising_loss_matches_hand_computation(prediction_type):
    params, batch = fake_params(), fake_batch()
    loss, aux = make_loss(prediction_type=prediction_type)(params, batch, KEY)
    expected = np_per_example(params, batch, prediction_type)
    assert aux["per_example"].shape == (B,)
    np.testing.assert_allclose(np.asarray(aux["per_example"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)
    assert float(aux["loss"]) == float(loss)
    # the three targets really differ (the test would not notice a wrong target otherwise)
    others = [np_per_example(params, batch, p) for p in losses.PREDICTION_TYPES if p != prediction_type]
    assert all(np.abs(o - expected).max() > 1e-3 for o in others)


def test_min_snr_weights_formula():
    t = jnp.array([0, 10, 100, 300, 500, 800, 999])
    a = AC[np.asarray(t)]
    snr = a / (1 - a)
    g = 5.0
    expected = {"epsilon": np.minimum(snr, g) / snr, "v_prediction": np.minimum(snr, g) / (snr + 1),
                "sample": np.minimum(snr, g)}
    for p, e in expected.items():
        np.testing.assert_allclose(np.asarray(losses.min_snr_weights(SCHEDULE, t, g, p)), e, rtol=1e-5)
    assert snr.max() > g > snr.min()  # both the clipped and the unclipped branch are exercised
    np.testing.assert_allclose(np.asarray(losses.min_snr_weights(SCHEDULE, t, g))[snr < g], 1.0, rtol=1e-6)


def test_min_snr_weights_finite_with_zero_terminal_snr():
    """With rescale_betas_zero_snr the last step has SNR 0: the epsilon weight is its limit 1, not 0/0 = NaN."""
    zsnr = make_schedule(SchedulerConfig(rescale_betas_zero_snr=True))
    t = jnp.array([0, 500, 999])
    assert float(zsnr.alphas_cumprod[999]) == 0.0
    for p in losses.PREDICTION_TYPES:
        w = np.asarray(losses.min_snr_weights(zsnr, t, 5.0, p))
        assert np.isfinite(w).all(), (p, w)
    assert float(losses.min_snr_weights(zsnr, t, 5.0, "epsilon")[2]) == 1.0


@pytest.mark.parametrize("prediction_type", losses.PREDICTION_TYPES)
def test_denoising_loss_applies_min_snr(prediction_type):
    params, batch = fake_params(), fake_batch()
    plain = np_per_example(params, batch, prediction_type)
    loss, aux = make_loss(prediction_type=prediction_type, min_snr_gamma=5.0)(params, batch, KEY)
    w = np.asarray(losses.min_snr_weights(SCHEDULE, batch["timesteps"], 5.0, prediction_type), np.float64)
    assert np.abs(w - 1).max() > 0.1  # the weighting changes something
    np.testing.assert_allclose(np.asarray(aux["per_example"]), plain * w, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (plain * w).mean(), rtol=1e-5)


def test_per_example_weights():
    params, batch = fake_params(), fake_batch()
    per = np_per_example(params, batch, "epsilon")
    wts = np.array([1.0, 0.0, 2.0, 0.5])
    loss, aux = make_loss()(params, {**batch, "weight": jnp.asarray(wts, jnp.float32)}, KEY)
    np.testing.assert_allclose(float(loss), (wts * per).sum() / wts.sum(), rtol=1e-5)
    assert abs(float(loss) - per.mean()) > 1e-4
    # per_example does not include batch["weight"] (combinators re-weight it themselves)
    np.testing.assert_allclose(np.asarray(aux["per_example"]), per, rtol=1e-5)
    zero, _ = make_loss()(params, {**batch, "weight": jnp.zeros(B)}, KEY)
    assert float(zero) == 0.0


def test_latent_distribution_is_sampled_and_scaled():
    params, batch = fake_params(), fake_batch()
    mean = batch.pop("latents")
    cfg = LossConfig(scaling_factor=0.5)
    # (near) zero variance: the sample is the mean, scaled
    sharp = {**batch, "latent_mean": mean, "latent_logvar": jnp.full(mean.shape, -40.0)}
    np.testing.assert_allclose(np.asarray(losses.clean_latents(sharp, KEY, cfg)), np.asarray(mean) * 0.5,
                               rtol=1e-6, atol=1e-7)
    loss, aux = losses.denoising_loss(params, sharp, KEY, model=FakeModel(), schedule=SCHEDULE, cfg=cfg)
    np.testing.assert_allclose(np.asarray(aux["per_example"]),
                               np_per_example(params, batch, "epsilon", x0=np.asarray(mean) * 0.5), rtol=1e-5)
    # std 2: random, the same for the same key, with the right spread (one shape only: on XLA:CPU every new
    # shape of jax.random.normal costs a compilation of ~1 s)
    wide = {**batch, "latent_mean": mean, "latent_logvar": jnp.full(mean.shape, np.log(4.0))}
    s1, s2 = losses.clean_latents(wide, KEY, cfg), losses.clean_latents(wide, KEY, cfg)
    s3 = losses.clean_latents(wide, jax.random.key(1), cfg)
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    assert np.abs(np.asarray(s1) - np.asarray(s3)).min() > 0
    z = np.stack([(np.asarray(losses.clean_latents(wide, jax.random.key(i), cfg)) / 0.5 - np.asarray(mean)) / 2.0
                  for i in range(16)])  # 16 x 72 standard normal draws if the scaling is right
    assert abs(z.mean()) < 0.15 and abs(z.std() - 1.0) < 0.1, (z.mean(), z.std())
    l1, _ = losses.denoising_loss(params, wide, KEY, model=FakeModel(), schedule=SCHEDULE, cfg=cfg)
    l2, _ = losses.denoising_loss(params, wide, KEY, model=FakeModel(), schedule=SCHEDULE, cfg=cfg)
    l3, _ = losses.denoising_loss(params, wide, jax.random.key(1), model=FakeModel(), schedule=SCHEDULE, cfg=cfg)
    assert float(l1) == float(l2) != float(l3)
    assert float(l1) != float(loss)


def test_noise_and_timesteps_are_drawn_from_rng_unless_given():
    params = fake_params()
    free = fake_batch(fixed=False)
    loss = make_loss()
    a, b, c = (float(loss(params, free, k)[0]) for k in (KEY, KEY, jax.random.key(7)))
    assert a == b != c
    offset = make_loss(noise_offset=0.5)
    assert float(offset(params, free, KEY)[0]) != a
    fixed = fake_batch()  # with batch["noise"] the offset is not added
    assert float(offset(params, fixed, KEY)[0]) == float(loss(params, fixed, KEY)[0])


def test_text_conditioning_paths():
    params = fake_params()
    batch = fake_batch(cond="input_ids")
    model = FakeModel()
    _, aux = make_loss(model)(params, batch, KEY)
    assert model.calls["text_encoder"] == 1
    context = np.asarray(batch["input_ids"], np.float64)[..., None] * np.asarray(params["text_encoder"]["e"])
    np.testing.assert_allclose(np.asarray(aux["per_example"]),
                               np_per_example(params, batch, "epsilon", context=context), rtol=1e-5)
    # the text encoder's parameters get gradients through input_ids
    g = jax.grad(lambda p: make_loss()(p, batch, KEY)[0])(params)
    assert float(jnp.abs(g["text_encoder"]["e"]).sum()) > 0

    # cached context: the text encoder is neither needed nor run
    model = FakeModel()
    ctx_batch = fake_batch()
    make_loss(model)({"unet": params["unet"]}, ctx_batch, KEY)
    assert model.calls["text_encoder"] == 0 and model.calls["unet"] == 1
    # "context" wins over "input_ids" when both are present
    both = {**ctx_batch, "input_ids": batch["input_ids"]}
    np.testing.assert_allclose(float(make_loss()(params, both, KEY)[0]),
                               float(make_loss()(params, ctx_batch, KEY)[0]), rtol=0)

    with pytest.raises(KeyError, match="'latents' or 'latent_mean'"):
        make_loss()(params, {k: v for k, v in ctx_batch.items() if k != "latents"}, KEY)
    with pytest.raises(KeyError, match="'context' or 'input_ids'"):
        make_loss()(params, {k: v for k, v in ctx_batch.items() if k != "context"}, KEY)


# --------------------------------------------------------------------------- combinators

def test_masked():
    params, batch = fake_params(), fake_batch()
    per = np_per_example(params, batch, "epsilon")
    mask = np.array([True, False, True, True])
    batch = {**batch, "m": jnp.asarray(mask)}
    model = FakeModel()
    loss, aux = losses.masked(make_loss(model), "m")(params, batch, KEY)
    np.testing.assert_allclose(float(loss), per[mask].mean(), rtol=1e-5)
    assert float(aux["loss"]) == float(loss)
    np.testing.assert_allclose(np.asarray(aux["per_example"]), per, rtol=1e-5)
    assert model.calls["unet_call"] == 1
    inv, _ = losses.masked(make_loss(), "m", invert=True)(params, batch, KEY)
    np.testing.assert_allclose(float(inv), per[~mask].mean(), rtol=1e-5)
    # integer masks work too
    as_int, _ = losses.masked(make_loss(), "m")(params, {**batch, "m": jnp.asarray(mask, jnp.int32)}, KEY)
    assert float(as_int) == float(loss)


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_prior_preservation(weight):
    params, batch = fake_params(), fake_batch()
    per = np_per_example(params, batch, "epsilon")
    prior = np.array([False, True, False, True])
    model = FakeModel()
    fn = losses.prior_preservation(make_loss(model), weight=weight)
    loss, aux = fn(params, {**batch, "is_prior": jnp.asarray(prior)}, KEY)
    assert model.calls["unet_call"] == 1 and model.calls["unet"] == 1
    np.testing.assert_allclose(float(aux["instance_loss"]), per[~prior].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["prior_loss"]), per[prior].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), per[~prior].mean() + weight * per[prior].mean(), rtol=1e-5)
    assert float(aux["loss"]) == float(loss)
    # a custom key
    fn2 = losses.prior_preservation(make_loss(), weight=weight, prior_key="cls")
    assert float(fn2(params, {**batch, "cls": jnp.asarray(prior)}, KEY)[0]) == pytest.approx(float(loss), rel=1e-6)


def _draw(params, batch, rng):
    v = jax.random.normal(rng)
    return v, {"draw": v, "vec": jnp.ones(3)}


def test_weighted_sum():
    params, batch = fake_params(), fake_batch(fixed=False)
    batch = {**batch, "is_prior": jnp.array([False, True, False, True])}
    fit = losses.prior_preservation(make_loss(), weight=1.0)
    ws = losses.weighted_sum({"fit": (1.0, fit), "reg": (0.1, make_loss(prediction_type="v_prediction")),
                              "a": (2.0, _draw), "b": (-3.0, _draw)})
    total, aux = ws(params, batch, KEY)
    expected = sum(w * float(aux[f"{n}/{k}"]) for n, w, k in
                   [("fit", 1.0, "loss"), ("reg", 0.1, "loss"), ("a", 2.0, "draw"), ("b", -3.0, "draw")])
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert float(aux["loss"]) == float(total)
    assert {"fit/loss", "fit/instance_loss", "fit/prior_loss", "reg/loss", "a/draw", "b/draw", "loss"} == set(aux)
    # each term draws from its own key: the same random loss gives different values under two names
    assert float(aux["a/draw"]) != float(aux["b/draw"])
    assert float(aux["fit/loss"]) != float(aux["reg/loss"])
    # deterministic given the key; a different key changes it
    assert float(ws(params, batch, KEY)[0]) == float(total) != float(ws(params, batch, jax.random.key(3))[0])
    assert set(losses.scalar_metrics({"x": jnp.ones(()), "y": jnp.ones(2)})) == {"x"}
    with pytest.raises(ValueError, match="at least one term"):
        losses.weighted_sum({})


def test_weighted_sum_keeps_per_example_so_masks_can_wrap_it():
    params, batch = fake_params(), fake_batch()  # fixed noise and timesteps: every term sees the same draw
    eps, v = np_per_example(params, batch, "epsilon"), np_per_example(params, batch, "v_prediction")
    ws = losses.weighted_sum({"eps": (1.0, make_loss()), "v": (0.25, make_loss(prediction_type="v_prediction"))})
    total, aux = ws(params, batch, KEY)
    np.testing.assert_allclose(np.asarray(aux["per_example"]), eps + 0.25 * v, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(np.mean(eps + 0.25 * v)), rtol=1e-5)
    # wrapped: prior preservation and masking of the sum, one number per example
    prior = np.array([False, True, False, True])
    with_prior = {**batch, "is_prior": jnp.asarray(prior)}
    pp, pp_aux = losses.prior_preservation(ws, weight=0.5)(params, with_prior, KEY)
    both = eps + 0.25 * v
    np.testing.assert_allclose(float(pp_aux["instance_loss"]), both[~prior].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(pp), both[~prior].mean() + 0.5 * both[prior].mean(), rtol=1e-5)
    m, _ = losses.masked(ws, "is_prior")(params, with_prior, KEY)
    np.testing.assert_allclose(float(m), both[prior].mean(), rtol=1e-5)
    # a term without per_example, or of another shape: no per_example (a sum would be meaningless)
    _, aux = losses.weighted_sum({"eps": (1.0, make_loss()), "draw": (1.0, _draw)})(params, batch, KEY)
    assert "per_example" not in aux

    def pairs(p, b, k):
        return jnp.float32(0.0), {"per_example": jnp.zeros(2)}

    _, aux = losses.weighted_sum({"eps": (1.0, make_loss()), "pairs": (1.0, pairs)})(params, batch, KEY)
    assert "per_example" not in aux
    with pytest.raises(KeyError, match="per_example"):
        losses.masked(losses.weighted_sum({"draw": (1.0, _draw)}), "is_prior")(params, with_prior, KEY)


# --------------------------------------------------------------------------- transformations

def pp_loss(model=None, **cfg):
    return losses.prior_preservation(make_loss(model, **cfg), weight=0.5)


def pp_batch(fixed=True):
    return {**fake_batch(fixed=fixed, cond="input_ids"), "is_prior": jnp.array([False, False, True, True])}


def test_jit_equals_eager():
    params, batch = fake_params(), pp_batch(fixed=False)  # random latents draws, timesteps and noise inside
    batch = {**batch, "latent_mean": batch.pop("latents"), "latent_logvar": jnp.full((B, H, W, C), -2.0)}
    fn = losses.weighted_sum({"pp": (1.0, pp_loss(min_snr_gamma=5.0)),
                              "masked": (0.5, losses.masked(make_loss(prediction_type="sample"), "is_prior")),
                              "offset": (0.1, make_loss(noise_offset=0.1))})  # one compilation for all three
    eager, eager_aux = fn(params, batch, KEY)
    jitted, jit_aux = jax.jit(fn)(params, batch, KEY)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    # per_example: every term has one of shape (B,), so weighted_sum reports their weighted sum (test below)
    assert set(jit_aux) == set(eager_aux) == {"loss", "pp/loss", "pp/instance_loss", "pp/prior_loss", "masked/loss",
                                              "offset/loss", "per_example"}
    for k in eager_aux:
        np.testing.assert_allclose(np.asarray(jit_aux[k]), np.asarray(eager_aux[k]), rtol=1e-5)


def test_grad_matches_finite_differences():
    params, batch = fake_params(), pp_batch()
    fn = pp_loss(prediction_type="v_prediction", min_snr_gamma=5.0)
    f = lambda p: fn(p, batch, KEY)[0]
    g = jax.grad(f)(params)
    leaves = jax.tree.leaves(g)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert all(float(jnp.abs(x).max()) > 0 for x in leaves)  # every parameter matters
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        eps = 1e-2  # the loss is quadratic in the parameters: central differences are exact up to rounding
        plus = f(jax.tree.map(lambda x, y: x + eps * y, params, d))
        minus = f(jax.tree.map(lambda x, y: x - eps * y, params, d))
        fd = (float(plus) - float(minus)) / (2 * eps)
        analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
        assert fd == pytest.approx(analytic, rel=2e-3, abs=1e-4)


def test_vmap_over_keys():
    params, batch = fake_params(), pp_batch(fixed=False)
    fn = pp_loss()
    keys = jax.random.split(KEY, 5)
    values, aux = jax.jit(jax.vmap(lambda k: fn(params, batch, k)))(keys)
    assert values.shape == (5,) and aux["per_example"].shape == (5, B)
    singles = np.array([float(fn(params, batch, k)[0]) for k in keys])
    np.testing.assert_allclose(np.asarray(values), singles, rtol=1e-5)
    assert len(set(singles.tolist())) == 5


def test_scan_sgd_lowers_the_loss():
    params, batch = fake_params(), pp_batch()
    fn = pp_loss()
    grad_fn = jax.value_and_grad(fn, has_aux=True)

    def sgd(p, i):
        (value, _), g = grad_fn(p, batch, jax.random.fold_in(KEY, i))
        return jax.tree.map(lambda x, y: x - 0.05 * y, p, g), value

    final, history = jax.jit(lambda p: jax.lax.scan(sgd, p, jnp.arange(30)))(params)
    history = np.asarray(history)
    end = float(fn(final, batch, KEY)[0])
    assert np.all(np.diff(history) <= 1e-6), history
    assert end < 0.7 * history[0], (history[0], end)


# --------------------------------------------------------------------------- the real micro UNet

@pytest.fixture(scope="module")
def micro():
    from persguard_jax.models import functional as F
    from persguard_jax.train.selfcheck import micro_data, micro_modules
    model, params = F.split_modules(micro_modules(0))
    data = micro_data(4, seed=1)
    rng = np.random.default_rng(1)
    data["noise"] = rng.normal(size=data["latents"].shape).astype(np.float32)  # no random draws to compile
    data["timesteps"] = np.array([10, 900, 300, 600], np.int32)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    batch["is_prior"] = jnp.array([False, False, True, True])
    return model, params, batch


def test_micro_unet_prior_preservation_grads(micro):
    model, params, batch = micro
    inner = losses.bind(losses.denoising_loss, model=model, schedule=SCHEDULE,
                        cfg=LossConfig(prediction_type="v_prediction", min_snr_gamma=5.0))
    fn = losses.prior_preservation(inner, weight=0.5)
    (loss, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch, KEY)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    unet_leaves = jax.tree.leaves(grads["unet"])
    assert len(unet_leaves) > 10
    for x in unet_leaves:
        assert np.isfinite(np.asarray(x)).all()
    te_leaves = jax.tree.leaves(grads["text_encoder"])
    assert all(np.isfinite(np.asarray(x)).all() for x in te_leaves)
    assert sum(float(jnp.abs(x).sum()) for x in unet_leaves) > 0
    assert sum(float(jnp.abs(x).sum()) for x in te_leaves) > 0  # trained through input_ids
    per = np.asarray(aux["per_example"], np.float64)
    assert per.shape == (4,) and np.isfinite(per).all()
    np.testing.assert_allclose(float(aux["instance_loss"]), per[:2].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["prior_loss"]), per[2:].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), per[:2].mean() + 0.5 * per[2:].mean(), rtol=1e-5)
    assert float(aux["loss"]) == float(loss)


def test_missing_module_params_raise(micro):
    model, params, batch = micro
    fn = losses.bind(losses.denoising_loss, model=model, schedule=SCHEDULE)
    with pytest.raises(KeyError, match="text_encoder"):
        fn({"unet": params["unet"]}, batch, KEY)


# --------------------------------------------------------------------------- config

def test_loss_config_validation():
    with pytest.raises(ValueError, match="prediction_type"):
        LossConfig(prediction_type="eps")
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="min_snr_gamma"):
            LossConfig(min_snr_gamma=bad)
    assert LossConfig(min_snr_gamma=None).min_snr_gamma is None
    with pytest.raises(ValueError, match=r"unknown keys \['snr_gamma'\]"):
        LossConfig.from_dict({"snr_gamma": 5.0})
    with pytest.raises(ValueError, match="prediction_type"):
        LossConfig.from_dict({"prediction_type": "x0"})
    cfg = LossConfig(prediction_type="v_prediction", min_snr_gamma=5.0, noise_offset=0.05)
    assert LossConfig.from_dict(cfg.to_dict()) == cfg
    assert LossConfig.from_dict(None) == LossConfig()
    assert hash(cfg) == hash(LossConfig.from_dict(cfg.to_dict()))


def test_combinators_keep_per_example_weights():
    """``batch["weight"]`` survives masking and prior preservation: weight 0 removes an example."""
    per_example = jnp.array([1.0, 3.0, 5.0, 7.0])

    def inner(params, batch, rng):
        return per_example.mean(), {"per_example": per_example}

    batch = {"is_prior": jnp.array([0, 0, 1, 1]), "weight": jnp.array([1.0, 0.0, 1.0, 3.0])}
    loss, aux = losses.prior_preservation(inner, weight=2.0)(None, batch, jax.random.key(0))
    assert float(aux["instance_loss"]) == pytest.approx(1.0)
    assert float(aux["prior_loss"]) == pytest.approx((5.0 + 21.0) / 4.0)
    assert float(loss) == pytest.approx(1.0 + 2.0 * 6.5)
    loss, _ = losses.masked(inner, "is_prior", invert=True)(None, batch, jax.random.key(0))
    assert float(loss) == pytest.approx(1.0)


# --------------------------------------------------------------------------- pre-training losses

class FakeVAE:
    """encode = (x * a, constant logvar), decode = z / a: reconstruction and KL computable by hand."""
    dtype = jnp.float32

    def __init__(self, p):
        self.p = p

    def encode(self, x):
        return x * self.p["a"], jnp.full(x.shape, self.p["lv"])

    def decode(self, z):
        return z / self.p["a"]


class FakeVAEModel:
    def bind(self, params, name):
        return FakeVAE(params[name])


def test_vae_loss_matches_hand_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(3, 4, 4, 3)).astype(np.float32)
    a, lv, kl_w = 0.5, np.log(0.04), 0.1
    params = {"vae": {"a": jnp.float32(a), "lv": jnp.float32(lv)}}
    key = jax.random.key(3)
    loss, aux = jax.jit(lambda p, b, k: losses.vae_loss(p, b, k, model=FakeVAEModel(), kl_weight=kl_w))(
        params, {"images": jnp.asarray(x)}, key)
    eps = np.asarray(jax.random.normal(key, x.shape))
    z = x * a + np.exp(0.5 * lv) * eps
    rec = ((z / a - x) ** 2).reshape(3, -1).mean(1)
    kl = (0.5 * ((x * a) ** 2 + np.exp(lv) - 1 - lv)).reshape(3, -1).mean(1)
    np.testing.assert_allclose(aux["per_example"], rec + kl_w * kl, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(rec + kl_w * kl), rtol=1e-5)
    # a standard-normal posterior has zero KL
    _, aux0 = losses.vae_loss({"vae": {"a": jnp.float32(1e-6), "lv": jnp.float32(0.0)}}, {"images": jnp.asarray(x)},
                              key, model=FakeVAEModel(), kl_weight=1.0)
    assert float(aux0["kl"]) < 1e-9


def test_vae_edge_term_weighs_fine_texture_not_offsets():
    """``edge_error`` is 0 for a constant offset and 4x the pixel error for a checkerboard's (differences of
    +-1 become +-2); in ``vae_loss`` it adds ``edge_weight`` times itself per example, by hand."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(-1, 1, size=(2, 6, 6, 3)).astype(np.float32))
    assert float(jnp.max(losses.edge_error(x + 0.3, x))) < 1e-12
    checker = jnp.asarray(np.indices((6, 6)).sum(0) % 2 * 2.0 - 1.0, jnp.float32)[None, :, :, None]
    checker = jnp.broadcast_to(checker, (2, 6, 6, 3)) * 0.1
    np.testing.assert_allclose(losses.edge_error(x + checker, x), 4 * losses.squared_error(x + checker, x), rtol=1e-5)
    params, key = {"vae": {"a": jnp.float32(0.5), "lv": jnp.float32(np.log(0.04))}}, jax.random.key(3)
    _, plain = losses.vae_loss(params, {"images": x}, key, model=FakeVAEModel(), kl_weight=0.1)
    _, with_edges = losses.vae_loss(params, {"images": x}, key, model=FakeVAEModel(), kl_weight=0.1, edge_weight=2.0)
    z = x * 0.5 + jnp.exp(0.5 * np.log(0.04)) * jax.random.normal(key, x.shape)
    np.testing.assert_allclose(with_edges["per_example"],
                               plain["per_example"] + 2.0 * losses.edge_error(z / 0.5, x), rtol=1e-5)
    assert "edges" in with_edges and "edges" not in plain


def test_caption_dropout_replaces_a_fraction_with_the_empty_prompt():
    def inner(params, batch, rng):
        return jnp.float32(0.0), {"ids": batch["input_ids"]}

    ids = jnp.tile(jnp.arange(2, 9, dtype=jnp.int32)[None], (4000, 1))
    empty = jnp.array([0, 1, 1, 1, 1, 1, 1], jnp.int32)
    for rate, lo, hi in ((0.0, 0, 0), (1.0, 4000, 4000), (0.25, 900, 1100)):
        _, aux = jax.jit(losses.caption_dropout(inner, rate=rate, empty_ids=empty))({}, {"input_ids": ids},
                                                                                    jax.random.key(0))
        dropped = np.all(np.asarray(aux["ids"]) == np.asarray(empty), axis=1)
        kept = np.all(np.asarray(aux["ids"]) == np.asarray(ids), axis=1)
        assert lo <= dropped.sum() <= hi and np.all(dropped | kept)


def test_below_timestep_draws_the_inner_losss_timesteps_under_the_bound():
    """Drawn timesteps fall in [0, high) and cover it; a batch's own timesteps are kept; no bound is the loss itself;
    the distillation term through it equals the distillation at the drawn timesteps."""
    def inner(params, batch, rng):
        return jnp.float32(0.0), {"t": batch.get("timesteps")}

    batch = {"latents": jnp.zeros((4000, 2, 2, 1))}
    _, aux = jax.jit(losses.below_timestep(inner, schedule=SCHEDULE, high=300))({}, batch, jax.random.key(0))
    t = np.asarray(aux["t"])
    assert t.min() >= 0 and t.max() == 299 and 120 < t.mean() < 180
    fixed = {**batch, "timesteps": jnp.full((4000,), 700)}
    assert np.all(np.asarray(losses.below_timestep(inner, schedule=SCHEDULE, high=300)({}, fixed, KEY)[1]["t"]) == 700)
    assert losses.below_timestep(inner, schedule=SCHEDULE, high=None) is inner
    dis = losses.bind(losses.distillation_loss, model=FakeModel(), schedule=SCHEDULE)
    params, free = {**fake_params(), "teacher": fake_params()}, fake_batch(3, fixed=False)
    got, aux = losses.below_timestep(dis, schedule=SCHEDULE, high=50)(params, free, KEY)
    drawn = losses.sample_timesteps(jax.random.fold_in(KEY, 1), B, SCHEDULE, 50)
    assert float(got) == pytest.approx(float(dis(params, {**free, "timesteps": drawn}, KEY)[0]), rel=1e-6)


def test_info_nce_hand_value():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 0.0]])
    got = losses.info_nce(logits, jnp.arange(3))
    lg = np.asarray(logits, np.float64)
    want = -(np.diag(lg) - np.log(np.exp(lg).sum(1)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[2], np.log(3), rtol=1e-6)


class FakeCLIP:
    def __init__(self, p):
        self.p = p

    def get_image_features(self, pixels):
        return pixels.reshape(pixels.shape[0], -1) @ self.p["wi"]

    def get_text_features(self, ids):
        return ids.astype(jnp.float32) @ self.p["wt"]


class FakeCLIPModel:
    def bind(self, params, name):
        return FakeCLIP(params[name])


def test_clip_contrastive_loss_is_symmetric_infonce_with_clipped_temperature():
    rng = np.random.default_rng(1)
    p = {"clip": {"wi": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),
                  "wt": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                  "logit_scale": jnp.float32(np.log(200.0))}}  # above CLIP's cap of 100
    batch = {"pixel_values": jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.float32),
             "input_ids": jnp.asarray(rng.integers(0, 9, size=(4, 6)), jnp.int32)}
    loss, aux = jax.jit(lambda p, b: losses.clip_contrastive_loss(p, b, None, model=FakeCLIPModel()))(p, batch)
    img = np.asarray(batch["pixel_values"], np.float64).reshape(4, -1) @ np.asarray(p["clip"]["wi"], np.float64)
    txt = np.asarray(batch["input_ids"], np.float64) @ np.asarray(p["clip"]["wt"], np.float64)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    lg = 100.0 * img @ txt.T
    ce = lambda m: -(np.diag(m) - np.log(np.exp(m - m.max(1, keepdims=True)).sum(1)) - m.max(1))
    np.testing.assert_allclose(aux["per_example"], 0.5 * (ce(lg) + ce(lg.T)), rtol=1e-4)
    np.testing.assert_allclose(loss, np.mean(0.5 * (ce(lg) + ce(lg.T))), rtol=1e-4)


# --------------------------------------------------------------------------- one device's share of the batch

def _split_vs_whole(loss_fn, params, batch, *, grad_accum=1, devices=2):
    """(loss, metrics, grads) of ``loss_fn`` as one program over the whole batch and as the step computes it per
    device (``shard_map`` over the batch, the global-batch helpers active, one psum of the gradients)."""
    from persguard_jax import sharding as shd
    from persguard_jax.train.step import StepConfig, data_parallel_plan, loss_and_grads, per_device_loss_and_grads
    cfg = StepConfig(grad_accum=grad_accum)
    mesh = shd.make_mesh(shd.MeshConfig(data=-1), jax.devices()[:devices])
    bs = shd.batch_sharding(batch, mesh)
    plan = data_parallel_plan(jax.tree.map(lambda _: shd.replicated(mesh), params), {}, bs)
    assert plan is not None and plan.axes == ("data", "fsdp")
    whole = jax.jit(lambda p, b: loss_and_grads(loss_fn, p, {}, b, KEY, cfg))(params, batch)
    split = jax.jit(lambda p, b: per_device_loss_and_grads(loss_fn, p, {}, b, KEY, cfg, plan))(
        params, jax.device_put(batch, bs))
    return whole, split


def _assert_same(whole, split):
    (l1, m1, g1), (l2, m2, g2) = whole, split
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    assert set(m1) == set(m2)
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def _distill(params, batch, rng):
    return losses.distillation_loss(params, batch, rng, model=FakeModel(), schedule=SCHEDULE)


def _pp_posterior_batch():
    """Drawn noise, timesteps and latents (posterior), token ids, and the prior examples unevenly spread over two
    devices (3 instance examples: device 0 holds 2, device 1 holds 1 and the only prior example)."""
    b = {**fake_batch(fixed=False, cond="input_ids"), "is_prior": jnp.array([0, 0, 0, 1], jnp.int32)}
    b["latent_mean"] = b.pop("latents")
    return {**b, "latent_logvar": jnp.full((B, H, W, C), -2.0)}


SPLIT_CASES = {
    "prior_preservation": (lambda: pp_loss(min_snr_gamma=5.0, noise_offset=0.1), _pp_posterior_batch),
    "masked_weighted": (lambda: losses.masked(make_loss(), "is_prior", invert=True),
                        lambda: {**fake_batch(fixed=False), "is_prior": jnp.array([1, 0, 0, 0]),
                                 "weight": jnp.array([1.0, 2.0, 0.5, 1.0])}),
    "weighted_sum": (lambda: losses.weighted_sum({"pp": (1.0, pp_loss()), "draw": (0.5, _draw),
                                                  "v": (0.3, make_loss(prediction_type="v_prediction"))}),
                     _pp_posterior_batch),
    "caption_dropout": (lambda: losses.caption_dropout(make_loss(), rate=0.5, empty_ids=jnp.zeros(L, jnp.int32)),
                        lambda: fake_batch(fixed=False, cond="input_ids")),
    "distillation": (lambda: _distill, lambda: {**fake_batch(fixed=False), "teacher_context": fake_batch(1)["context"]}),
    "vae": (lambda: losses.bind(losses.vae_loss, model=FakeVAEModel(), kl_weight=0.1),
            lambda: {"images": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 4, 4, 3)), jnp.float32)}),
    "clip_in_batch_negatives": (lambda: losses.bind(losses.clip_contrastive_loss, model=FakeCLIPModel()),
                                lambda: {"pixel_values": jnp.asarray(np.random.default_rng(1).normal(size=(4, 2, 2, 3)),
                                                                     jnp.float32),
                                         "input_ids": jnp.asarray(np.random.default_rng(2).integers(0, 9, (4, 6)),
                                                                  jnp.int32)}),
}


def _split_case_params(name):
    if name == "distillation":
        return {**fake_params(), "teacher": {"unet": {"w": jnp.array([0.5, 0.1]), "c": jnp.array(-0.2)}}}
    if name == "vae":
        return {"vae": {"a": jnp.float32(0.5), "lv": jnp.float32(np.log(0.04))}}
    if name == "clip_in_batch_negatives":
        rng = np.random.default_rng(1)
        return {"clip": {"wi": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),
                         "wt": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "logit_scale": jnp.float32(1.0)}}
    return fake_params()


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_losses_see_the_global_batch_when_the_step_splits_it(name, grad_accum):
    """Every library loss gives the same value, scalar metrics and gradients on each device's share (the
    step's per-device path) as on the whole batch: global means and counts, the same noise per example, in-batch
    negatives across devices."""
    make, batch = SPLIT_CASES[name]
    _assert_same(*_split_vs_whole(make(), _split_case_params(name), batch(), grad_accum=grad_accum))


def test_a_loss_reduced_on_one_share_is_refused():
    def local_mean(params, batch, rng):
        loss, aux = make_loss()(params, batch, rng)
        return loss, {**aux, "mean_t": jnp.mean(batch["timesteps"].astype(jnp.float32))}  # this share only

    from persguard_jax.train.step import LocalReductionError
    with pytest.raises(LocalReductionError, match="'mean_t' is reduced over one device's share"):
        _split_vs_whole(local_mean, fake_params(), fake_batch())


def test_batch_helpers_outside_a_split_are_plain():
    x = jnp.arange(6.0).reshape(3, 2)
    assert losses.batch_shards() is None
    assert float(losses.batch_sum(x)) == 15.0 and float(losses.batch_mean(x)) == 2.5
    np.testing.assert_array_equal(losses.example_index(3), np.arange(3))
    assert losses.batch_gather(x) is x
    np.testing.assert_array_equal(losses.batch_draw(lambda s: jax.random.normal(KEY, s), (3, 2)),
                                  jax.random.normal(KEY, (3, 2)))
