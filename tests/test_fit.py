"""``train.fit`` with any optax transform: a custom optimizer trains, checkpoints and resumes on the same step and
loop, and the learning rate of every update is in metrics.jsonl. A linear-regression "model" keeps it fast."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from persguard_jax import losses
from persguard_jax.data.batches import ArraySource, StepBatches
from persguard_jax.train import LoopConfig, OptimizerConfig, fit, make_train_step
from persguard_jax.train.metrics import read_metrics
from persguard_jax.train.optim import learning_rate_schedule, resolve_optimizer

W_TRUE = np.array([1.5, -2.0, 0.5], np.float32)


def regression(params, batch, rng):
    """Squared error, meaned over the global batch (``losses.batch_mean``: fit's default mesh splits the batch
    over the 8 test devices and the step computes the gradient per device)."""
    del rng
    per_example = jnp.square(batch["x"] @ params["w"] - batch["y"])
    return losses.batch_mean(per_example), {"per_example": per_example}


def regression_local_mean(params, batch, rng):
    """The same loss meaned with ``jnp.mean``: on a device's share, that is the share's mean."""
    loss, aux = regression(params, batch, rng)
    return aux["per_example"].mean(), aux


def source(n=32, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
    return ArraySource({"x": x, "y": x @ W_TRUE})


def run(workdir, optimizer, steps, *, loss_fn=regression, init=None, **kw):
    params = {"w": jnp.zeros(3, jnp.float32) if init is None else init}
    loop = LoopConfig(num_steps=steps, log_every=1, checkpoint_every=2, tensorboard=False, progress=False)
    result, _ = fit(loss_fn, params, {}, train_logical={"w": P(None)}, frozen_logical={}, source=source(),
                    global_batch=8, workdir=workdir, optimizer=optimizer, loop=loop, **kw)
    return result, read_metrics(workdir / "metrics.jsonl")


def test_custom_transform_trains_checkpoints_resumes_and_logs_its_schedule(tmp_path):
    schedule = optax.linear_schedule(0.2, 0.02, 6)
    sgd = optax.sgd(schedule)
    full, metrics = run(tmp_path / "full", sgd, 6, lr_schedule=schedule)
    assert metrics[-1]["loss"] < 0.2 * metrics[0]["loss"]
    # the rate of update s (logged after it, at step s) is the schedule at s - 1 updates done
    np.testing.assert_allclose([m["learning_rate"] for m in metrics], [float(schedule(s)) for s in range(6)],
                               rtol=1e-6)
    assert len({m["learning_rate"] for m in metrics}) == 6  # it really moves
    # stopped after 3 steps, then the same call with 6: resumed from the checkpoint, the same end point
    half, _ = run(tmp_path / "resumed", sgd, 3, lr_schedule=schedule)
    assert half.resumed_from is None
    assert {"2", "3"} <= {p.name for p in (tmp_path / "resumed/checkpoints").iterdir()}  # every 2 steps and the end
    resumed, resumed_metrics = run(tmp_path / "resumed", sgd, 6, lr_schedule=schedule)
    assert resumed.resumed_from == 3 and resumed.step == 6
    np.testing.assert_array_equal(np.asarray(resumed.state.params["w"]), np.asarray(full.state.params["w"]))
    assert [m["learning_rate"] for m in resumed_metrics] == [m["learning_rate"] for m in metrics]


def project_box(lo: float, hi: float) -> optax.GradientTransformation:
    """Turns an update into the step to the projection of ``params + update`` on ``[lo, hi]``: PGD's projection."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, p: jnp.clip(p + u, lo, hi) - p, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_projected_sign_ascent(tmp_path):
    """PGD's ascent step (``x + alpha * sign(grad)``, then projected): the loss rises, the box holds, and the
    constant step size is logged; its state (no moments) checkpoints like AdamW's."""
    alpha, radius = 0.05, 0.12
    pgd = optax.chain(optax.scale_by_sign(), optax.scale(alpha), project_box(-radius, radius))
    result, metrics = run(tmp_path, pgd, 4, lr_schedule=alpha)
    w = np.asarray(result.state.params["w"])
    expected = np.zeros(3)  # the same updates by hand, on the batches fit drew (data.batches.StepBatches)
    batches = StepBatches(source(), global_batch=8, num_steps=4, seed=0)
    for s in range(4):
        x, y = batches[s]["x"].astype(np.float64), batches[s]["y"].astype(np.float64)
        grad = 2 * x.T @ (x @ expected - y) / len(y)
        expected = np.clip(expected + alpha * np.sign(grad), -radius, radius)
    np.testing.assert_allclose(w, expected, atol=1e-6)
    assert np.abs(w).max() == pytest.approx(radius)  # the projection was active
    data = source().arrays  # ascent: the loss over the whole source rose (each logged loss is another batch's)
    assert np.mean((data["x"] @ w - data["y"]) ** 2) > np.mean(data["y"] ** 2)
    assert all(m["learning_rate"] == pytest.approx(alpha) for m in metrics)
    resumed, _ = run(tmp_path, pgd, 4, lr_schedule=alpha)  # already done: restores the end state, no step runs
    assert resumed.resumed_from == 4 and resumed.step == 4
    np.testing.assert_array_equal(np.asarray(resumed.state.params["w"]), w)


