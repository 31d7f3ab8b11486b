"""The step factory on a micro model: sharded = unsharded, accumulation, mixed precision, frozen parts, EMA."""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax import losses
from persguard_jax import sharding as shd
from persguard_jax.models import functional as F
from persguard_jax.models.remat import set_remat
from persguard_jax.schedulers import SchedulerConfig, make_schedule
from persguard_jax.train import OptimizerConfig, StepConfig, create_state, make_optimizer, make_train_step
from persguard_jax.train.selfcheck import micro_data, micro_modules
from persguard_jax.train.step import data_parallel_plan, loss_and_grads

SCHEDULE = make_schedule(SchedulerConfig())


@pytest.fixture(scope="module")
def micro():
    modules = micro_modules(0)
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    model, params = F.split_modules(modules)
    return modules, model, params, logical


def fixed_batch(n=8, seed=0):
    """Data with the noise and timesteps fixed, so every variant sees exactly the same problem."""
    rng = np.random.default_rng(seed)
    b = {k: v[:n] for k, v in micro_data(16, seed).items()}
    b["noise"] = rng.normal(size=b["latents"].shape).astype(np.float32)
    b["timesteps"] = rng.integers(0, 1000, size=(n,)).astype(np.int32)
    return b


def run_steps(micro, mesh_cfg, *, n_steps=2, trainable=("unet",), step_cfg=StepConfig(), batch=None,
              ema=False, devices=None):
    _, model, params, logical = micro
    mesh = shd.make_mesh(mesh_cfg, devices)
    train_p, frozen = F.partition(params, list(trainable))
    train_l, frozen_l = F.partition(logical, list(trainable))
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-3, max_grad_norm=1.0))
    state, ss = create_state(train_p, train_l, opt, mesh, mesh_cfg, ema=ema)
    fs = shd.param_shardings(frozen_l, frozen, mesh, mesh_cfg)
    batch = batch or fixed_batch()
    bs = shd.batch_sharding(batch, mesh, mesh_cfg)
    loss = losses.bind(losses.denoising_loss, model=model, schedule=SCHEDULE, cfg=losses.LossConfig())
    step = make_train_step(loss, opt, state_shardings=ss, frozen_shardings=fs, batch_shardings=bs, cfg=step_cfg)
    frozen, b = jax.device_put(frozen, fs), jax.device_put(batch, bs)
    history = []
    for _ in range(n_steps):
        state, m = step(state, frozen, b)
        history.append({k: float(v) for k, v in m.items()})
    return state, history


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def reference(micro):
    """One step on one device: the run the other variants are compared with."""
    return run_steps(micro, shd.MeshConfig(data=1, fsdp=1), devices=jax.devices()[:1], n_steps=1)


@pytest.mark.xdist_group("engine_reference")
def test_2x4_mesh_equals_one_device(micro, reference):
    # one step: Adam's first update is ~lr * sign(g), which would amplify rounding noise in near-zero gradients
    one, h1 = reference
    sharded, h8 = run_steps(micro, shd.MeshConfig(data=2, fsdp=4, min_shard_size=64), n_steps=1)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(sharded.params))
    for a, b in zip(h1, h8):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"]))
    assert max_diff(one.params, sharded.params) <= 1e-5
    assert max_diff(one.opt_state, sharded.opt_state) <= 1e-5
    assert abs(h1[0]["grad_norm"] - h8[0]["grad_norm"]) <= 1e-5 * h1[0]["grad_norm"]


@pytest.mark.slow
def test_gradient_accumulation_equals_full_batch(micro):
    cfg = shd.MeshConfig(data=2, fsdp=1, min_shard_size=64)
    full, hf = run_steps(micro, cfg, devices=jax.devices()[:2], n_steps=1)
    acc, ha = run_steps(micro, cfg, devices=jax.devices()[:2], n_steps=1, step_cfg=StepConfig(grad_accum=2))
    assert abs(hf[0]["loss"] - ha[0]["loss"]) <= 1e-5
    assert abs(hf[0]["grad_norm"] - ha[0]["grad_norm"]) <= 1e-4 * hf[0]["grad_norm"]
    assert max_diff(full.params, acc.params) <= 1e-5
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
        run_steps(micro, cfg, devices=jax.devices()[:2], n_steps=1, step_cfg=StepConfig(grad_accum=3))


