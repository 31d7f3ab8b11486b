"""DreamBooth on a tiny pipeline: the command end to end, the pure loss, and the scannable inner loop."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from persguard_jax.cli import main
from persguard_jax.models import functional as F
from persguard_jax.models import load_pipeline, save_pipeline
from persguard_jax.models.tiny import tiny_pipeline
from persguard_jax.sample import text_to_image
from persguard_jax.schedulers import SchedulerConfig, make_schedule
from persguard_jax.train.metrics import read_metrics
from persguard_jax.dreambooth import finetune
from persguard_jax.losses import dreambooth_loss, pairs_to_examples
from persguard_jax.dreambooth import encode_latents

PROMPT, CLASS = "a photo of sks dog", "a photo of dog"


def subject_photos(folder, n=4):
    """A recognisable subject: a red square on blue, slightly shifted in each photo."""
    folder.mkdir()
    for i in range(n):
        a = np.zeros((40, 40, 3), np.uint8)
        a[:] = (30, 60, 200)
        a[8 + i:24 + i, 10:26] = (220, 30, 30)
        Image.fromarray(a).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    model = save_pipeline(tiny_pipeline(0), root / "base")
    photos = subject_photos(root / "photos")
    out = root / "out"
    args = ["personalize", "--model", str(model), "--instance-dir", str(photos), "--instance-prompt", PROMPT,
            "--class-prompt", CLASS, "--out", str(out), "--config", "dreambooth_tiny",
            "dreambooth.steps=40", "dreambooth.eval_steps=4", "dreambooth.class_sample_steps=4"]
    assert main(args) == 0
    return dict(root=root, model=model, photos=photos, out=out, args=args)


def test_outputs_and_loss_falls(run):
    out = run["out"]
    for name in ("model/model_index.json", "samples.png", "results.json", "config.yaml", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert len(list((out / "class_images").glob("*.png"))) == 4
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 40 and results["trainable"] == "unet+text_encoder"
    metrics = read_metrics(out / "metrics.jsonl")
    first, last = metrics[0], metrics[-1]
    assert last["step"] == 40
    assert last["instance_loss"] < 0.5 * first["instance_loss"]


def test_identifier_samples_move_toward_the_subject(run):
    """From the same initial noise, the identifier prompt's sampled latents land much closer to the subject
    photos' latents after personalisation (latent space: the random tiny VAE cannot draw the photos)."""
    base, tuned = load_pipeline(run["model"]), load_pipeline(run["out"] / "model")
    from persguard_jax.data.images import load_folder
    mean, _ = encode_latents(tuned.vae, load_folder(run["photos"], 32))
    target = mean * tuned.vae.config.scaling_factor

    def distance(pipe):
        z = text_to_image(pipe, [PROMPT] * 4, num_steps=8, guidance_scale=5.0, seed=3, progress=False,
                          output_type="latents")
        return float(np.sqrt(((z[:, None] - target[None]) ** 2).mean(axis=(2, 3, 4))).min(1).mean())

    before, after = distance(base), distance(tuned)
    assert after < 0.5 * before, (before, after)


