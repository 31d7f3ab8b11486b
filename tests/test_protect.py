"""Protective perturbations: sign-PGD as an optax transform, the pixel objective, the ASPL schedule, and
``persguard protect`` end to end on the world model (its input folder untouched, its bad inputs refused)."""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from persguard_jax import losses
from persguard_jax.cli import main
from persguard_jax.protect import ProtectConfig
from persguard_jax.protect import methods as M
from persguard_jax.train.pgd import project, sign_pgd
from persguard_jax.train.optim import OptimizerConfig

WORLD = "persguard_jax/assets/world_tiny"


def test_sign_pgd_stays_in_the_ball_and_the_range():
    rng = np.random.default_rng(0)
    origin = jnp.asarray(rng.uniform(-1, 1, (3, 8, 8, 3)), jnp.float32)
    origin = origin.at[0, 0, 0, 0].set(-1.0).at[0, 0, 0, 1].set(1.0)  # at the range's edges
    radius, step = 0.1, 0.03
    tx = sign_pgd(step, origin, radius)
    x, state = origin, tx.init(origin)
    for i in range(12):
        g = jnp.asarray(rng.normal(size=origin.shape), jnp.float32)
        updates, state = tx.update(g, state, x)
        moved = optax.apply_updates(x, updates)
        # each step is a descent sign step, then the projection
        np.testing.assert_allclose(moved, project(x - step * jnp.sign(g), origin, radius), atol=1e-6)
        x = moved
    assert float(jnp.abs(x - origin).max()) <= radius + 1e-6
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(jnp.abs(x - origin).max()) > radius - step  # it did move out to the ball


def test_sign_pgd_needs_params():
    tx = sign_pgd(0.1, jnp.zeros(3), 0.2)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))


@pytest.fixture(scope="module")
def world():
    """(pipe, setting, params, photos in [-1, 1], conditioning) on the committed world model."""
    from persguard_jax.data.world import world_of
    from persguard_jax.io import uint8_to_signed
    from persguard_jax.models import load_pipeline
    from persguard_jax.dreambooth.data import prompt_conditioning
    from persguard_jax.protect.runner import make_setting
    from persguard_jax.workflows.protect import WORKFLOW
    pipe = load_pipeline(WORLD)
    overrides = ("protect.class_name=dog", "protect.pgd_steps=2", "protect.surrogate_steps=2", "protect.model_steps=1",
                 "protect.eval_draws=4")
    config = WORKFLOW.load(argparse.Namespace(config=None, overrides=overrides, method="aspl"))
    setting, params, _ = make_setting(pipe, config, ("unet", "text_encoder"))
    photos = uint8_to_signed(world_of(WORLD).subject_photos("dog_00", 3))
    cond = prompt_conditioning(pipe, config.dreambooth.instance_prompt, 3, embed=False)
    return pipe, setting, params, photos, cond


def test_pgd_raises_the_models_loss_and_keeps_the_budget(world):
    _, setting, params, photos, cond = world
    setting = setting.__class__(**{**setting.__dict__, "cfg": ProtectConfig(budget=8, step_size=1, unroll=False)})
    run = jax.jit(lambda x: M.pgd(M.protection_objective(params, setting), x, x, cond, jax.random.key(0), steps=8,
                                  setting=setting))
    adv, history = run(jnp.asarray(photos))
    assert history.shape == (8,)
    delta = np.abs(np.asarray(adv) - photos)
    assert delta.max() <= setting.cfg.radius + 1e-6 and np.asarray(adv).max() <= 1 and np.asarray(adv).min() >= -1
    measure = jax.jit(functools.partial(M.denoising_losses, setting=setting))
    key = jax.random.key(1)
    before, after = measure(params, jnp.asarray(photos), cond, key), measure(params, adv, cond, key)
    assert float(after.mean()) > 1.3 * float(before.mean()), (before, after)