@pytest.mark.xdist_group("engine_reference")
def test_bf16_compute_keeps_fp32_master_weights(micro, reference):
    cfg = shd.MeshConfig(data=1, fsdp=1)
    _, h32 = reference
    mixed, h16 = run_steps(micro, cfg, devices=jax.devices()[:1], n_steps=1,
                           step_cfg=StepConfig(compute_dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mixed.params))
    assert abs(h16[0]["loss"] - h32[0]["loss"]) <= 3e-2 * h32[0]["loss"]
    assert h16[0]["loss"] != h32[0]["loss"]  # really computed in bf16


@pytest.mark.xdist_group("engine_reference")
def test_frozen_parts_are_not_differentiated(micro, reference):
    """UNet-only training: the text encoder is an input of the step, untouched, and the gradient computation
    has no text-encoder backward (fewer matmuls than when it is trained)."""
    _, model, params, _ = micro
    loss = losses.bind(losses.denoising_loss, model=model, schedule=SCHEDULE, cfg=losses.LossConfig())
    batch = jax.tree.map(jnp.asarray, fixed_batch())

    def count_dots(trainable):
        p, frozen = F.partition(params, trainable)
        jaxpr = jax.make_jaxpr(lambda p, f, b: loss_and_grads(loss, p, f, b, jax.random.key(0), StepConfig()))(
            p, frozen, batch)
        return str(jaxpr).count("dot_general")

    assert count_dots(["unet"]) < count_dots(["unet", "text_encoder"])
    state, _ = reference
    assert set(state.params) == {"unet"}
    with pytest.raises(ValueError, match="select no parameter"):
        F.partition(params, ["unett"])
    sub, rest = F.partition(params, ["unet/*/attentions/*", "re:text_model/encoder"])
    flat = F.flatten(sub)
    assert flat and all("attentions" in k or "text_model/encoder" in k for k in flat)
    assert F.count(sub) + F.count(rest) == F.count(params)
    assert F.flatten(F.merge(sub, rest)).keys() == F.flatten(params).keys()