def test_existing_output_is_never_overwritten(run, capsys):
    marker = run["out"] / "results.json"
    before = marker.read_bytes()
    assert main(run["args"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert marker.read_bytes() == before


def test_bad_inputs(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(bad / "small.png")
    base = ["personalize", "--model", str(run["model"]), "--class-prompt", CLASS, "--instance-prompt", PROMPT,
            "--config", "dreambooth_tiny"]
    assert main(base + ["--instance-dir", str(bad), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "small.png" in err and "cannot be used" in err
    assert not (tmp_path / "o1").exists()  # inputs are checked before anything is written
    assert main(base + ["--instance-dir", str(run["photos"]), "--out", str(tmp_path / "o2"), "dreambooth.stepz=3"]) == 2
    assert "unknown keys ['stepz']" in capsys.readouterr().err
    assert main(base + ["--instance-dir", str(run["photos"]), "--out", str(tmp_path / "o3"), "steps"]) == 2
    assert "not key=value" in capsys.readouterr().err
    assert main(["personalize", "--model", str(tmp_path / "nope"), "--instance-dir", str(run["photos"]),
                 "--out", str(tmp_path / "o4"), "--config", "dreambooth_tiny"]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_encode_latents_compiles_once_per_vae_and_pads_the_last_chunk():
    from persguard_jax.dreambooth import data
    pipe = tiny_pipeline(0)
    images = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    before = data._encode._cache_size()
    mean, logvar = encode_latents(pipe.vae, images, batch=2)  # chunks of 2, 2, 1 (padded to 2)
    again, _ = encode_latents(pipe.vae, images[:3], batch=2)
    assert data._encode._cache_size() - before == 1  # one shape, one graph: compiled once
    assert mean.shape[0] == 5 and logvar.shape == mean.shape
    single, _ = encode_latents(pipe.vae, images[4:5], batch=1)
    np.testing.assert_allclose(mean[4:5], single, atol=1e-5)  # padding does not leak into real rows
    np.testing.assert_allclose(again, mean[:3], atol=1e-6)


def test_finetune_scans_the_real_unet():
    """The inner loop on the micro UNet: a lax.scan of DreamBooth steps that trains the UNet and leaves the
    frozen text encoder alone."""
    from persguard_jax.train.selfcheck import micro_data, micro_modules
    model, params = F.split_modules(micro_modules(0))
    schedule = make_schedule(SchedulerConfig())
    data = {k: jnp.asarray(v[:2]) for k, v in micro_data(4).items()}
    pairs = pairs_to_examples({k: v.reshape((1, 2) + v.shape[1:]) for k, v in data.items()})
    assert pairs["is_prior"].tolist() == [0, 1]
    tuned, history = jax.jit(lambda p: finetune(p, pairs, 3, model=model, schedule=schedule, rng=jax.random.key(1),
                                                learning_rate=1e-2))(params)
    assert history.shape == (3,) and bool(jnp.all(jnp.isfinite(history)))
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(tuned["unet"]), jax.tree.leaves(params["unet"]))]
    assert max(moved) > 1e-3
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(tuned["text_encoder"]),
                                                   jax.tree.leaves(params["text_encoder"])))
    with pytest.raises(ValueError, match="leading dimension of 3"):
        finetune(params, pairs, 3, model=model, schedule=schedule, rng=jax.random.key(1), per_step_data=True)


def test_finetune_is_differentiable_through_every_step():
    """What PersGuard's retention loss needs: d(loss after fine-tuning)/d(data), through the scanned inner
    Adam steps (second order), equal to a finite-difference estimate. A linear stand-in model keeps it fast."""
    from test_losses import FakeModel, fake_batch, fake_params
    model, params = FakeModel(), fake_params()
    schedule = make_schedule(SchedulerConfig())
    batch = dict(fake_batch(0), is_prior=jnp.array([0, 1, 0, 1]))

    def outer(latents):
        b = dict(batch, latents=latents)
        tuned, _ = finetune(params, b, 4, model=model, schedule=schedule, rng=jax.random.key(0),
                            optimizer=optax.sgd(0.1))
        return dreambooth_loss(tuned, b, jax.random.key(7), model=model, schedule=schedule)[0]

    x = batch["latents"]
    grad = jax.grad(outer)(x)
    direction = jax.random.normal(jax.random.key(3), x.shape)
    eps = 1e-3
    fd = (outer(x + eps * direction) - outer(x - eps * direction)) / (2 * eps)
    assert float(jnp.vdot(grad, direction)) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)
    # and the loss it optimises is the prior-preservation composition of the loss library
    loss, aux = dreambooth_loss(params, batch, jax.random.key(0), model=model, schedule=schedule, prior_weight=0.5)
    assert float(loss) == pytest.approx(float(aux["instance_loss"] + 0.5 * aux["prior_loss"]), rel=1e-6)


def test_finetune_default_optimizer_is_the_personalize_recipe_and_orders_and_remat_pass_through():
    """The default optimizer is ``make_optimizer(OptimizerConfig(learning_rate, total_steps=steps))`` (AdamW with
    clipping, what ``persguard personalize`` runs), not a bare Adam; ``order`` and ``remat`` reach the scan."""
    from test_losses import FakeModel, fake_batch, fake_params
    from persguard_jax.train import OptimizerConfig, make_optimizer
    model, params = FakeModel(), fake_params()
    schedule = make_schedule(SchedulerConfig())
    batch = dict(fake_batch(0), is_prior=jnp.array([0, 1, 0, 1]))

    def tuned(**kw):
        return finetune(params, batch, 3, model=model, schedule=schedule, rng=jax.random.key(0), **kw)

    default, history = tuned(learning_rate=0.1)
    recipe = make_optimizer(OptimizerConfig(learning_rate=0.1, total_steps=3))
    for same in (tuned(optimizer=recipe)[0], tuned(optimizer=OptimizerConfig(learning_rate=0.1, total_steps=3))[0]):
        assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(same)))
    adam, _ = tuned(optimizer=optax.adam(0.1))
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(default["unet"]),
                                                          jax.tree.leaves(adam["unet"]))) > 1e-5
    assert history.shape == (3,)

    def outer(latents, **kw):
        b = dict(batch, latents=latents)
        out, _ = finetune(params, b, 3, model=model, schedule=schedule, rng=jax.random.key(0),
                          optimizer=optax.sgd(0.1), **kw)
        return dreambooth_loss(out, b, jax.random.key(7), model=model, schedule=schedule)[0]

    x = batch["latents"]
    exact, remat, first = (jax.grad(outer)(x, **kw) for kw in ({}, {"remat": True}, {"order": 1}))
    np.testing.assert_allclose(np.asarray(remat), np.asarray(exact), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(first - exact).max()) > 1e-4  # first order drops the path through the inner gradients
