"""Retention losses (PersGuard's L_br): the gradient penalty against a hand computation, and both retention
gradients (double backprop through the penalty; exact and first-order through an unrolled attacker) against finite
differences, on the linear stand-in UNet of test_losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from persguard_jax import losses
from persguard_jax.train.unroll import unroll
from test_losses import AC, SCHEDULE, T_COEF, FakeModel, fake_batch, fake_params

KEY = jax.random.key(3)


def denoise():
    return losses.bind(losses.denoising_loss, model=FakeModel(), schedule=SCHEDULE)


def np_unet_grads(params, batch):
    """d(mean squared error)/d(w, c) of the linear UNet, by hand in float64."""
    f64 = lambda x: np.asarray(x, np.float64)
    x0, noise, t, ctx = f64(batch["latents"]), f64(batch["noise"]), np.asarray(batch["timesteps"]), f64(batch["context"])
    a = AC[t][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    m = ctx.mean(axis=(1, 2))[:, None, None, None]
    r = x_t * f64(params["unet"]["w"]) + f64(params["unet"]["c"]) * m + T_COEF * t[:, None, None, None] - noise
    n = r.size
    return 2 / n * np.sum(r * x_t, axis=(0, 1, 2)), 2 / n * np.sum(r * m)


def test_gradient_penalty_matches_hand_computation():
    params, batch = fake_params(), fake_batch()
    penalty, aux = jax.jit(losses.gradient_penalty(denoise(), wrt="unet"))(params, batch, KEY)
    gw, gc = np_unet_grads(params, batch)
    expected = np.sum(gw**2) + gc**2
    assert float(penalty) == pytest.approx(expected, rel=1e-4)
    assert float(aux["grad_norm"]) == pytest.approx(np.sqrt(expected), rel=1e-4)
    assert float(aux["inner_loss"]) == pytest.approx(float(denoise()(params, batch, KEY)[0]), rel=1e-6)
    # over the text encoder too: more leaves, a larger penalty
    both, _ = losses.gradient_penalty(denoise(), wrt=("unet", "text_encoder"))(params, fake_batch(cond="context"), KEY)
    assert float(both) == pytest.approx(expected, rel=1e-4)  # context is given: the text encoder gets no gradient
    with pytest.raises(KeyError, match="no parameters"):
        losses.gradient_penalty(denoise(), wrt="vae")(params, batch, KEY)


def _finite_difference(f, params, leaf_paths, eps=1e-3):
    """Central differences of scalar f(params) along each listed (module, name, index)."""
    out = []
    for module, name, index in leaf_paths:
        def shifted(delta):
            p = jax.tree.map(lambda x: x, params)
            leaf = np.array(p[module][name], np.float32)
            leaf.reshape(-1)[index] += delta
            p[module] = {**p[module], name: jnp.asarray(leaf)}
            return float(f(p))
        out.append((shifted(eps) - shifted(-eps)) / (2 * eps))
    return np.array(out)


PATHS = [("unet", "w", 0), ("unet", "w", 1), ("unet", "c", 0)]


def _analytic(grads):
    return np.array([np.asarray(grads[m][n]).reshape(-1)[i] for m, n, i in PATHS])


def test_gradient_penalty_gradient_is_second_order_and_matches_finite_differences():
    params, batch = fake_params(), fake_batch()
    loss = losses.gradient_penalty(denoise(), wrt="unet")
    grads = jax.grad(lambda p: loss(p, batch, KEY)[0])(params)
    fd = _finite_difference(lambda p: loss(p, batch, KEY)[0], params, PATHS)
    np.testing.assert_allclose(_analytic(grads), fd, rtol=2e-2, atol=1e-6)
    assert np.abs(fd).max() > 1e-4  # the check has something to check


def _unrolled(order: int, steps: int = 3):
    inner = unroll(denoise(), optax.sgd(0.5), steps, order=order)
    outer = losses.on("outer", denoise())
    return losses.after_finetuning(inner, outer, inner_key="attack")


def _batch():
    return {"attack": fake_batch(seed=1), "outer": fake_batch(seed=2)}


def test_after_finetuning_exact_gradient_matches_finite_differences():
    params, batch = fake_params(), _batch()
    loss = _unrolled(order=2)
    value, aux = jax.jit(loss)(params, batch, KEY)
    assert set(aux) >= {"loss", "inner_first", "inner_last"} and float(aux["inner_last"]) < float(aux["inner_first"])
    grads = jax.grad(lambda p: loss(p, batch, KEY)[0])(params)
    fd = _finite_difference(lambda p: loss(p, batch, KEY)[0], params, PATHS)
    np.testing.assert_allclose(_analytic(grads), fd, rtol=2e-2, atol=1e-6)


def test_after_finetuning_first_order_gradient_is_the_outer_gradient_at_the_tuned_parameters():
    params, batch = fake_params(), _batch()
    k_inner, k_outer = jax.random.split(KEY)
    tuned, _ = unroll(denoise(), optax.sgd(0.5), 3, order=2)(params, batch["attack"], k_inner)
    expected = jax.grad(lambda p: denoise()(p, batch["outer"], k_outer)[0])(tuned)
    first = jax.grad(lambda p: _unrolled(order=1)(p, batch, KEY)[0])(params)
    exact = jax.grad(lambda p: _unrolled(order=2)(p, batch, KEY)[0])(params)
    np.testing.assert_allclose(_analytic(first), _analytic(expected), rtol=1e-5)
    assert np.abs(_analytic(exact) - _analytic(first)).max() > 1e-4  # the inner steps' curvature counts in order 2


def test_on_picks_its_sub_batch_and_names_a_missing_one():
    params, batch = fake_params(), _batch()
    assert float(losses.on("outer", denoise())(params, batch, KEY)[0]) == float(
        denoise()(params, batch["outer"], KEY)[0])
    with pytest.raises(KeyError, match="prior"):
        losses.on("prior", denoise())(params, batch, KEY)


def test_dispatched_inner_steps_train_as_the_in_program_first_order_loop(tmp_path):
    """``fit(before_step=InnerSteps(...))``: the attacker's steps run as separate programs ahead of each step and
    read by ``losses.at_tuned`` train the model as ``after_finetuning`` with the first-order loop inside the step
    does (fixed noise and timesteps, so no draw differs), on fit's mesh (8 devices, the batch split; GSPMD's
    step, which the nested gradients of the in-program loop need, and for the dispatched term the per-device one)."""
    from jax.sharding import PartitionSpec as P

    from persguard_jax.data.batches import ArraySource
    from persguard_jax.train import LoopConfig, fit
    from persguard_jax.train.dispatch import InnerSteps
    from persguard_jax.train import StepConfig
    parts = [_batch() for _ in range(2)]
    flat = {f"{g}.{k}": np.concatenate([np.asarray(b[g][k]) for b in parts]) for g in ("attack", "outer")
            for k in parts[0][g]}
    unflat = lambda b: {g: {k.split(".", 1)[1]: v for k, v in b.items() if k.startswith(g + ".")}
                        for g in ("attack", "outer")}
    backdoor = losses.on("outer", denoise())
    trains = ("unet", "text_encoder")
    in_program = losses.weighted_sum({"bb": (1.0, backdoor), "br": (1.0, _unrolled(order=1))})
    dispatched = losses.weighted_sum({"bb": (1.0, backdoor),
                                      "br": (1.0, losses.at_tuned(backdoor, "protected", trains=trains))})
    inner = InnerSteps({"protected": (denoise(), "attack")}, trains=trains, optimizer=optax.sgd(0.5), steps=3)
    params = fake_params()
    results = {}
    # the dispatched term nests no gradient in the step, which may then run per device (data_parallel auto)
    for name, loss_fn, before, mode in (("in_program", in_program, None, "gspmd"),
                                        ("dispatched", dispatched, inner, "gspmd"),
                                        ("dispatched_per_device", dispatched, inner, "auto")):
        loop = LoopConfig(num_steps=2, log_every=1, checkpoint_every=2, tensorboard=False, progress=False)
        results[name], _ = fit(loss_fn, {"unet": params["unet"]}, {"text_encoder": params["text_encoder"]},
                               train_logical={"unet": {"w": P(None), "c": P()}},
                               frozen_logical={"text_encoder": {"e": P(None)}}, source=ArraySource(flat),
                               global_batch=8, workdir=tmp_path / name, optimizer=optax.sgd(0.05), loop=loop,
                               map_fn=unflat, before_step=before,
                               step=StepConfig(data_parallel=mode))
    a = results["in_program"]
    for b in (results["dispatched"], results["dispatched_per_device"]):
        for leaf in ("w", "c"):
            np.testing.assert_allclose(np.asarray(b.state.params["unet"][leaf]),
                                       np.asarray(a.state.params["unet"][leaf]), rtol=1e-5, atol=1e-7)
        for key in ("br/loss", "br/inner_first", "br/inner_last"):
            assert b.last_metrics[key] == pytest.approx(a.last_metrics[key], rel=1e-5), key
    assert np.abs(np.asarray(a.state.params["unet"]["w"]) - np.asarray(params["unet"]["w"])).max() > 1e-3
    assert a.last_metrics["br/inner_last"] < a.last_metrics["br/inner_first"]


def test_dispatched_inner_steps_compute_their_gradients_as_the_step_config_says():
    """``InnerSteps(step=StepConfig(...))``: the loss sees the parameters in the step's compute dtype and the
    batch in ``grad_accum`` micro-batches (the loss below reports both in its value), the updates land on
    float32 copies, and the micro-batches' mean gradient is the whole batch's (a loss with no draws)."""
    from types import SimpleNamespace

    from persguard_jax.train import StepConfig
    from persguard_jax.train.dispatch import InnerSteps

    def loss_fn(params, batch, key):
        w, x = params["unet"]["w"], batch["x"]
        fit = jnp.mean((x * w.astype(jnp.float32) - 1.0) ** 2)
        # what the loss saw, carried in its value without a gradient: 100 if bfloat16, the micro-batch's size
        seen = 100.0 * (w.dtype == jnp.bfloat16) + x.shape[0]
        return fit + jax.lax.stop_gradient(jnp.float32(seen)), {}

    x = jnp.linspace(0.5, 1.5, 8 * 3, dtype=jnp.float32).reshape(8, 3)
    state = SimpleNamespace(params={"unet": {"w": jnp.full((3,), 0.25, jnp.float32)}}, step=jnp.int32(0),
                            rng=jax.random.key_data(jax.random.key(0)))
    run = lambda cfg: InnerSteps({"p": (loss_fn, "attack")}, trains=("unet",), optimizer=optax.sgd(0.1), steps=2,
                                 step=cfg)(state, {}, {"attack": {"x": x}})
    plain, bf16, accum = run(None), run(StepConfig(compute_dtype="bfloat16")), run(StepConfig(grad_accum=2))
    seen = lambda out: np.round(np.asarray(out[losses.TUNED_LOSSES]["p"]) - 0.5)  # the fit term is in [0, 1)
    assert list(seen(plain)) == [8, 8] and list(seen(bf16)) == [108, 108] and list(seen(accum)) == [4, 4]
    tuned = {k: out[losses.TUNED]["p"]["unet"]["w"] for k, out in (("plain", plain), ("bf16", bf16),
                                                                   ("accum", accum))}
    assert all(w.dtype == jnp.float32 for w in tuned.values())
    np.testing.assert_allclose(tuned["accum"], tuned["plain"], rtol=1e-6)
    np.testing.assert_allclose(tuned["bf16"], tuned["plain"], rtol=2e-2)  # the same steps, at bfloat16's precision
    assert float(jnp.abs(tuned["plain"] - 0.25).min()) > 1e-2  # the steps moved the parameters