def test_target_shift_loss_by_hand(world):
    from persguard_jax import schedulers
    _, setting, params, photos, cond = world
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10, 400, 900])
    batch = {**cond, "latents": z, "target_latents": target, "noise": noise, "timesteps": t}
    got, _ = losses.target_shift_loss(params, batch, jax.random.key(0), model=setting.model,
                                      schedule=setting.schedule, cfg=setting.loss_cfg)
    s = setting.schedule
    x_t = schedulers.add_noise(s, z, noise, t)
    context = setting.model.bind(params, "text_encoder")(jnp.asarray(cond["input_ids"]))
    assert setting.loss_cfg.prediction_type == "v_prediction"  # the world model's
    v = np.asarray(setting.model.bind(params, "unet")(x_t, t, context), np.float64)
    a_t = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
    a_p = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t) - 1][:, None, None, None]
    x_t = np.asarray(x_t, np.float64)
    x0 = np.sqrt(a_t) * x_t - np.sqrt(1 - a_t) * v
    eps = np.sqrt(1 - a_t) * x_t + np.sqrt(a_t) * v
    prev = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps
    want = np.mean((prev - (np.sqrt(a_p) * np.asarray(target) + np.sqrt(1 - a_p) * np.asarray(noise))) ** 2)
    np.testing.assert_allclose(float(got), want, rtol=2e-4)


def _per_device(setting, devices: int):
    """``setting`` on a mesh of ``devices`` CPU devices (replicated parameters: the per-device path) and the
    sharding that puts an argument whole on each of them."""
    import dataclasses

    from jax.sharding import NamedSharding, PartitionSpec as P

    from persguard_jax import sharding as shd
    mesh = shd.make_mesh(shd.MeshConfig(data=devices), devices=jax.devices()[:devices])
    return dataclasses.replace(setting, mesh=mesh, batch_axes=("data", "fsdp")), NamedSharding(mesh, P())


@pytest.mark.slow
def test_pgd_per_device_equals_one_program(world):
    """3 photos over 2 devices: padded to 4 with a zero-weight copy (the targeted term weighs it too), the same
    draws, so the same objective and, but for steps whose gradient is within rounding of zero, the same pixels.
    (The DreamBooth steps' per-device gradient: tests/test_unroll.py, data_parallel.)"""
    from persguard_jax.models import functional as F
    _, setting, params, photos, cond = world
    split, whole = _per_device(setting, 2)
    assert M.split_axes(split) == ("data",) and M.split_axes(split, 2) == ("data",) and M.split_axes(split, 3) == ()
    targeted = {**cond, "target_latents": jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 4)),
                                                      jnp.float32)}
    x = jnp.asarray(photos)
    run = lambda st: jax.jit(lambda a, im, b: M.pgd(M.protection_objective(a, st), im, im, b,  # noqa: E731
                                                   jax.random.key(2), steps=1, setting=st))
    (y1, h1), (y2, h2) = run(setting)(params, x, targeted), run(split)(*jax.device_put((params, x, targeted), whole))
    np.testing.assert_allclose(np.asarray(h2), np.asarray(h1), rtol=1e-4)
    assert y2.shape == y1.shape and float(jnp.abs(y1 - x).max()) > 0
    assert float(jnp.mean(jnp.abs(y1 - y2) > 1e-5)) < 2e-3


