"""``train.unroll``: the differentiable inner loop against a Python loop, closed forms, finite differences, and
what ``remat`` saves. A quadratic inner loss makes SGD's unrolled map linear, so its exact second-order gradient
and the first-order (FOMAML) one are closed forms."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from persguard_jax.train import OptimizerConfig, make_optimizer, unroll

A = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])  # SPD: the inner loss's Hessian
LR, K = 0.2, 5
KEY = jax.random.key(0)


def quadratic(params, batch, rng):
    """``0.5 (w - a)^T A (w - a)``: its gradient is ``A (w - a)``, its Hessian ``A``."""
    del rng
    d = params["w"] - batch["a"]
    return 0.5 * d @ jnp.asarray(A, jnp.float32) @ d, {}


def noisy(params, batch, rng):
    """The quadratic around a target moved by noise from ``rng``: the steps must draw ``fold_in(rng, i)``."""
    d = params["w"] - batch["a"] - 0.1 * jax.random.normal(rng, (3,))
    return 0.5 * d @ jnp.asarray(A, jnp.float32) @ d + 0.01 * jnp.sum(params["w"] ** 4), {}


W0 = {"w": jnp.array([0.3, -0.7, 1.1], jnp.float32)}
DATA = {"a": jnp.array([1.0, 0.5, -0.5], jnp.float32)}
B = np.array([0.2, 0.1, -0.4])  # the outer objective: 0.5 ||w_K - B||^2


def outer(run, params=W0, data=DATA):
    tuned, _ = run(params, data, KEY)
    return 0.5 * jnp.sum((tuned["w"] - jnp.asarray(B, jnp.float32)) ** 2)


def closed_form():
    """(w_K, d outer / d w_0 exact, FOMAML's, d outer / d a exact) for SGD on the quadratic, in float64."""
    w, a = np.asarray(W0["w"], np.float64), np.asarray(DATA["a"], np.float64)
    M = np.eye(3) - LR * A
    for _ in range(K):
        w = w - LR * A @ (w - a)
    J = np.linalg.matrix_power(M, K)  # d w_K / d w_0 (w_K = J w_0 + (I - J) a)
    return w, J.T @ (w - B), w - B, (np.eye(3) - J).T @ (w - B)


@pytest.mark.parametrize("optimizer", [optax.adamw(0.05, weight_decay=0.1),
                                       OptimizerConfig(learning_rate=0.05, schedule="linear", total_steps=K)])
def test_equals_a_python_loop_of_the_same_updates(optimizer):
    tx = optimizer if isinstance(optimizer, optax.GradientTransformation) else make_optimizer(optimizer)
    p, state, history = W0, tx.init(W0), []
    for i in range(K):
        (value, _), g = jax.value_and_grad(noisy, has_aux=True)(p, DATA, jax.random.fold_in(KEY, i))
        updates, state = tx.update(g, state, p)
        p, history = optax.apply_updates(p, updates), history + [float(value)]
    for scan_unroll in (1, True):  # rolled, and laid out step by step
        tuned, losses = jax.jit(unroll(noisy, optimizer, K, scan_unroll=scan_unroll))(W0, DATA, KEY)
        np.testing.assert_allclose(np.asarray(tuned["w"]), np.asarray(p["w"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(losses), history, rtol=1e-5)
    assert history[-1] < history[0]


def test_per_step_data():
    targets = {"a": jnp.stack([DATA["a"] + i for i in range(K)])}
    tuned, _ = unroll(quadratic, optax.sgd(LR), K, per_step_data=True)(W0, targets, KEY)
    w = np.asarray(W0["w"], np.float64)
    for i in range(K):
        w = w - LR * A @ (w - np.asarray(targets["a"][i], np.float64))
    np.testing.assert_allclose(np.asarray(tuned["w"]), w, rtol=1e-5)
    with pytest.raises(ValueError, match=f"leading dimension of {K}"):
        unroll(quadratic, optax.sgd(LR), K, per_step_data=True)(W0, DATA, KEY)
    with pytest.raises(ValueError, match="order must be 1"):
        unroll(quadratic, optax.sgd(LR), K, order=3)


def test_second_order_is_exact_and_first_order_is_fomaml():
    w_k, exact, fomaml, exact_data = closed_form()
    second = unroll(quadratic, optax.sgd(LR), K, order=2)
    first = unroll(quadratic, optax.sgd(LR), K, order=1)
    np.testing.assert_allclose(np.asarray(second(W0, DATA, KEY)[0]["w"]), w_k, rtol=1e-5)
    g2 = np.asarray(jax.grad(lambda p: outer(second, p))(W0)["w"])
    g1 = np.asarray(jax.grad(lambda p: outer(first, p))(W0)["w"])
    np.testing.assert_allclose(g2, exact, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g1, fomaml, rtol=1e-4, atol=1e-6)
    assert np.abs(g1 - g2).max() > 0.05  # the two orders really differ here
    # the data reach the outer gradient through the inner gradients only: exact at order 2, none at order 1
    gd2 = np.asarray(jax.grad(lambda d: outer(second, data=d))(DATA)["a"])
    gd1 = np.asarray(jax.grad(lambda d: outer(first, data=d))(DATA)["a"])
    np.testing.assert_allclose(gd2, exact_data, rtol=1e-4, atol=1e-6)
    assert np.abs(gd1).max() == 0.0


def test_second_order_through_adam_matches_finite_differences():
    """A non-quadratic loss and Adam (no closed form): central differences along random directions."""
    run = unroll(noisy, optax.adam(0.05), K)
    f = jax.jit(lambda w: outer(run, {"w": w}))
    w0 = W0["w"]
    g = np.asarray(jax.grad(f)(w0), np.float64)
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.normal(size=3).astype(np.float32)
        eps = 1e-2
        fd = (float(f(w0 + eps * d)) - float(f(w0 - eps * d))) / (2 * eps)
        assert float(g @ d) == pytest.approx(fd, rel=2e-2, abs=1e-4)
    fo = np.asarray(jax.grad(lambda w: outer(unroll(noisy, optax.adam(0.05), K, order=1), {"w": w}))(w0))
    assert np.abs(fo - g).max() > 1e-3


def mlp(params, batch, rng):
    del rng
    h = jnp.tanh(batch["x"] @ params["w1"])
    return jnp.mean(jnp.tanh(h @ params["w2"]) ** 2), {}


@pytest.mark.parametrize("replay", [False, True])
def test_second_order_through_adamw_is_finite_for_a_parameter_the_inner_loss_does_not_use(replay):
    # a parameter the attacker's loss never touches but the outer objective reads (the embedding of an identifier
    # the inner prompts do not name) has Adam's v = 0, where sqrt has an infinite derivative: 0 * inf = NaN
    params = {"w": W0["w"], "unused": jnp.array([0.5, -1.0])}

    def objective(run, p):
        tuned, _ = run(p, DATA, KEY)
        return 0.5 * jnp.sum((tuned["w"] - jnp.asarray(B, jnp.float32)) ** 2) + jnp.sum(tuned["unused"] ** 2)

    # clipping active: the global norm spreads one NaN cotangent to every parameter, as on the world model
    cfg = OptimizerConfig(learning_rate=0.05, weight_decay=0.0, max_grad_norm=0.1)
    grads = jax.grad(lambda p: objective(unroll(quadratic, cfg, K, order=2, replay=replay), p))(params)
    np.testing.assert_allclose(grads["unused"], 2 * np.asarray(params["unused"]), rtol=1e-6)  # never updated
    reference = jax.grad(lambda p: outer(unroll(quadratic, cfg, K, order=2, replay=replay), p))(W0)["w"]
    np.testing.assert_allclose(grads["w"], reference, rtol=1e-5)
    naive = unroll(quadratic, make_optimizer(cfg), K, order=2, replay=replay)  # the same AdamW, eps_root 0
    assert not np.isfinite(np.asarray(jax.grad(lambda p: objective(naive, p))(params)["w"])).any()


def test_remat_gives_the_same_numbers_and_keeps_only_the_carry():
    p = {"w1": jnp.full((16, 16), 0.1), "w2": jnp.eye(16)}
    data = {"x": jax.random.normal(KEY, (512, 16))}

    def grad_fn(steps, remat):
        run = unroll(mlp, optax.adam(0.01), steps, remat=remat)

        def objective(q):
            tuned, losses = run(q, data, KEY)
            return jnp.sum(tuned["w1"] ** 2) + losses[-1]

        return jax.jit(jax.value_and_grad(objective))

    v0, g0 = grad_fn(4, False)(p)
    v1, g1 = grad_fn(4, True)(p)
    assert float(v0) == pytest.approx(float(v1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(unroll(mlp, optax.sgd(0.1), 2, remat=True))(p, data, KEY))
    assert "remat" in jaxpr or "checkpoint" in jaxpr  # the primitive's name differs between jax versions

    def temp_bytes(steps, remat):
        return grad_fn(steps, remat).lower(p).compile().memory_analysis().temp_size_in_bytes

    # the growth from 8 to 24 inner steps: without remat, every step's activations are kept for the backward
    # pass; with it, about the carry (params and Adam's two moments) per step
    activation = 512 * 16 * 4  # one (512, 16) float32 hidden layer
    carry = 3 * sum(x.size * 4 for x in jax.tree.leaves(p))
    plain = temp_bytes(24, False) - temp_bytes(8, False)
    remat = temp_bytes(24, True) - temp_bytes(8, True)
    assert plain > 16 * activation, (plain, remat)
    assert remat < 16 * 4 * carry and remat < 0.05 * plain, (plain, remat)


def test_data_parallel_steps_equal_one_program():
    """``data_parallel``: each step's batch split over 4 devices, the gradient per device and one psum of it,
    the example draws made at the global size (``losses.batch_draw``): the same steps as one program."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from persguard_jax import losses
    from persguard_jax.sharding import MeshConfig, make_mesh
    from persguard_jax.train.step import DataParallel

    def loss(params, batch, rng):  # a per-example loss with a draw per example, reduced over the global batch
        noise = losses.batch_draw(lambda s: jax.random.normal(rng, s), batch["x"].shape)
        h = jnp.tanh((batch["x"] + 0.1 * noise) @ params["w1"]) @ params["w2"]
        value = losses.weighted_mean(jnp.sum(h ** 2, axis=-1), batch["weight"])
        return value, {"loss": value}

    p = {"w1": jax.random.normal(KEY, (6, 5)) * 0.5, "w2": jax.random.normal(jax.random.key(1), (5, 3))}
    data = {"x": jax.random.normal(jax.random.key(2), (3, 8, 6)),  # 3 steps of 8 examples
            "weight": jnp.tile(jnp.asarray([1.0, 0.5, 0.0, 2.0] * 2), (3, 1))}
    mesh = make_mesh(MeshConfig(data=4), devices=jax.devices()[:4])
    plan = DataParallel(mesh, ("data",), {"x": P("data", None), "weight": P("data")})
    run = lambda dp: jax.jit(unroll(loss, optax.adam(0.05), 3, order=1, per_step_data=True,  # noqa: E731
                                    data_parallel=dp))
    one, l_one = run(None)(p, data, KEY)
    whole = NamedSharding(mesh, P())
    split, l_split = run(plan)(*jax.device_put((p, data), whole), KEY)
    np.testing.assert_allclose(np.asarray(l_split), np.asarray(l_one), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(split)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(one["w1"] - p["w1"]).max()) > 0.05  # the steps moved the weights
    with pytest.raises(ValueError, match="first-order"):
        unroll(loss, optax.sgd(0.1), 2, order=2, data_parallel=plan)


def test_replay_gives_the_stored_scans_gradient_with_flat_memory():
    """``replay``: the same outer gradient (through the parameters after K steps and through every inner loss) as
    the stored scan, for the config's AdamW with a schedule, clipping and decay and for per-step data; the compiled
    program's temporaries do not grow with K, while the rematerialised scan's grow by the carry per step.

    The gradients are compared in float64: the two programs order their float operations differently, and six
    AdamW steps differentiated twice turn float32 rounding into relative differences up to 5e-5 (measured with
    XLA:CPU's LLVM at -O0), while in float64 they agree to 1e-12."""
    with jax.enable_x64(True):
        p = {"w1": jax.random.normal(KEY, (16, 16), jnp.float64) * 0.3, "w2": jnp.eye(16, dtype=jnp.float64)}
        data = {"x": jax.random.normal(jax.random.key(1), (64, 16), jnp.float64)}

        def noisy_mlp(params, batch, rng):
            noise = 0.01 * jax.random.normal(rng, (batch["x"].shape[0], 16), batch["x"].dtype)
            h = jnp.tanh(batch["x"] @ params["w1"] + noise)
            return jnp.mean(jnp.tanh(h @ params["w2"]) ** 2), {}

        def value_and_grad(run, data):
            def objective(q):
                tuned, losses = run(q, data, KEY)
                return jnp.sum(tuned["w1"] ** 3) + jnp.sum(tuned["w2"] * tuned["w1"]) + 0.5 * jnp.sum(losses)
            return jax.jit(jax.value_and_grad(objective))

        cfg = OptimizerConfig(learning_rate=0.02, schedule="cosine", warmup_steps=2, total_steps=8, weight_decay=0.1,
                              max_grad_norm=0.05)
        per_step = {"x": jnp.stack([data["x"] * (1 + 0.1 * i) for i in range(6)])}
        for optimizer, steps, d, per_step_data in ((cfg, 6, data, False), (optax.adam(0.01), 6, per_step, True)):
            stored = value_and_grad(unroll(noisy_mlp, optimizer, steps, per_step_data=per_step_data), d)(p)
            replayed = value_and_grad(unroll(noisy_mlp, optimizer, steps, per_step_data=per_step_data,
                                             replay=True), d)(p)
            assert float(replayed[0]) == pytest.approx(float(stored[0]), rel=1e-12)
            for a, b in zip(jax.tree.leaves(stored[1]), jax.tree.leaves(replayed[1])):
                assert a.dtype == jnp.float64
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-12)

        # what the loss closes over (a frozen part an outer objective trains) gets its gradient through every step
        def through_closure(scale, replay):
            scaled = lambda q, b, k: noisy_mlp({"w1": q["w1"] * scale, "w2": q["w2"]}, b, k)  # noqa: E731
            tuned, _ = unroll(scaled, cfg, 6, replay=replay)(p, data, KEY)
            return jnp.sum(tuned["w1"] ** 3)
        closure = [float(jax.grad(through_closure)(jnp.float64(1.3), r)) for r in (False, True)]
        assert abs(closure[0]) > 1e-3 and closure[1] == pytest.approx(closure[0], rel=1e-9)
        # the second-order terms matter here: the first-order gradient is another one
        first = value_and_grad(unroll(noisy_mlp, optax.adam(0.01), 6, order=1, per_step_data=True), per_step)(p)[1]
        assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first),
                                                               jax.tree.leaves(stored[1]))) > 1e-3
    p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    data = {"x": data["x"].astype(jnp.float32)}

    def temp_bytes(steps, **kw):
        run = unroll(mlp, optax.adam(0.01), steps, **kw)
        f = jax.jit(jax.grad(lambda q: jnp.sum(run(q, {"x": data["x"]}, KEY)[0]["w1"] ** 2)))
        return f.lower(p).compile().memory_analysis().temp_size_in_bytes

    carry = 3 * sum(x.size * 4 for x in jax.tree.leaves(p))  # parameters and Adam's two moments
    assert temp_bytes(16, remat=True) - temp_bytes(4, remat=True) >= 12 * carry
    assert temp_bytes(16, replay=True) - temp_bytes(4, replay=True) < carry
    with pytest.raises(ValueError, match="order=2"):
        unroll(mlp, optax.sgd(0.1), 2, order=1, replay=True)
