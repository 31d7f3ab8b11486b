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

# one worker builds the module's shared fixture, and the slow tests start first (tests/conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("personalize_run")]

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
            "dreambooth.steps=40", "dreambooth.eval_steps=4", "dreambooth.class_sample_steps=4",
            "dreambooth.class_batch_size=2"]
    assert main(args) == 0
    return dict(root=root, model=model, photos=photos, out=out, args=args)


def fixed_pairs_loss(pipe, photos, prompt: str, params=None, draws: int = 8) -> float:
    """The denoising loss of ``prompt`` on the subject's photos over a fixed set of (noise, timestep) pairs
    (the same for every model compared): a loss curve's single random draws cannot tell a model that learned
    from one that drew an easy timestep."""
    from persguard_jax.data.images import load_folder
    from persguard_jax.sample import encode_text
    from persguard_jax.schedulers import add_noise
    if params is not None:
        pipe = pipe.with_params(params)
    mean, _ = encode_latents(pipe.vae, load_folder(photos, 32))
    x0 = np.repeat(mean * pipe.vae.config.scaling_factor, draws, axis=0)
    rng = np.random.default_rng(123)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.tile(np.linspace(50, 950, draws).astype(np.int32), len(mean))
    schedule = make_schedule(SchedulerConfig.from_dict(pipe.scheduler_config))
    ctx = np.repeat(np.asarray(encode_text(pipe, [prompt])), len(x0), axis=0)
    pred = pipe.unet(add_noise(schedule, x0, noise, t), t, ctx)
    return float(np.mean((np.asarray(pred) - noise) ** 2))


def _weights(folder):
    from safetensors.numpy import load_file
    return {f"{p.parent.name}/{k}": v for p in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(p).items()}


