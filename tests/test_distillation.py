"""``distillation_loss``: a student against a frozen teacher on the same noisy latents (BadT2I, IMMA, PersGuard's
prior preservation), on the linear stand-in UNet of test_losses so every value can be computed by hand."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax import losses
from persguard_jax.losses import LossConfig
from persguard_jax.train.step import StepConfig, loss_and_grads
from test_losses import AC, SCHEDULE, T_COEF, FakeModel, fake_batch, fake_params

KEY = jax.random.key(0)


def with_teacher(params, **unet):
    """``params`` plus a teacher whose UNet is the student's with ``unet`` entries replaced."""
    return {**params, "teacher": {"unet": {**params["unet"], **unet}}}


def distill(model=None, **cfg):
    return losses.bind(losses.distillation_loss, model=model or FakeModel(), schedule=SCHEDULE, cfg=LossConfig(**cfg))


def np_pred(unet, x_t, t, ctx):
    f64 = lambda x: np.asarray(x, np.float64)
    return x_t * f64(unet["w"]) + f64(unet["c"]) * f64(ctx).mean(axis=(1, 2))[:, None, None, None] + T_COEF * t


def test_zero_when_the_student_is_the_teacher_with_the_same_prompt():
    params = with_teacher(fake_params())
    for batch in (fake_batch(), fake_batch(fixed=False), fake_batch(cond="input_ids")):  # drawn noise too
        loss, aux = jax.jit(distill())(params, batch, KEY)
        assert float(loss) == 0.0 and aux["per_example"].shape == (4,)


def test_positive_when_the_teacher_prompt_differs():
    params, batch = with_teacher(fake_params()), fake_batch()
    other = batch["context"] + 1.0
    loss, _ = distill()(params, {**batch, "teacher_context": other}, KEY)
    assert float(loss) > 1e-3
    ids = fake_batch(cond="input_ids")
    loss, _ = distill()(params, {**ids, "teacher_input_ids": ids["input_ids"] + 1}, KEY)
    assert float(loss) > 1e-3


@pytest.mark.parametrize("min_snr_gamma", [None, 5.0])
def test_matches_hand_computation(min_snr_gamma):
    params = with_teacher(fake_params(), w=jnp.array([0.2, 0.9], jnp.float32), c=jnp.array(-0.5, jnp.float32))
    batch = fake_batch()
    teacher_ctx = np.random.default_rng(5).normal(size=batch["context"].shape).astype(np.float32)
    loss, aux = distill(min_snr_gamma=min_snr_gamma)(params, {**batch, "teacher_context": jnp.asarray(teacher_ctx)},
                                                     KEY)
    t = np.asarray(batch["timesteps"])
    a = AC[t][:, None, None, None]
    x0, noise = (np.asarray(batch[k], np.float64) for k in ("latents", "noise"))
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    t4 = t[:, None, None, None]
    student = np_pred(params["unet"], x_t, t4, batch["context"])
    teacher = np_pred(params["teacher"]["unet"], x_t, t4, teacher_ctx)
    per = ((student - teacher) ** 2).reshape(4, -1).mean(1)
    if min_snr_gamma:
        snr = AC[t] / (1 - AC[t])
        per = per * np.minimum(snr, min_snr_gamma) / snr
    np.testing.assert_allclose(np.asarray(aux["per_example"]), per, rtol=1e-5)
    np.testing.assert_allclose(float(loss), per.mean(), rtol=1e-5)
    wts = jnp.array([1.0, 0.0, 2.0, 1.0])  # per-example weights enter the mean only, as in denoising_loss
    weighted, _ = distill(min_snr_gamma=min_snr_gamma)(params, {**batch, "teacher_context": jnp.asarray(teacher_ctx),
                                                                "weight": wts}, KEY)
    np.testing.assert_allclose(float(weighted), (np.asarray(wts) * per).sum() / 4.0, rtol=1e-5)


def test_no_gradient_reaches_the_teacher():
    params = with_teacher(fake_params(), w=jnp.array([0.2, 0.9], jnp.float32))
    params["teacher"]["text_encoder"] = {"e": jnp.linspace(-0.3, 0.3, 5, dtype=jnp.float32)}
    batch = fake_batch(cond="input_ids")
    grads = jax.grad(lambda p: distill()(p, batch, KEY)[0])(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["teacher"]))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["unet"]))
    assert float(jnp.abs(grads["text_encoder"]["e"]).max()) > 0.0  # the student's encoder still learns


def test_teacher_text_encoder_is_its_own_or_the_students():
    model = FakeModel()
    params = with_teacher(fake_params())
    batch = fake_batch(cond="input_ids")
    assert float(distill(model)(params, batch, KEY)[0]) == 0.0  # shared (student's) encoder: same context
    assert model.calls["text_encoder"] == 2 and model.calls["unet_call"] == 2
    own = {**params, "teacher": {**params["teacher"], "text_encoder": {"e": jnp.ones(5, jnp.float32)}}}
    assert float(distill()(own, batch, KEY)[0]) > 1e-3
    with pytest.raises(KeyError, match=r"params\['frozen_unet'\]"):
        losses.distillation_loss(params, batch, KEY, model=FakeModel(), schedule=SCHEDULE, teacher="frozen_unet")


def test_teacher_in_the_steps_frozen_tree():
    """The step's form: the student's UNet trains, the teacher and text encoder come in the frozen tree."""
    params = with_teacher(fake_params(), c=jnp.array(-0.5, jnp.float32))
    train = {"unet": params["unet"]}
    frozen = {"teacher": params["teacher"], "text_encoder": params["text_encoder"]}
    batch = fake_batch()
    loss, _, grads = loss_and_grads(distill(), train, frozen, batch, KEY, StepConfig())
    assert set(grads) == {"unet"}
    np.testing.assert_allclose(float(loss), float(distill()(params, batch, KEY)[0]), rtol=1e-6)