def test_per_device_choice():
    """``protect.per_device``: never with sharded parameters; ``auto`` is off on the CPU, where one process with
    replicated parameters runs on one device instead."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from persguard_jax import sharding as shd
    from persguard_jax.protect.runner import _one_device, _per_device
    mesh = shd.make_mesh(shd.MeshConfig(data=-1))
    whole, cut = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    assert _per_device("always", {"w": whole}) and not _per_device("never", {"w": whole})
    assert not _per_device("always", {"w": whole, "v": cut})
    cpu = jax.devices()[0].platform == "cpu"
    assert _per_device("auto", {"w": whole}) == (not cpu)
    assert _one_device("auto", {"w": whole}) == cpu
    assert not any(_one_device(c, {"w": whole}) for c in ("always", "never"))
    assert not _one_device("auto", {"w": whole, "v": cut})  # sharded weights need the mesh


def test_eot_transform_blurs_flips_and_differentiates():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    outs = [M.eot_transform(x, jax.random.key(i), kernel=7, max_sigma=2.0) for i in range(12)]
    corr = lambda a, b: float(jnp.sum(a * b))  # noqa: E731
    flips = [corr(o, x[:, :, ::-1]) > corr(o, x) for o in outs]
    assert any(flips) and not all(flips)  # flipped at random
    variances = [float(jnp.var(o)) for o in outs]
    assert max(variances) <= float(jnp.var(x)) + 1e-6 and np.mean(variances) < 0.8 * float(jnp.var(x))  # blurred
    g = jax.grad(lambda x: M.eot_transform(x, jax.random.key(0), kernel=7, max_sigma=2.0).sum())(x)
    assert float(jnp.abs(g).sum()) > 0


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from persguard_jax.data.world import world_of
    folder = tmp_path_factory.mktemp("photos") / "dog"
    folder.mkdir()
    for i, p in enumerate(world_of(WORLD).subject_photos("dog_01", 3)):
        Image.fromarray(p).save(folder / f"photo_{i}.png")
    return folder


@pytest.mark.slow
def test_protect_command_aspl(photos, tmp_path, capsys, monkeypatch):
    """ASPL end to end; each iteration runs the configured surrogate, PGD and model steps (counted as the pieces
    are traced) and the protected PNGs keep the budget."""
    calls = []
    real_db, real_pgd = M.dreambooth_steps, M.pgd
    monkeypatch.setattr(M, "dreambooth_steps", lambda *a, steps, **k: calls.append(("db", steps)) or real_db(
        *a, steps=steps, **k))
    monkeypatch.setattr(M, "pgd", lambda *a, steps, **k: calls.append(("pgd", steps)) or real_pgd(*a, steps=steps, **k))
    before = _digest(photos)
    out = tmp_path / "aspl"
    argv = ["protect", "--model", WORLD, "--images", str(photos), "--method", "aspl", "--out", str(out),
            "protect.class_name=dog", "protect.iterations=2", "protect.pgd_steps=3", "protect.surrogate_steps=0",
            "protect.model_steps=2", "dreambooth.train_text_encoder=false", "protect.budget=8", "protect.unroll=false", "dreambooth.num_class_images=4", "protect.eval_draws=4"]
    assert main(argv) == 0
    assert calls == [("db", 0), ("pgd", 3), ("db", 2)]  # one trace, reused by both iterations
    assert _digest(photos) == before  # the input folder is only read
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["per_photo"]) == ["photo_0.png", "photo_1.png", "photo_2.png"]
    for name in results["per_photo"]:
        clean = np.asarray(Image.open(photos / name), np.int16)
        protected = np.asarray(Image.open(out / name), np.int16)
        assert protected.shape == clean.shape
        assert 0 < np.abs(protected - clean).max() <= 8
        assert results["per_photo"][name]["linf"] == np.abs(protected - clean).max()
    assert results["iterations"] == 2 and results["steps_per_iteration"] == {"surrogate": 0, "pgd": 3, "model": 2}
    assert (results["devices"], results["per_device"]) == (1, False)  # per_device auto on the CPU: one device
    assert results["surrogate_loss"]["protected"] > results["surrogate_loss"]["clean"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "protected 3 photos with aspl" in capsys.readouterr().out


@pytest.mark.slow
def test_protect_command_advdm_resumes(photos, tmp_path):
    out = tmp_path / "advdm"
    argv = ["protect", "--model", WORLD, "--images", str(photos), "--method", "advdm", "--out", str(out),
            "protect.class_name=dog", "protect.attack_steps=6", "protect.chunk=3", "protect.checkpoint_every=1",
            "protect.unroll=false",
            "protect.eval_draws=2"]
    assert main(argv) == 0
    first = {p: (out / p).read_bytes() for p in ("photo_0.png", "photo_1.png")}
    assert json.loads((out / "results.json").read_text())["resumed_from"] is None
    assert main(argv + ["--resume"]) == 0  # complete: the saved photos come back, nothing is recomputed
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from"] == 2 and results["pgd_steps"] == 6
    assert all((out / p).read_bytes() == b for p, b in first.items())


@pytest.mark.parametrize("case, args, message", [
    ("no images", ["--images", "{empty}"], "no images"),
    ("budget 0", ["protect.budget=0"], "protect.budget"),
    ("unknown method", ["--method", "glaze"], "invalid choice"),
    ("out inside images", ["--out", "{photos}/out"], "inside --images"),
    ("bad target", ["protect.target_image={photos}/nothing.png"], "nothing.png"),
])
def test_protect_bad_inputs(photos, tmp_path, capsys, case, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = {"--model": WORLD, "--images": str(photos), "--method": "advdm", "--out": str(tmp_path / "new")}
    overrides = []
    for a in args:
        a = a.format(empty=empty, photos=photos)
        overrides.append(a)
    argv, i = ["protect"], 0
    pairs = dict(base)
    while i < len(overrides):
        if overrides[i].startswith("--"):
            pairs[overrides[i]] = overrides[i + 1]
            i += 2
        else:
            i += 1
    for k, v in pairs.items():
        argv += [k, v]
    argv += [o for o in overrides if "=" in o and not o.startswith("--")]
    before = _digest(photos)
    with pytest.raises(SystemExit) if case == "unknown method" else _nothing():
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert _digest(photos) == before and not (tmp_path / "new").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
def test_protect_command_fsmg_trains_its_surrogate_then_attacks_it(photos, tmp_path):
    """FSMG: the personalize recipe for dreambooth.steps on the clean photos (its own run folder), then the
    configured PGD steps against that fixed model."""
    out = tmp_path / "fsmg"
    assert main(["protect", "--model", WORLD, "--images", str(photos), "--method", "fsmg", "--out", str(out),
                 "protect.class_name=dog", "protect.attack_steps=5", "protect.chunk=2", "protect.unroll=false",
                 "protect.eval_draws=2", "dreambooth.steps=3", "dreambooth.num_class_images=2",
                 "dreambooth.class_batch_size=2", "dreambooth.eval_num_images=1", "dreambooth.eval_steps=2",
                 "dreambooth.train_text_encoder=false"]) == 0
    surrogate = json.loads((out / "surrogate" / "results.json").read_text())
    assert surrogate["steps"] == 3 and surrogate["instance_prompt"] == "a photo of sks dog"
    results = json.loads((out / "results.json").read_text())
    assert results["pgd_steps"] == 5
    assert [row["pgd_steps"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [2, 4, 5]
    assert results["surrogate_loss"]["protected"] > results["surrogate_loss"]["clean"]


@pytest.mark.parametrize("name", ["protect_world", "protect_sd15", "protect_sd21base"])
def test_shipped_protect_configs_parse(name):
    from persguard_jax.workflows.protect import WORKFLOW
    config = WORKFLOW.load(argparse.Namespace(config=name, overrides=("protect.budget=6.4",), method="fsmg"))
    assert config.protect.method == "fsmg" and config.protect.radius == pytest.approx(2 * 6.4 / 255)
    assert config.loop.num_steps == config.dreambooth.steps == config.optimizer.total_steps
    if config.protect.class_name:
        assert config.dreambooth.instance_prompt == f"a photo of sks {config.protect.class_name}"
    with pytest.raises(ValueError, match="protect.iterations"):
        WORKFLOW.load(argparse.Namespace(config=name, overrides=("protect.iterations=0",), method="aspl"))