def test_outputs_and_loss_falls(run):
    out = run["out"]
    for name in ("model/model_index.json", "samples.png", "results.json", "config.yaml", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert len(list((out / "class_images").glob("*.png"))) == 4
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 40 and results["trainable"] == "unet+text_encoder"
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 40
    base, tuned = load_pipeline(run["model"]), load_pipeline(out / "model")
    before, after = fixed_pairs_loss(base, run["photos"], PROMPT), fixed_pairs_loss(tuned, run["photos"], PROMPT)
    assert after < 0.6 * before, (before, after)


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


def test_resume_mid_class_images_then_mid_training_ends_where_one_run_does(run, tmp_path, monkeypatch):
    """Killed while sampling class images, and again after the step-20 checkpoint: each ``--resume`` continues
    (class images topped up, not redrawn; training from step 20) and the model equals the uninterrupted run's."""
    from persguard_jax import io
    from persguard_jax.train import loop

    class Killed(BaseException):  # like a kill: nothing in the library catches it
        pass

    def dies_after(n, fn):
        calls = []

        def wrapper(*a, **k):
            if len(calls) == n:
                raise Killed
            calls.append(1)
            return fn(*a, **k)
        return wrapper

    out = tmp_path / "out"
    args = [a if a != str(run["out"]) else str(out) for a in run["args"]]
    monkeypatch.setattr(io, "save_png", dies_after(2, io.save_png))  # 2 of the 4 class images written
    with pytest.raises(Killed):
        main(args)
    def written(folder):  # bytes and modification time: a redrawn image would be byte-equal but rewritten
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.glob("*.png")}

    first_two = written(out / "class_images")
    assert len(first_two) == 2 and not (out / "checkpoints").exists()
    monkeypatch.undo()

    monkeypatch.setattr(loop.shd, "global_batch", dies_after(25, loop.shd.global_batch))  # after checkpoint 20
    with pytest.raises(Killed):
        main(args + ["--resume"])
    monkeypatch.undo()
    assert {k: v for k, v in written(out / "class_images").items() if k in first_two} == first_two
    assert main(args + ["--resume"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from"] == 20 and results["steps"] == 40
    resumed, straight = _weights(out / "model"), _weights(run["out"] / "model")
    assert resumed.keys() == straight.keys()
    worst = max(float(np.abs(resumed[k] - straight[k]).max()) for k in straight)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("mode", ["lora", "frozen_text_encoder"])
def test_lora_and_frozen_text_encoder_personalise_end_to_end(run, tmp_path, mode):
    """The two other trainable splits through the command: the identifier's loss on the subject falls, and only
    what the split trains changes in the exported model."""
    out = tmp_path / mode
    extra = ["lora.rank=4", "optimizer.learning_rate=1e-2"] if mode == "lora" else \
        ["dreambooth.train_text_encoder=false"]
    args = [a if a != str(run["out"]) else str(out) for a in run["args"]]
    args = [a for a in args if not a.startswith("dreambooth.steps=")]
    assert main(args + ["dreambooth.steps=30", f"dreambooth.class_dir={run['out'] / 'class_images'}"] + extra) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["trainable"] == ("lora" if mode == "lora" else "unet")
    base, tuned = load_pipeline(run["model"]), load_pipeline(out / "model")
    before, after = fixed_pairs_loss(base, run["photos"], PROMPT), fixed_pairs_loss(tuned, run["photos"], PROMPT)
    assert after < 0.8 * before, (before, after)
    w0, w1 = _weights(run["model"]), _weights(out / "model")
    moved = {k for k in w0 if not np.array_equal(w0[k], w1[k])}
    assert moved and all(k.startswith("unet/") for k in moved), sorted(moved)[:5]  # text encoder, VAE untouched
    if mode == "lora":  # the adapters fold into the attention projections' kernels, nothing else
        assert all(("attn1" in k or "attn2" in k) and k.endswith(".weight") for k in moved), sorted(moved)[:5]
    else:
        assert any("resnets" in k for k in moved)


def test_a_diverged_run_is_one_line_naming_the_last_good_checkpoint(run, tmp_path, capsys):
    """A learning rate of 1e30 turns the loss non-finite after the first update: the command stops with one line
    (after its progress bars); the step-1 checkpoint, whose parameters gave that loss, is removed, so --resume
    with a sane rate starts again instead of diverging at once."""
    out = tmp_path / "diverged"
    args = [a if a != str(run["out"]) else str(out) for a in run["args"]]
    args = [a for a in args if not a.startswith("dreambooth.steps=")] + [
        "dreambooth.steps=4", "dreambooth.prior_weight=0", "loop.checkpoint_every=1", "loop.log_every=1"]
    capsys.readouterr()
    assert main(args + ["optimizer.learning_rate=1e30"]) == 2
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1].startswith("persguard personalize: error: training diverged: the loss at step 2 is "), lines[-1]
    assert "(removed the step-1 checkpoint: its parameters give this loss); no good checkpoint in " in lines[-1]
    # so a --resume starts again rather than diverging at once (resuming from a good one: tests/test_resume.py)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert (out / "config.yaml").is_file() and not (out / "results.json").exists()


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
    # chunks of 7 (no other test encodes 7 at a time with this VAE graph: the count below starts from scratch)
    images = np.random.default_rng(0).uniform(-1, 1, (9, 32, 32, 3)).astype(np.float32)
    before = data._encode._cache_size()
    mean, logvar = encode_latents(pipe.vae, images, batch=7)  # chunks of 7, 2 (padded to 7)
    again, _ = encode_latents(pipe.vae, images[:7], batch=7)
    assert data._encode._cache_size() - before == 1  # one shape, one graph: compiled once
    assert mean.shape[0] == 9 and logvar.shape == mean.shape
    single, _ = encode_latents(pipe.vae, images[8:9], batch=1)
    np.testing.assert_allclose(mean[8:9], single, atol=1e-5)  # padding does not leak into real rows
    np.testing.assert_allclose(again, mean[:7], atol=1e-6)


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