def test_a_loss_meaned_per_device_falls_back_to_gspmd(tmp_path):
    """A loss that means with ``jnp.mean`` would be each device's own loss on the per-device path: the step sees
    it (the mean still differs between devices) and lets GSPMD partition it instead, with the same result."""
    sgd = optax.sgd(0.1)
    per_device, _ = run(tmp_path / "batch_mean", sgd, 2)
    with pytest.warns(UserWarning, match="'loss' is reduced over one device's share.*partitioned by GSPMD"):
        fallback, _ = run(tmp_path / "jnp_mean", sgd, 2, loss_fn=regression_local_mean)
    np.testing.assert_allclose(np.asarray(fallback.state.params["w"]), np.asarray(per_device.state.params["w"]),
                               rtol=1e-6)


def test_optimizer_config_logs_its_schedule(tmp_path):
    cfg = OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_steps=2, total_steps=5, max_grad_norm=None)
    _, metrics = run(tmp_path, cfg, 5)
    expected = [float(learning_rate_schedule(cfg)(s)) for s in range(5)]
    np.testing.assert_allclose([m["learning_rate"] for m in metrics], expected, rtol=1e-6)
    assert expected[0] == 0.0 and expected[2] == pytest.approx(0.1)  # warm-up, then the peak


def test_optimizer_arguments_are_checked():
    with pytest.raises(ValueError, match="lr_schedule is given only with an optax transform"):
        resolve_optimizer(OptimizerConfig(), lr_schedule=0.1)
    with pytest.raises(TypeError, match="OptimizerConfig or an optax GradientTransformation"):
        make_train_step(regression, "adam")
    tx, sched = resolve_optimizer(optax.sgd(0.1))
    assert sched is None and isinstance(tx, optax.GradientTransformation)


TRACES: list[float] = []


def counted_regression(params, batch, rng, *, scale, weights):
    """``regression`` times ``scale``, weighted per input; it notes each trace (a Python side effect runs only when
    jax traces the step)."""
    TRACES.append(scale)
    loss, aux = regression({"w": params["w"] * weights}, batch, rng)
    return scale * loss, aux


def test_a_second_fit_of_the_same_recipe_reuses_its_step(tmp_path):
    """Losses bound separately from equal values (a float, an array by content) share one jitted step: the second
    fit does not trace again, and trains exactly as the first. A different value is a different step."""
    from persguard_jax.train.step_cache import clear_step_cache

    def loss(scale=1.0, weights=(1.0, 1.0, 1.0)):
        return losses.bind(counted_regression, scale=scale, weights=np.array(weights, np.float32))

    clear_step_cache()
    TRACES.clear()
    first, _ = run(tmp_path / "a", OptimizerConfig(learning_rate=0.1), 3, loss_fn=loss())
    traced = len(TRACES)
    assert traced >= 1
    second, _ = run(tmp_path / "b", OptimizerConfig(learning_rate=0.1), 3, loss_fn=loss())
    assert len(TRACES) == traced  # the step of the first fit
    np.testing.assert_array_equal(np.asarray(second.state.params["w"]), np.asarray(first.state.params["w"]))
    for changed in (loss(scale=2.0), loss(weights=(1.0, 1.0, 0.5))):
        before = len(TRACES)
        run(tmp_path / f"c{before}", OptimizerConfig(learning_rate=0.1), 1, loss_fn=changed)
        assert len(TRACES) > before
    before = len(TRACES)
    run(tmp_path / "d", OptimizerConfig(learning_rate=0.2), 1, loss_fn=loss())  # another optimizer: another step
    assert len(TRACES) > before


def test_value_key_compares_by_value_or_gives_up():
    from persguard_jax.train.step_cache import MAX_ARRAY_BYTES, value_key

    def closure(value):
        return lambda params, batch, rng: (value, {})

    a = np.arange(4, dtype=np.float32)
    assert value_key(losses.bind(regression, w=a)) == value_key(losses.bind(regression, w=jnp.asarray(a)))
    assert value_key(losses.bind(regression, w=a)) != value_key(losses.bind(regression, w=a + 1))
    assert value_key(losses.bind(regression, w=a)) != value_key(losses.bind(regression, w=a.astype(np.float64)))
    assert value_key(closure(1)) == value_key(closure(1)) != value_key(closure(2))
    assert value_key(closure(1)) != value_key(closure(1.0))  # an int and a float trace differently
    assert value_key(OptimizerConfig(learning_rate=0.1)) != value_key(OptimizerConfig(learning_rate=0.2))
    assert value_key(closure(0.0)) != value_key(closure(-0.0))
    assert value_key(closure(jax.random.key(0))) == value_key(closure(jax.random.key(0))) != value_key(
        closure(jax.random.key(1)))  # typed keys have no NumPy form: keyed by their bits
    # what it cannot compare by value: identity-only objects, too many bytes of arrays
    assert value_key(closure(object())) is None
    assert value_key(closure(np.zeros(MAX_ARRAY_BYTES // 4 + 1, np.float32))) is None
    assert value_key(losses.bind(regression, w=[a] * 2)) is not None