def test_text_encoder_trains_when_selected(micro):
    state, hist = run_steps(micro, shd.MeshConfig(data=2, fsdp=2, min_shard_size=64), devices=jax.devices()[:4],
                            trainable=("unet", "text_encoder"))
    before = micro[2]["text_encoder"]["text_model"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
    after = state.params["text_encoder"]["text_model"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
    assert float(np.abs(np.asarray(after) - np.asarray(before)).max()) > 0


def test_ema_tracks_params(micro):
    state, _ = run_steps(micro, shd.MeshConfig(data=1, fsdp=1), devices=jax.devices()[:1], n_steps=1, ema=True,
                         step_cfg=StepConfig(ema_decay=0.75))
    p0 = micro[2]["unet"]
    expected = jax.tree.map(lambda e, p: e + 0.25 * (p - e), p0, jax.device_get(state.params["unet"]))
    assert max_diff(expected, state.ema["unet"]) <= 1e-6


def remat_grads(modules, batch):
    model, params = F.split_modules(modules)
    loss = losses.bind(losses.denoising_loss, model=model, schedule=SCHEDULE, cfg=losses.LossConfig())
    p, frozen = F.partition(params, ["unet", "text_encoder"])
    return jax.jit(lambda p: loss_and_grads(loss, p, frozen, batch, jax.random.key(0), StepConfig()))(p)


@pytest.fixture(scope="module")
def no_remat_grads():
    return remat_grads(micro_modules(0), jax.tree.map(jnp.asarray, fixed_batch(4)))


@pytest.mark.parametrize("policy", ["dots_saveable", "full"])
def test_remat_policies_give_the_same_gradients(policy, no_remat_grads):
    modules = micro_modules(0)
    batch = jax.tree.map(jnp.asarray, fixed_batch(4))
    ref = no_remat_grads
    for m in modules.values():
        set_remat(m, policy)
    out = remat_grads(modules, batch)
    model, params = F.split_modules(modules)
    jaxpr = str(jax.make_jaxpr(lambda p: model.bind(p, "unet")(batch["latents"], batch["timesteps"],
                                                               jnp.zeros((4, 8, 16))))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr  # the primitive's name differs between jax versions
    assert abs(float(ref[0]) - float(out[0])) <= 1e-6
    for a, b in zip(jax.tree.leaves(ref[2]), jax.tree.leaves(out[2])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat policy"):
        set_remat(modules["unet"], "some")


# --------------------------------------------------------------------------- per-device gradients (pure data parallel)

def dreambooth_steps(micro, devices, step_cfg, *, n_steps=2):
    """DreamBooth with prior preservation, UNet and text encoder trained, EMA on, noise and timesteps drawn from the
    step's rng, on a default (data=-1) mesh over ``devices``. The prior examples are spread unevenly: device 0 of
    2 holds 4 instance examples, device 1 one instance and 3 prior ones, so each mean needs the global counts.
    Returns (params after step 1 on the host, metrics of every step, the jitted step and its arguments)."""
    _, model, params, logical = micro
    cfg = shd.MeshConfig(data=-1)
    mesh = shd.make_mesh(cfg, jax.devices()[:devices])
    train_p, frozen = F.partition(params, ["unet", "text_encoder"])
    train_l, frozen_l = F.partition(logical, ["unet", "text_encoder"])
    # eps 1e-4, not 1e-8: the attention key biases' true gradient is 0 (softmax ignores a shift of the scores), and
    # Adam's first step with a tiny eps turns their rounding noise (~1e-9) into +-lr updates on either path
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-3, eps=1e-4, max_grad_norm=1.0))
    state, ss = create_state(train_p, train_l, opt, mesh, cfg, ema=True)
    fs = shd.param_shardings(frozen_l, frozen, mesh, cfg)
    batch = {k: v[:8] for k, v in micro_data(16, 3).items()}
    batch["is_prior"] = np.array([0, 0, 0, 0, 0, 1, 1, 1], np.int32)
    bs = shd.batch_sharding(batch, mesh, cfg)
    loss = losses.bind(losses.dreambooth_loss, model=model, schedule=SCHEDULE, cfg=losses.LossConfig(),
                       prior_weight=0.5)
    step = make_train_step(loss, opt, state_shardings=ss, frozen_shardings=fs, batch_shardings=bs, cfg=step_cfg)
    frozen, b = jax.device_put(frozen, fs), jax.device_put(batch, bs)
    history, after_one = [], None
    for i in range(n_steps):
        state, m = step(state, frozen, b)
        history.append({k: float(v) for k, v in m.items()})
        if i == 0:
            after_one = jax.device_get((state.params, state.opt_state, state.ema))
    per_device = step_cfg.data_parallel == "auto" and data_parallel_plan(ss.params, fs, bs) is not None
    return after_one, history, per_device, (step, state, frozen, b)


def all_reduced_arrays(step, *args) -> list[tuple[int, ...]]:
    """The shapes of every array the compiled step all-reduces."""
    shapes = []
    for line in step.lower(*args).compile().as_text().splitlines():
        if " all-reduce(" in line or " all-reduce-start(" in line:
            lhs = line.split(" all-reduce")[0].split("=", 1)[1]
            shapes += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", lhs)]
    return shapes


@pytest.mark.slow
@pytest.mark.parametrize("step_cfg", [StepConfig(), StepConfig(grad_accum=2)], ids=["plain", "grad_accum2"])
def test_per_device_gradients_equal_one_device(micro, step_cfg):
    """With replicated parameters the step computes the gradient per device and all-reduces it once; loss,
    metrics (prior and instance means over the global batch), parameters, AdamW moments and EMA equal the
    one-device run's and the GSPMD path's."""
    one, h1, used, _ = dreambooth_steps(micro, 1, step_cfg)
    assert not used
    two, h2, used, (step, *args) = dreambooth_steps(micro, 2, step_cfg)
    assert used
    runs = [(two, h2)]
    if step_cfg.grad_accum == 1:
        gspmd = dreambooth_steps(micro, 2, dataclasses.replace(step_cfg, data_parallel="gspmd"))
        assert not gspmd[2]
        runs.append(gspmd[:2])
    for after, hist in runs:
        for a, b in zip(h1, hist):  # both steps: the second draws its noise from fold_in(rng, 1)
            assert set(a) == set(b) == {"loss", "instance_loss", "prior_loss", "grad_norm"}
            for k in a:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
        assert max_diff(one, after) <= 1e-5
    # one all-reduce carries the whole gradient: the other reduced arrays are the loss's scalar sums
    n_params = sum(x.size for x in jax.tree.leaves(one[0]))
    arrays = all_reduced_arrays(step, *args)
    assert [s for s in arrays if s] == [(n_params,)], arrays


@pytest.mark.slow
def test_per_device_bf16_and_unknown_mode(micro):
    _, h1, _, _ = dreambooth_steps(micro, 1, StepConfig(compute_dtype="bfloat16"), n_steps=1)
    _, h2, used, _ = dreambooth_steps(micro, 2, StepConfig(compute_dtype="bfloat16"), n_steps=1)
    assert used and abs(h1[0]["loss"] - h2[0]["loss"]) <= 1e-3 * h1[0]["loss"]
    with pytest.raises(ValueError, match=r"step.data_parallel: expected one of .auto., .gspmd."):
        StepConfig(data_parallel="pmap")


def test_step_compiles_ahead_of_time(micro):
    _, model, params, logical = micro
    cfg = shd.MeshConfig(data=2, fsdp=4, min_shard_size=64)
    mesh = shd.make_mesh(cfg)
    p, frozen = F.partition(params, ["unet"])
    pl, fl = F.partition(logical, ["unet"])
    opt = make_optimizer(OptimizerConfig())
    from persguard_jax.train import init_state, state_shardings
    from persguard_jax.train.checkpoint import abstract_like
    shapes = jax.eval_shape(lambda p: init_state(p, opt), p)
    ss = state_shardings(pl, jax.eval_shape(lambda p: p, p), opt, mesh, cfg)
    fs = shd.param_shardings(fl, frozen, mesh, cfg)
    batch = fixed_batch()
    bs = shd.batch_sharding(batch, mesh, cfg)
    loss = losses.bind(losses.denoising_loss, model=model, schedule=SCHEDULE, cfg=losses.LossConfig())
    step = make_train_step(loss, opt, state_shardings=ss, frozen_shardings=fs, batch_shardings=bs)
    args = (abstract_like(shapes, ss), abstract_like(jax.eval_shape(lambda f: f, frozen), fs),
            abstract_like(jax.eval_shape(lambda b: b, batch), bs))
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    assert mem is not None, "XLA:CPU reports compiled memory; a backend without it needs an explicit skip here"

    def per_device_bytes(tree):
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    # the arguments are exactly one device's shards of state, frozen params and batch; the donated state's
    # buffers are reused for the new state (aliased), and FSDP keeps a device's share of the state near 1/4
    state_bytes = per_device_bytes(args[0])
    assert mem.argument_size_in_bytes == sum(per_device_bytes(a) for a in args)
    assert mem.alias_size_in_bytes == state_bytes
    assert state_bytes < 0.3 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[0]))
