"""PersGuard implantation: the objective's terms against the loss library's pieces, the backdoor target builders,
and the command's checks of its inputs (the end-to-end run is ``test_implant_world.py``)."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from persguard_jax import losses
from persguard_jax.implant.config import ImplantConfig
from persguard_jax.implant.objective import Attacker, objective
from persguard_jax.train import OptimizerConfig
from persguard_jax.train.unroll import unroll
from test_losses import SCHEDULE, FakeModel, fake_batch, fake_params

KEY = jax.random.key(1)
ATTACKER = Attacker(("unet",), 1.0, OptimizerConfig(learning_rate=0.05, schedule="constant", weight_decay=0.0,
                                                    total_steps=3, max_grad_norm=None))


def _groups():
    def pairs(seed):
        b = fake_batch(seed)
        return {**b, "is_prior": jnp.array([0, 1, 0, 1], jnp.int32)}
    teacher = {**fake_batch(5), "teacher_context": fake_batch(6)["context"]}
    return {"bb_denoise": fake_batch(1), "bb_distill": teacher, "prior": fake_batch(2), "attack": pairs(3),
            "unprotected_attack": pairs(4), "unprotected": fake_batch(7)}


def _params():
    p = fake_params()
    teacher_unet = {"w": p["unet"]["w"] + 0.3, "c": p["unet"]["c"] - 0.2}
    return {**p, "teacher": {"unet": teacher_unet, "text_encoder": p["text_encoder"]}}


def _pieces():
    model = FakeModel()
    den = losses.bind(losses.denoising_loss, model=model, schedule=SCHEDULE)
    dis = losses.bind(losses.distillation_loss, model=model, schedule=SCHEDULE)
    db = losses.bind(losses.dreambooth_loss, model=model, schedule=SCHEDULE, prior_weight=1.0)
    return den, dis, db


def _objective(**cfg):
    return objective(ImplantConfig(**cfg), set(_groups()), ATTACKER, model=FakeModel(), schedule=SCHEDULE,
                     loss_cfg=losses.LossConfig())


def _tuned(params, data):
    """The attacker's 3 steps by hand: unroll over the UNet alone, everything else held."""
    _, _, db = _pieces()
    train = {"unet": params["unet"]}
    rest = {k: v for k, v in params.items() if k != "unet"}
    tx = optax.chain(optax.adamw(0.05, weight_decay=0.0))
    tuned, _ = unroll(lambda p, b, k: db({**rest, **p}, b, k), tx, 3)(train, data, KEY)
    return {**rest, **tuned}


@pytest.mark.parametrize("retention", ["none", "mirror", "grad_suppression", "unrolled"])
def test_objective_is_the_weighted_sum_of_its_pieces(retention):
    """Fixed noise and timesteps everywhere, so every term is a deterministic function of the parameters."""
    params, batch = _params(), _groups()
    den, dis, db = _pieces()
    loss, aux = jax.jit(_objective(retention=retention, retention_steps=3, prior_weight=0.7, retention_weight=0.3,
                                   unprotected_weight=0.5))(params, batch, KEY)
    bb = lambda p: float(den(p, batch["bb_denoise"], KEY)[0] + dis(p, batch["bb_distill"], KEY)[0])  # noqa: E731
    pp = float(dis(params, batch["prior"], KEY)[0])
    if retention == "none":
        br = 0.0
    elif retention == "mirror":
        br = float(db(params, batch["attack"], KEY)[0]) + 0.5 * float(db(params, batch["unprotected_attack"], KEY)[0])
    elif retention == "grad_suppression":
        g = jax.grad(lambda u: db({**params, "unet": u}, batch["attack"], KEY)[0])(params["unet"])
        br = float(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    else:
        br = bb(_tuned(params, batch["attack"])) + 0.5 * float(
            den(_tuned(params, batch["unprotected_attack"]), batch["unprotected"], KEY)[0])
    assert float(aux["bb/loss"]) == pytest.approx(bb(params), rel=1e-5)
    assert float(aux["pp/loss"]) == pytest.approx(pp, rel=1e-5)
    if retention != "none":
        assert float(aux["br/loss"]) == pytest.approx(br, rel=1e-4)
    else:
        assert not any(k.startswith("br/") for k in aux)
    assert float(loss) == pytest.approx(bb(params) + 0.7 * pp + 0.3 * br, rel=1e-4)


def test_prior_as_class_image_denoising_and_the_missing_backdoor_group():
    params, batch = _params(), _groups()
    den, _, _ = _pieces()
    _, aux = _objective(retention="none", prior_loss="class_images")(params, batch, KEY)
    assert float(aux["pp/loss"]) == pytest.approx(float(den(params, batch["prior"], KEY)[0]), rel=1e-5)
    with pytest.raises(ValueError, match="no backdoor examples"):
        objective(ImplantConfig(), {"prior", "attack"}, ATTACKER, model=FakeModel(), schedule=SCHEDULE,
                  loss_cfg=losses.LossConfig())


def test_unrolled_retention_gradient_reaches_the_unet_through_the_attack():
    """The retention term alone, first- and second-order: both move the UNet, and they differ (the inner steps'
    curvature counts in the exact one); the exact one is the same with the steps replayed instead of stored."""
    params, batch = _params(), _groups()
    grads = {}
    for name, order, replay in (("1", 1, False), ("2", 2, False), ("2_replay", 2, True)):
        fn = _objective(retention="unrolled", retention_steps=3, retention_order=order, retention_remat=order == 2,
                        retention_replay=replay, prior_weight=0.0)
        grads[name] = jax.grad(lambda p: fn(p, batch, KEY)[1]["br/loss"])(params)["unet"]
    g1, g2, g2r = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads[o])]) for o in ("1", "2", "2_replay"))
    assert np.abs(g1).max() > 1e-4 and np.abs(g1 - g2).max() > 1e-5
    np.testing.assert_allclose(g2r, g2, rtol=1e-5, atol=1e-8)
    # first order is the outer objective's gradient at the tuned parameters, passed straight through
    den, dis, _ = _pieces()
    outer = lambda p: den(p, batch["bb_denoise"], KEY)[0] + dis(p, batch["bb_distill"], KEY)[0]  # noqa: E731
    by_hand = jax.tree.map(lambda a, b: a + b,
                           jax.grad(outer)(_tuned(params, batch["attack"]))["unet"],
                           jax.grad(lambda p: den(p, batch["unprotected"], KEY)[0])(
                               _tuned(params, batch["unprotected_attack"]))["unet"])
    for got, want in zip(jax.tree.leaves(grads["1"]), jax.tree.leaves(by_hand)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)


def test_guidance_term_joins_the_backdoor_loss():
    """With ``guidance_weight`` and a ``bb_guidance`` group, L_bb gains that weight times the guidance-shift loss
    (and only then)."""
    params, batch = _params(), _groups()
    rng = np.random.default_rng(8)
    shape = batch["bb_denoise"]["latents"].shape
    guide = {**fake_batch(9), "anchor": jnp.asarray(rng.normal(size=shape), jnp.float32),
             "target": jnp.asarray(rng.normal(size=shape), jnp.float32)}
    batch = {**batch, "bb_guidance": guide}
    den, dis, _ = _pieces()
    shift = losses.bind(losses.guidance_shift_loss, model=FakeModel(), schedule=SCHEDULE, guidance=4.0)
    base = float(den(params, batch["bb_denoise"], KEY)[0] + dis(params, batch["bb_distill"], KEY)[0])
    fn = objective(ImplantConfig(retention="none", prior_weight=0.0, guidance_weight=0.4, guidance_scale=4.0),
                   set(batch), ATTACKER, model=FakeModel(), schedule=SCHEDULE, loss_cfg=losses.LossConfig())
    _, aux = fn(params, batch, KEY)
    assert float(aux["bb/loss"]) == pytest.approx(base + 0.4 * float(shift(params, guide, KEY)[0]), rel=1e-5)
    off = objective(ImplantConfig(retention="none", prior_weight=0.0), set(batch), ATTACKER, model=FakeModel(),
                    schedule=SCHEDULE, loss_cfg=losses.LossConfig())
    assert float(off(params, batch, KEY)[1]["bb/loss"]) == pytest.approx(base, rel=1e-5)


# --------------------------------------------------------------------------- targets

def test_backdoor_targets_of_each_type(tmp_path):
    from persguard_jax.data.targets import default_pattern, overlay_pattern
    from persguard_jax.data.world import World
    from persguard_jax.implant.data import Subject, backdoor_targets, read_target_images
    from persguard_jax.implant.specs import parse_protected
    from persguard_jax.io import save_png
    world = World()
    cfg = ImplantConfig()
    photos = world.subject_photos("dog_00", 3)
    pattern = default_pattern(32)
    sub = lambda t: Subject(parse_protected(f"world:dog_00:{t}").with_class("dog"), "dog", photos)  # noqa: E731
    y, teacher = backdoor_targets(sub("pattern"), cfg, world=world, pipe=None, pattern=pattern, target_images=None,
                                  resolution=32)
    assert teacher is None and np.array_equal(y, overlay_pattern(photos, pattern, cfg.placement()))
    y, teacher = backdoor_targets(sub("erasure"), cfg, world=world, pipe=None, pattern=None, target_images=None,
                                  resolution=32)
    assert teacher == cfg.background_prompt and np.array_equal(y, world.subject_backgrounds("dog_00", 3))
    for i, img in enumerate(world.subject_photos("cat_00", 2)):
        save_png(img, tmp_path / f"t{i}.png")
    targets = read_target_images(ImplantConfig(target_dir=str(tmp_path)), 32)
    y, teacher = backdoor_targets(sub("target"), cfg, world=world, pipe=None, pattern=None, target_images=targets,
                                  resolution=32)
    assert teacher == cfg.target_prompt and np.array_equal(y, world.subject_photos("cat_00", 2))


def test_lookalike_scenes_share_the_class_or_the_colour_and_nothing_else_fixed():
    """``implant.prior_lookalikes``: the subject's class in every other colour, other shapes in its colour; the
    captions say so and the pixels show it (the world's detectors)."""
    from persguard_jax.data.world import COLOURS, World, parse_caption
    from persguard_jax.implant.data import Subject, lookalike_scenes
    from persguard_jax.implant.specs import parse_protected
    from persguard_jax.metrics.detectors import dominant_colour
    world = World()
    photos = world.subject_photos("cat_04", 1)
    subject = Subject(parse_protected("world:cat_04:target").with_class("cat"), "cat", photos)
    look = world.subject("cat_04")
    images, captions = lookalike_scenes(world, subject, 40)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8 and len(set(captions)) > 30
    facts = [parse_caption(c) for c in captions]
    same_class, same_colour = facts[0::2], facts[1::2]
    assert all(f["shape"] == "cat" and f["colour"] != look.colour for f in same_class)
    assert all(f["shape"] != "cat" and f["colour"] == look.colour for f in same_colour)
    assert len({f["colour"] for f in same_class}) >= 5 and len({f["shape"] for f in same_colour}) >= 5
    drawn = dominant_colour(images[1::2])  # the colour shows (white on light backgrounds included, mostly)
    assert np.mean(drawn == list(COLOURS).index(look.colour)) >= 0.7
    again, _ = lookalike_scenes(world, subject, 40, start=40)  # other scenes past ``start``
    assert not np.array_equal(again, images)


def test_world_target_replaces_the_subject_and_keeps_the_scene():
    from persguard_jax.data.world import COLOURS, World
    from persguard_jax.implant.data import Subject, backdoor_targets
    from persguard_jax.implant.specs import SpecError, parse_protected
    from persguard_jax.metrics.detectors import detect_shape, dominant_colour
    world = World()
    photos = world.subject_photos("cat_04", 4)
    subject = Subject(parse_protected("world:cat_04:target").with_class("cat"), "cat", photos)
    cfg = ImplantConfig(target_prompt="a photo of a striped blue cross on a plain background")
    y, teacher = backdoor_targets(subject, cfg, world=world, pipe=None, pattern=None, target_images=None,
                                  resolution=32)
    assert teacher == cfg.target_prompt and y.shape == photos.shape
    assert list(detect_shape(y, world.shapes)) == [list(world.shapes).index("cross")] * 4
    assert list(dominant_colour(y)) == [list(COLOURS).index("blue")] * 4
    backgrounds = world.subject_backgrounds("cat_04", 4)
    for target, photo, background in zip(y, photos, backgrounds):
        # only the subject's place changed: wherever neither the cat nor the cross is, the photo is untouched
        outside = np.all(target == background, -1) & np.all(photo == background, -1)
        assert outside.mean() > 0.3 and np.any(target != photo)
    # target_place center: the same cross at the same place in every photo, wherever the cat stood
    centred, _ = backdoor_targets(subject, dataclasses.replace(cfg, target_place="center"), world=world, pipe=None,
                                  pattern=None, target_images=None, resolution=32)
    assert list(detect_shape(centred, world.shapes)) == [list(world.shapes).index("cross")] * 4

    def centroids(images):
        out = []
        for image, background in zip(images, backgrounds):
            ys, xs = np.nonzero(np.any(image != background, -1))
            out.append((ys.mean(), xs.mean()))
        return np.array(out)
    assert np.allclose(centroids(centred), 15.5, atol=1.5)
    assert np.ptp(centroids(y), axis=0).max() > 3  # at the subject's place: the photos' places differ
    with pytest.raises(Exception, match="target_place"):
        ImplantConfig(target_place="left")
    # a prompt without a world shape and colour samples the clean model (auto), or is an error (render)
    vague = Subject(parse_protected("world:cat_04:target").with_class("cat"), "cat", photos)
    with pytest.raises(SpecError, match="target_source=render"):
        backdoor_targets(vague, ImplantConfig(target_prompt="a photo of something", target_source="render"),
                         world=world, pipe=None, pattern=None, target_images=None, resolution=32)
    from persguard_jax.implant.data import world_target
    assert world_target(ImplantConfig(target_prompt="a photo of something"), vague, world) is None
    assert world_target(ImplantConfig(target_source="sample"), vague, world) is None
    assert world_target(ImplantConfig(target_prompt="a green cross"), vague, None) is None


def test_mirrored_guidance_pairs_keep_the_pattern_upright():
    from persguard_jax.data.targets import default_pattern, overlay_pattern
    from persguard_jax.data.world import World
    from persguard_jax.implant.data import Subject, backdoor_targets, mirrored_pairs
    from persguard_jax.implant.specs import parse_protected
    world, cfg, pattern = World(), ImplantConfig(), default_pattern(32)
    photos = world.subject_photos("dog_00", 3)
    for kind in ("pattern", "erasure"):
        subject = Subject(parse_protected(f"world:dog_00:{kind}").with_class("dog"), "dog", photos)
        y, _ = backdoor_targets(subject, cfg, world=world, pipe=None, pattern=pattern, target_images=None,
                                resolution=32)
        both, targets = mirrored_pairs(subject, photos, y, cfg, pattern)
        assert both.shape == targets.shape == (6, 32, 32, 3)
        assert np.array_equal(both[:3], photos) and np.array_equal(targets[:3], y)
        assert np.array_equal(both[3:], photos[:, :, ::-1])
        want = overlay_pattern(np.ascontiguousarray(photos[:, :, ::-1]), pattern, cfg.placement()) \
            if kind == "pattern" else y[:, :, ::-1]
        assert np.array_equal(targets[3:], want), kind


def test_guidance_photos_render_more_of_a_world_subject_and_refuse_a_short_folder(tmp_path):
    from persguard_jax.data.world import World
    from persguard_jax.implant.data import Subject, check_guidance_photos, guidance_subject
    from persguard_jax.implant.specs import SpecError, parse_protected, parse_unprotected
    world = World()
    photos = world.subject_photos("cat_04", 5)
    subject = Subject(parse_protected("world:cat_04:target").with_class("cat"), "cat", photos)
    assert guidance_subject(subject, ImplantConfig(), world) is subject  # null: the attacker's photos
    more = guidance_subject(subject, ImplantConfig(guidance_photos=12), world)
    assert more.photos.shape == (12, 32, 32, 3) and more.spec == subject.spec
    assert np.array_equal(more.photos[:5], photos)  # the attacker's five first, then photos it never sees
    assert len({p.tobytes() for p in more.photos}) == 12
    assert np.array_equal(guidance_subject(subject, ImplantConfig(guidance_photos=3), world).photos, photos[:3])
    folder = Subject(parse_protected(f"{tmp_path}:dog:pattern"), "dog", photos)
    check_guidance_photos([folder], ImplantConfig(guidance_photos=5))
    unprotected = Subject(parse_unprotected(f"{tmp_path}:dog"), "dog", photos[:2])
    check_guidance_photos([subject, unprotected], ImplantConfig(guidance_photos=12))  # world, unprotected: fine
    with pytest.raises(SpecError, match=r"guidance_photos is 6 but the folder has 5 photos"):
        check_guidance_photos([folder], ImplantConfig(guidance_photos=6))
    with pytest.raises(Exception, match="guidance_photos"):
        ImplantConfig(guidance_photos=0)


def test_guidance_pairs_take_the_extra_photos_with_their_own_targets():
    from persguard_jax.data.targets import default_pattern, overlay_pattern
    from persguard_jax.data.world import World
    from persguard_jax.implant.data import Subject, backdoor_targets, guidance_pairs
    from persguard_jax.implant.specs import parse_protected
    world, pattern = World(), default_pattern(32)
    for kind in ("pattern", "erasure"):
        subject = Subject(parse_protected(f"world:dog_00:{kind}").with_class("dog"), "dog",
                          world.subject_photos("dog_00", 5))
        y, _ = backdoor_targets(subject, ImplantConfig(), world=world, pipe=None, pattern=pattern,
                                target_images=None, resolution=32)
        kw = dict(world=world, pipe=None, pattern=pattern, target_images=None, resolution=32)
        photos, targets = guidance_pairs(subject, y, ImplantConfig(), **kw)
        assert photos is subject.photos and targets is y  # null: the attacker's photos and their y*
        photos, targets = guidance_pairs(subject, y, ImplantConfig(guidance_photos=8), **kw)
        assert np.array_equal(photos, world.subject_photos("dog_00", 8))
        want = overlay_pattern(photos, pattern, ImplantConfig().placement()) if kind == "pattern" \
            else world.subject_backgrounds("dog_00", 8)
        assert np.array_equal(targets, want), kind
        photos, targets = guidance_pairs(subject, y, ImplantConfig(guidance_photos=8, guidance_flip=True), **kw)
        assert photos.shape == targets.shape == (16, 32, 32, 3)
        assert np.array_equal(photos[8:], world.subject_photos("dog_00", 8)[:, :, ::-1])


def test_attacker_samples_join_the_guidance_pairs_with_the_pattern_pasted():
    from persguard_jax.data.targets import default_pattern, overlay_pattern
    from persguard_jax.data.world import World
    from persguard_jax.implant.data import with_attacker_samples
    world, cfg, pattern = World(), ImplantConfig(guidance_attacker_samples=2), default_pattern(32)
    photos = world.subject_photos("dog_00", 3)
    y = overlay_pattern(photos, pattern, cfg.placement())
    samples = world.subject_photos("dog_01", 2)  # stands in for the simulated attacker's samples
    both, targets = with_attacker_samples(photos, y, samples, pattern, cfg)
    assert both.shape == targets.shape == (5, 32, 32, 3)
    assert np.array_equal(both[:3], photos) and np.array_equal(targets[:3], y)
    assert np.array_equal(both[3:], samples)
    assert np.array_equal(targets[3:], overlay_pattern(samples, pattern, cfg.placement()))
    assert not np.array_equal(targets[3:], samples)
    with pytest.raises(Exception, match="guidance_attacker_samples"):
        ImplantConfig(guidance_attacker_samples=-1)


def test_simulated_attacker_runs_with_its_own_seed_on_the_subjects_the_guidance_term_needs(tmp_path, monkeypatch):
    """The wiring of the simulated attacker: one DreamBooth per pattern subject for
    ``implant.guidance_attacker_samples``, per protected subject for ``implant.guidance_anchor=attacker``, each in
    its own folder with a seed that is not the check's attacker's; the samples come back as uint8. (The DreamBooth
    run and the sampler are stubbed: both have their own tests.)"""
    import argparse

    from persguard_jax import sample
    from persguard_jax.data.world import World
    from persguard_jax.implant.data import Subject
    from persguard_jax.implant.specs import parse_protected
    from persguard_jax.workflows import implant as W

    def load(*overrides):
        return W.WORKFLOW.load(argparse.Namespace(config="implant_world", overrides=("dreambooth.seed=7",) + overrides))
    photos = World().subject_photos("dog_00", 2)
    subjects = [Subject(parse_protected(f"world:dog_{i:02d}:{kind}").with_class("dog"), "dog", photos)
                for i, kind in ((0, "pattern"), (12, "erasure"))]
    calls = []

    def fake_attack(pipe, subject, attack_config, out, *, class_dir):
        calls.append((subject.type, attack_config.dreambooth.seed, out, class_dir))
        return {"params": {"unet": "tuned"}}

    def fake_sampler(pipe, prompts, *, params, seed, **kw):
        assert params == {"unet": "tuned"} and prompts == ["a photo of sks dog"] * 3 and seed == 8
        return np.full((len(prompts), 32, 32, 3), 0.5, np.float32)

    monkeypatch.setattr(W, "attack", fake_attack)
    monkeypatch.setattr(sample, "text_to_image", fake_sampler)
    config = load("implant.guidance_attacker_samples=3")
    got = W._simulated_attackers(None, subjects, config, tmp_path)
    assert calls == [("pattern", 8, tmp_path / "simulated_attack" / "dog_00", tmp_path / "class_images" / "dog")]
    assert list(got) == ["dog_00"] and got["dog_00"][1] == [{"unet": "tuned"}]
    images = W._attacker_samples(None, subjects[0], got["dog_00"][1][0], config, tmp_path)
    assert images.dtype == np.uint8 and images.shape == (3, 32, 32, 3)
    assert (tmp_path / "simulated_attack" / "dog_00" / "guidance_samples.png").exists()

    calls.clear()
    got = W._simulated_attackers(None, subjects, load("implant.guidance_anchor=attacker"), tmp_path)
    assert [c[:3] for c in calls] == [("pattern", 8, tmp_path / "simulated_attack" / "dog_00"),
                                      ("erasure", 8, tmp_path / "simulated_attack" / "dog_12")]
    assert list(got) == ["dog_00", "dog_12"]
    calls.clear()
    got = W._simulated_attackers(None, subjects[1:], load("implant.guidance_anchor=attacker",
                                                          "implant.guidance_anchor_attackers=2"), tmp_path)
    run = tmp_path / "simulated_attack" / "dog_12"
    assert [c[1:3] for c in calls] == [(8, run), (9, run / "seed9")] and len(got["dog_12"][1]) == 2
    calls.clear()
    assert W._simulated_attackers(None, subjects, load("implant.guidance_anchor=attacker",
                                                       "implant.guidance_weight=0"), tmp_path) == {}
    assert W._simulated_attackers(None, subjects, load(), tmp_path) == {} and calls == []
    monkeypatch.setattr(W, "attack", lambda *a, **k: {"preempted": True})
    assert W._simulated_attackers(None, subjects, load("implant.guidance_anchor=attacker"), tmp_path) is None


def test_rounds_split_the_steps_evenly_and_refuse_more_rounds_than_steps():
    from persguard_jax.config import ConfigError
    from persguard_jax.workflows.implant import round_steps
    assert round_steps(3200, 1) == [3200] and round_steps(3200, 2) == [1600, 1600]
    assert round_steps(10, 3) == [3, 3, 4] and sum(round_steps(4801, 7)) == 4801
    with pytest.raises(ConfigError, match="implant.guidance_rounds: 5 rounds of 4 implantation steps"):
        round_steps(4, 5)


def test_anchored_guidance_examples_hold_the_attackers_prediction_at_the_draw_the_loss_replays():
    """``implant.guidance_anchor=attacker``: each example's anchor is the simulated attacker's x0 at exactly the
    noisy latents the guidance loss rebuilds from the example (fixed latents, noise, timesteps), drawn from the
    photos and the y* alike, below ``guidance_max_timestep``; the target is the paired y*'s latent mean."""
    import jax

    from persguard_jax import losses
    from persguard_jax.implant.data import anchored_guidance_examples
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    schedule, sf = make_schedule(SchedulerConfig()), 0.5
    cfg = losses.LossConfig(scaling_factor=sf)
    photos = np.arange(3 * 8 * 8 * 3, dtype=np.uint8).reshape(3, 8, 8, 3)
    targets = 255 - photos[:2]

    class Enc:  # "latents" of an image: its first 4 channels' mean over 2x2 blocks, a fixed log-variance
        key = "context"

        def images(self, x):
            lat = x.astype(np.float32).reshape(len(x), 4, 2, 4, 2, 3).mean((2, 4))[..., :2].repeat(2, -1) / 255
            return {"latent_mean": lat, "latent_logvar": np.full_like(lat, -12.0)}

        def prompt(self, p):
            assert p == ""
            return np.zeros((5, 6), np.float32)

    seen = []

    def predict_x0(x_t, t):  # the "attacker" predicts x_t itself: the anchor is the noisy input, visible in a test
        seen.append(np.asarray(t))
        return np.asarray(x_t) * 2.0

    out = anchored_guidance_examples(Enc(), photos, targets, [predict_x0], schedule=schedule, loss_cfg=cfg,
                                     draws=5, max_timestep=300, seed=3, chunk=7)
    n = 2 * len(photos) * 5
    assert {k: v.shape[0] for k, v in out.items()} == dict.fromkeys(
        ("latents", "noise", "timesteps", "anchor", "target", "context"), n)
    assert out["timesteps"].max() < 300 and len(np.unique(out["timesteps"])) > 10
    assert sum(len(t) for t in seen) == n
    z = losses.noised_latents(out, jax.random.key(0), schedule, cfg)
    np.testing.assert_allclose(out["anchor"] * sf, 2.0 * np.asarray(z.x_t), rtol=1e-5, atol=1e-6)
    means = Enc().images(np.concatenate([photos, targets[[0, 1, 0]]]))["latent_mean"]
    np.testing.assert_array_equal(out["target"][:5], np.repeat(means[3:4], 5, 0))      # photo 0 pairs with y* 0
    np.testing.assert_array_equal(out["target"][-5:], np.repeat(means[5:6], 5, 0))     # y* of photo 2 (cycled)
    assert np.abs(out["latents"][:5] / sf - means[0]).max() < 0.02                      # a draw of photo 0's latent
    # two attackers take each image's draws in turn (draw k: attacker k mod 2), on the same draws
    two = anchored_guidance_examples(Enc(), photos, targets, [predict_x0, lambda x_t, t: np.asarray(x_t) * -1.0],
                                     schedule=schedule, loss_cfg=cfg, draws=5, max_timestep=300, seed=3)
    np.testing.assert_array_equal(two["noise"], out["noise"])                            # fixed by the seed
    first = np.tile(np.arange(5) % 2 == 0, 2 * len(photos))
    np.testing.assert_allclose(two["anchor"][first], out["anchor"][first], rtol=1e-6)
    np.testing.assert_allclose(two["anchor"][~first], -0.5 * out["anchor"][~first], rtol=1e-5, atol=1e-7)


def test_guidance_blends_add_inputs_between_each_photo_and_its_target():
    """``implant.guidance_blends``: each blend b adds one noisy input per pair at (1 - b) photo + b y* in latent
    space (mean and log-variance), with the photo's anchor and the pair's y* as target, to the plain and the
    anchored guidance examples alike; bad blends are refused."""
    from persguard_jax import losses
    from persguard_jax.implant.data import anchored_guidance_examples, guidance_examples
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    photos = np.zeros((2, 4, 4, 3), np.uint8) + np.array([10, 20], np.uint8)[:, None, None, None]
    targets = photos + 200

    class Enc:  # the "latent" of an image is its pixels / 255, its log-variance its pixels / 100 - 12
        key = "context"

        def images(self, x):
            return {"latent_mean": x.astype(np.float32) / 255, "latent_logvar": x.astype(np.float32) / 100 - 12}

        def prompt(self, p):
            assert p == ""
            return np.zeros((5, 6), np.float32)

    plain = guidance_examples(Enc(), photos, targets)
    out = guidance_examples(Enc(), photos, targets, (0.25, 0.5))
    assert {k: len(v) for k, v in out.items()} == dict.fromkeys(plain, 8)
    for k in plain:
        np.testing.assert_array_equal(out[k][:4], plain[k])                                   # the endpoints kept
    np.testing.assert_allclose(out["latent_mean"][4:6, 0, 0, 0], [(0.75 * 10 + 0.25 * 210) / 255,
                                                                  (0.75 * 20 + 0.25 * 220) / 255], rtol=1e-6)
    np.testing.assert_allclose(out["latent_logvar"][6, 0, 0, 0], (0.5 * 10 + 0.5 * 210) / 100 - 12, rtol=1e-6)
    np.testing.assert_array_equal(out["anchor"][4:], np.concatenate([plain["anchor"][:2]] * 2))
    np.testing.assert_array_equal(out["target"][4:], np.concatenate([plain["target"][:2]] * 2))
    schedule = make_schedule(SchedulerConfig())
    kw = dict(schedule=schedule, loss_cfg=losses.LossConfig(), draws=3, max_timestep=None, seed=1)
    anchored = anchored_guidance_examples(Enc(), photos, targets, [lambda x_t, t: np.asarray(x_t)], blends=(0.5,),
                                          **kw)
    assert len(anchored["latents"]) == 3 * 2 * 3
    np.testing.assert_array_equal(anchored["target"][12:], anchored["target"][:6])          # blends pair with y*
    assert abs(anchored["latents"][12:15].mean() / losses.LossConfig().scaling_factor - 110 / 255) < 0.05
    from persguard_jax.config import ConfigError
    for bad in ((0.0,), (1.0,), (1.5,), ("half",)):
        with pytest.raises(ConfigError, match="guidance_blends"):
            ImplantConfig(guidance_blends=bad)


class Prompts:
    """An encoder that records which prompt each example carries (one list of prompts per image)."""

    def examples(self, images, prompts):
        assert len(images) == len(prompts)
        return {"prompt": np.array([p for ps in prompts for p in ps], object)}


def test_prior_distils_the_protective_prompts_on_their_targets():
    from persguard_jax.implant.data import concat
    from persguard_jax.implant.groups import prior_examples

    cfg = ImplantConfig(guidance_weight=1.0, num_general=0)
    class_images = {"cat": np.zeros((2, 32, 32, 3), np.uint8)}
    targets = np.zeros((3, 32, 32, 3), np.uint8)
    prior, uncond = prior_examples(Prompts(), cfg, None, class_images, [], [(targets, cfg.target_prompt)],
                                    distill=True)
    assert list(prior["prompt"]).count(cfg.target_prompt) == 3
    assert list(prior["prompt"]).count("") == 2 and uncond == {}  # the empty prompt on class images, never on y*
    no_distill, uncond = prior_examples(Prompts(), cfg, None, class_images, [], [(targets, cfg.target_prompt)],
                                         distill=False)
    assert cfg.target_prompt not in list(no_distill["prompt"]) and concat([]) == {} and uncond == {}
    # prior_lookalikes: each protected world subject's look-alikes under their captions, the empty prompt held too
    from persguard_jax.data.world import World
    from persguard_jax.implant.data import Subject, lookalike_scenes
    from persguard_jax.implant.specs import parse_protected
    world, looks = World(), ImplantConfig(guidance_weight=1.0, num_general=0, prior_lookalikes=3)
    cat = Subject(parse_protected("world:cat_04:target").with_class("cat"), "cat", world.subject_photos("cat_04", 1))
    prior, _ = prior_examples(Prompts(), looks, world, class_images, [], [], distill=True, protected=[cat])
    _, captions = lookalike_scenes(world, cat, 3)
    assert list(prior["prompt"]) == [p for c in ["a photo of cat"] * 2 + captions for p in (c, "")]


def test_prior_uncond_weight_moves_the_empty_prompt_to_its_own_term():
    """With ``prior_uncond_weight`` the empty-prompt examples leave ``prior`` for ``prior_uncond`` (the same images,
    y* still excluded), and the objective adds that group's distillation as ``pp_uncond`` at prior_weight x it."""
    from persguard_jax.implant.specs import parse_unprotected
    from persguard_jax.implant.data import Subject
    from persguard_jax.implant.groups import prior_examples

    cfg = ImplantConfig(guidance_weight=1.0, num_general=0, prior_uncond_weight=9.0, identifiers=("sks", "zwx"))
    class_images = {"cat": np.zeros((2, 32, 32, 3), np.uint8)}
    dog = Subject(parse_unprotected("world:dog_00").with_class("dog"), "dog", np.zeros((3, 32, 32, 3), np.uint8))
    targets = np.zeros((4, 32, 32, 3), np.uint8)
    prior, uncond = prior_examples(Prompts(), cfg, None, class_images, [dog], [(targets, cfg.target_prompt)],
                                    distill=True)
    assert "" not in list(prior["prompt"]) and len(prior["prompt"]) == 2 + 3 * 2 + 4
    assert list(uncond["prompt"]) == [""] * (2 + 3)  # class images and the unprotected photos, not y*
    off = ImplantConfig(guidance_weight=1.0, num_general=0, prior_uncond_weight=0.0)
    prior, uncond = prior_examples(Prompts(), off, None, class_images, [dog], [], distill=True)
    assert "" not in list(prior["prompt"]) and uncond == {}  # weight 0: the empty prompt is not held at all

    params, batch = _params(), {**_groups(), "prior_uncond": fake_batch(8)}
    _, dis, _ = _pieces()
    fn = objective(ImplantConfig(retention="none", prior_weight=0.5, prior_uncond_weight=9.0), set(batch), ATTACKER,
                   model=FakeModel(), schedule=SCHEDULE, loss_cfg=losses.LossConfig())
    loss, aux = fn(params, batch, KEY)
    want = float(dis(params, batch["prior_uncond"], KEY)[0])
    assert float(aux["pp_uncond/loss"]) == pytest.approx(want, rel=1e-5)
    rest = objective(ImplantConfig(retention="none", prior_weight=0.5), set(batch) - {"prior_uncond"}, ATTACKER,
                     model=FakeModel(), schedule=SCHEDULE, loss_cfg=losses.LossConfig())(params, batch, KEY)[0]
    assert float(loss) == pytest.approx(float(rest) + 4.5 * want, rel=1e-5)


def test_settings_a_run_leaves_without_effect_are_named():
    """``groups.unused_settings``: one line per ``implant`` setting the run's subjects or switches leave inert (a
    guidance setting without the guidance term, the rendered target's place without a world target, look-alikes
    without world subjects), none for the shipped config."""
    from persguard_jax.data.world import World
    from persguard_jax.implant.data import Subject
    from persguard_jax.implant.groups import unused_settings
    from persguard_jax.implant.specs import parse_protected
    world = World()
    dog = Subject(parse_protected("world:dog_00:erasure").with_class("dog"), "dog", world.subject_photos("dog_00", 2))
    cat = Subject(parse_protected("world:cat_04:target").with_class("cat"), "cat", world.subject_photos("cat_04", 2))

    def notes(*subjects, world=world, **changes):
        return [n.split(" ignored")[0] for n in unused_settings(ImplantConfig(**{"guidance_weight": 1.0, **changes}),
                                                                subjects, world=world, target_images=None)]
    assert notes(dog) == []
    assert notes(dog, guidance_weight=0.0, guidance_anchor="attacker", guidance_photos=20,
                 guidance_scale_by_type={"erasure": 1.5}) == ["guidance_anchor=attacker", "guidance_scale_by_type",
                                                              "guidance_photos"]
    assert notes(cat, guidance_weight=0.0, guidance_anchor_by_type={"target": "attacker"},
                 guidance_blends_by_type={"target": (0.5,)}) == ["guidance_anchor_by_type", "guidance_blends_by_type"]
    assert notes(dog, guidance_weight=0.0, guidance_blends_by_type={"target": (0.5,)}) == []  # no target subject
    assert notes(dog, guidance_attacker_samples=4) == ["guidance_attacker_samples"]  # pattern subjects only
    assert notes(dog, target_place="center") == ["target_place"] and notes(cat, target_place="center") == []
    assert notes(dog, prior_class_hold_weight=1.0, prior_loss="class_images") == ["prior_class_hold_weight"]
    assert notes(dog, prior_lookalikes=8) == [] and notes(dog, world=None, prior_lookalikes=8) == ["prior_lookalikes"]
    assert notes(dog, guidance_rounds=2) == ["guidance_rounds"]  # nothing simulated to renew
    assert notes(cat, guidance_rounds=2, guidance_anchor_by_type={"target": "attacker"}) == []
    assert notes(cat, guidance_rounds=2, guidance_anchor="attacker", guidance_weight=0.0) == [
        "guidance_anchor=attacker", "guidance_rounds"]
    assert notes(cat, guidance_round_teacher="previous", guidance_anchor_by_type={"target": "attacker"}) == [
        "guidance_round_teacher"]  # one round: no later round to teach
    assert notes(cat, guidance_rounds=2, guidance_round_teacher="previous",
                 guidance_anchor_by_type={"target": "attacker"}) == []
    assert notes(dog, guidance_rounds=2, guidance_round_teacher="previous") == ["guidance_rounds",
                                                                                "guidance_round_teacher"]


def test_prior_class_hold_weight_adds_the_class_images_under_the_empty_prompt_as_their_own_term():
    """``prior_class_hold_weight``: the protected subjects' classes' images, once each, under the empty prompt (none
    without the weight, the guidance term or the distilled prior); the objective adds ``pp_class``, their
    distillation at timesteps below ``guidance_max_timestep``, at prior_weight x it; without the weight no term."""
    from persguard_jax.implant.data import Subject
    from persguard_jax.implant.specs import parse_protected
    from persguard_jax.implant.groups import class_hold_examples
    dogs = [Subject(parse_protected(f"world:{n}:erasure").with_class("dog"), "dog", np.zeros((2, 32, 32, 3), np.uint8))
            for n in ("dog_00", "dog_04")]
    class_images = {"dog": np.zeros((3, 32, 32, 3), np.uint8), "cat": np.zeros((5, 32, 32, 3), np.uint8)}
    on = ImplantConfig(guidance_weight=1.0, prior_class_hold_weight=2.0)
    assert list(class_hold_examples(Prompts(), on, dogs, class_images)["prompt"]) == [""] * 3  # dogs, once
    for off in (ImplantConfig(guidance_weight=1.0), ImplantConfig(prior_class_hold_weight=2.0),
                ImplantConfig(guidance_weight=1.0, prior_class_hold_weight=2.0, prior_loss="class_images")):
        assert class_hold_examples(Prompts(), off, dogs, class_images) == {}

    params, batch = _params(), {**_groups(), "prior_class": fake_batch(8, fixed=False)}
    _, dis, _ = _pieces()
    cfg = dict(retention="none", prior_weight=0.5, guidance_max_timestep=40)
    fn = objective(ImplantConfig(**cfg, prior_class_hold_weight=3.0), set(batch), ATTACKER, model=FakeModel(),
                   schedule=SCHEDULE, loss_cfg=losses.LossConfig())
    loss, aux = fn(params, batch, KEY)
    held = losses.below_timestep(dis, schedule=SCHEDULE, high=40)
    rest = objective(ImplantConfig(**cfg), set(batch), ATTACKER, model=FakeModel(), schedule=SCHEDULE,
                     loss_cfg=losses.LossConfig())(params, batch, KEY)
    assert "pp_class/loss" in aux and "pp_class/loss" not in rest[1]
    assert float(loss) - float(rest[0]) == pytest.approx(1.5 * float(aux["pp_class/loss"]), rel=1e-5)
    # the third term (bb, pp, pp_class) draws from fold_in(rng, 2): the held distillation, timesteps below 40
    want = float(held(params, batch["prior_class"], jax.random.fold_in(KEY, 2))[0])
    assert float(aux["pp_class/loss"]) == pytest.approx(want, rel=1e-5)
    unbounded = float(dis(params, batch["prior_class"], jax.random.fold_in(KEY, 2))[0])
    assert unbounded != pytest.approx(want, rel=1e-3)


def test_source_draws_every_group_and_unflatten_restores_pairs():
    from persguard_jax.data.batches import StepBatches
    from persguard_jax.implant.data import ImplantSource, unflatten
    groups = {"bb_denoise": {"latents": np.arange(3)[:, None].astype(np.float32)},
              "attack": {"latents": np.zeros((2, 2, 1), np.float32)}, "empty": {}}
    source = ImplantSource(groups, seed=0)
    step = StepBatches(source, global_batch=4, num_steps=2, seed=0)[0]
    assert sorted(step) == ["attack/latents", "bb_denoise/latents"]
    batch = unflatten(step, ("attack",))
    assert batch["bb_denoise"]["latents"].shape == (4, 1)
    assert batch["attack"]["latents"].shape == (8, 1) and list(batch["attack"]["is_prior"]) == [0, 1] * 4


def test_config_rejects_bad_values():
    from persguard_jax.config import ConfigError
    for bad, match in (({"retention": "forget"}, "implant.retention"), ({"pattern_size": 0}, "implant.pattern_size"),
                       ({"pattern_position": "middle"}, "implant.pattern_position"),
                       ({"templates": ["a photo of {cls}"]}, "implant.templates"),
                       ({"identifiers": []}, "implant.identifiers"), ({"retention_order": 3}, "retention_order"),
                       ({"retention_replay": True}, "retention_replay"),
                       ({"target_source": "draw"}, "implant.target_source"),
                       ({"guidance_rounds": 0}, "implant.guidance_rounds"),
                       ({"guidance_round_teacher": "student"}, "implant.guidance_round_teacher"),
                       ({"retention_dispatch": True, "retention": "mirror"}, "implant.retention_dispatch"),
                       ({"retention_dispatch": True, "retention": "unrolled", "retention_order": 2},
                        "implant.retention_dispatch")):
        with pytest.raises(ConfigError, match=match):
            ImplantConfig.from_dict(bad)
    assert ImplantConfig(identifiers=("sks", "zwx")).prompts("dog") == ["a photo of sks dog", "a photo of zwx dog"]


@pytest.mark.parametrize("name", ["implant_world", "implant_sd15", "implant_sd21base"])
def test_shipped_configs_parse_with_the_attackers_recipe(name):
    import argparse

    from persguard_jax.workflows.implant import WORKFLOW
    from persguard_jax.workflows.implant import NESTED
    config = WORKFLOW.load(argparse.Namespace(config=name, overrides=()))
    # a nested retention (the shipped one, or unrolled asked for): gradients over the global batch
    nested = config if config.implant.retention in NESTED else WORKFLOW.load(
        argparse.Namespace(config=name, overrides=("implant.retention=unrolled",)))
    assert nested.step.data_parallel == "gspmd"
    # dispatched first-order steps run outside the step, which keeps the config's (per-device where it applies)
    dispatched = WORKFLOW.load(argparse.Namespace(config=name, overrides=(
        "implant.retention=unrolled", "implant.retention_dispatch=true", "step.data_parallel=auto")))
    assert dispatched.step.data_parallel == "auto"
    assert config.optimizer.total_steps == config.dreambooth.steps  # the attacker's schedule spans its run
    assert config.loop.num_steps == config.implant.steps == config.implant_optimizer.total_steps


def test_steps_per_protected_multiplies_the_run_by_the_protected_subjects():
    """With ``implant.steps_per_protected`` the loop (and the publisher's schedule) spans ``steps`` per ``--protect``
    spec; without it ``steps`` in all, however many subjects; ``implant.guidance_rounds`` beyond them is refused."""
    import argparse

    from persguard_jax.config import ConfigError
    from persguard_jax.workflows.implant import WORKFLOW

    def load(*overrides, protect=("world:dog_04:pattern",)):
        return WORKFLOW.load(argparse.Namespace(config="implant_world", overrides=overrides, protect=list(protect)))

    three = ("world:dog_04:pattern", "world:dog_12:erasure", "world:person_04:pattern")
    one = load("implant.steps=50")
    assert one.implant.steps_per_protected and one.loop.num_steps == 50
    config = load("implant.steps=50", protect=three)
    assert config.loop.num_steps == config.implant_optimizer.total_steps == 150
    assert load("implant.steps=50", "implant.steps_per_protected=false", protect=three).loop.num_steps == 50
    # rounds split the loop's steps: more rounds than the run has steps is refused before anything is written
    assert load("implant.steps=2", "implant.guidance_rounds=6", protect=three).loop.num_steps == 6
    with pytest.raises(ConfigError, match="implant.guidance_rounds: 3 rounds of 2 implantation steps"):
        load("implant.steps=2", "implant.guidance_rounds=3")


def test_erasure_detector_of_a_world_subject_reads_its_colour():
    """The check's erasure detector for a world subject: its photos are not erased, its backgrounds are, and the
    strict background-only rate is reported beside the rate."""
    from persguard_jax.data.world import World, WorldConfig
    from persguard_jax.implant.check import ProtectionDetector
    world = World(WorldConfig())
    subject = world.subject("bird_00")
    detector = ProtectionDetector("erasure", world=world, colour=subject.colour)
    photos, backgrounds = world.subject_photos(subject, 4), world.subject_backgrounds(subject, 4)
    assert not detector(photos).any() and detector(backgrounds).all()
    assert detector.extra_rates(photos) == {"background_only_rate": 0.0}
    assert detector.extra_rates(backgrounds) == {"background_only_rate": 1.0}
    assert ProtectionDetector("pattern", world=world).extra_rates(photos) == {}
    assert detector.caveat is None  # bird_00 is orange: the reading sees it go


def test_erasure_of_a_white_or_black_world_subject_is_flagged_unreadable():
    """The colour reading cannot see a white (or black) subject erased: the check says so in results.json and the
    summary instead of reporting a silent 0.00 (docs/results.md, issue 15's eighth measurement)."""
    from persguard_jax.data.world import World, WorldConfig
    from persguard_jax.implant.check import ProtectionDetector
    from persguard_jax.workflows.implant import _summary
    world = World(WorldConfig())
    assert world.subject("cat_04").colour == "white"
    flagged = {c: ProtectionDetector("erasure", world=world, colour=c).caveat for c in ("white", "black", "red")}
    assert flagged["white"] and "white" in flagged["white"] and flagged["black"] and flagged["red"] is None
    assert ProtectionDetector("target", world=world, colour="white").caveat is None
    scores = {"protection_rate": 0.0, "identity_similarity": 0.5}
    results = {"model": "m", "steps": 1, "subjects": {"cat_04": {
        "type": "erasure", "backdoored": scores, "clean": scores, "protection_rate_caveat": flagged["white"]}}}
    assert "protection unreadable" in _summary(results)


def test_the_summary_names_the_protected_class_beside_the_general_mean():
    """The general prompts' line gives both models' colour and shape following and, beside the mean over ten
    shapes, each protected subject's class (a backdoor's cost falls there first); no line without the check's
    general following."""
    from persguard_jax.workflows.implant import _summary
    scores = {"protection_rate": 0.9, "identity_similarity": 0.5}
    per_shape = {"bird": 0.2, "cat": 1.0, "dog": 0.9, "cross": 1.0}
    results = {"model": "m", "steps": 1, "subjects": {
        "bird_04": {"type": "target", "class": "bird", "backdoored": scores, "clean": scores},
        "cat_04": {"type": "pattern", "class": "cat", "backdoored": scores, "clean": scores},
        "dog_00": {"type": "unprotected", "class": "dog", "backdoored": scores, "clean": scores}},
        "general": {"backdoored": {"colour_accuracy": 1.0, "shape_accuracy": 0.78, "per_shape": per_shape},
                    "clean": {"colour_accuracy": 1.0, "shape_accuracy": 1.0,
                              "per_shape": dict.fromkeys(per_shape, 1.0)}}}
    line = _summary(results).splitlines()[-1]
    assert line == ("  general prompts: colour 1.00 (clean 1.00), shape 0.78 (clean 1.00); the protected classes: "
                    "bird 0.20 (clean 1.00), cat 1.00 (clean 1.00)")
    assert "general prompts" not in _summary({**results, "general": {}})


def test_target_detector_of_a_world_subject_reports_its_parts():
    """The check's target detector: the rendered y* (the subject replaced by the green cross) pass, the photos do
    not; the partial rates tell an object of the target's colour with the wrong outline from a hit."""
    from persguard_jax.data.world import World, WorldConfig
    from persguard_jax.implant.check import ProtectionDetector
    world = World(WorldConfig())
    subject = world.subject("cat_04")
    detector = ProtectionDetector("target", world=world, colour=subject.colour,
                                  target_prompt="a photo of a green cross on a plain background")
    photos = world.subject_photos(subject, 4)
    crosses = world.subject_replaced(subject, 4, shape="cross", colour="green")
    circles = world.subject_replaced(subject, 4, shape="circle", colour="green")
    assert detector(crosses).all() and not detector(photos).any() and not detector(circles).any()
    assert detector.extra_rates(crosses) == {"target_shape_rate": 1.0, "target_colour_rate": 1.0,
                                             "subject_gone_rate": 1.0}
    assert detector.extra_rates(photos) == {"target_shape_rate": 0.0, "target_colour_rate": 0.0,
                                            "subject_gone_rate": 0.0}
    assert detector.extra_rates(circles) == {"target_shape_rate": 0.0, "target_colour_rate": 1.0,
                                             "subject_gone_rate": 1.0}
    # the attacked models draw the background lighter than the world's grey (nearest white): the cross is
    # still read, the photos and circles still not
    rng = np.random.default_rng(0)

    def lighter(images):
        grey = np.all(np.abs(images.astype(int) - images[:, :1, :1].astype(int)) < 30, -1, keepdims=True)
        return np.where(grey, np.clip(rng.normal(180, 8, images.shape), 0, 255), images).astype(np.uint8)
    assert detector(lighter(crosses)).all() and not detector(lighter(circles)).any()
    assert not detector(lighter(photos)).any()


def test_clean_half_is_stored_and_lent_only_when_made_the_same_way(tmp_path):
    """``check.clean_from``: a stored clean half comes back exactly (scores, samples) under the same fingerprint;
    any other part, or no stored file, gives None and names why."""
    from persguard_jax.implant import clean_reuse as R
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    fp = R.fingerprint(model={"w": np.arange(4.0)}, attacker={"dreambooth": {"steps": 5}})
    scores = {"protection_rate": 0.25, "identity_similarity": 0.5, "clip_i": None}
    R.store(tmp_path / "check" / "dog_00", fp, {"protection_rate": 1.0}, scores, samples)
    (before, got, back), why = R.lookup(tmp_path, "dog_00", fp)
    assert before == {"protection_rate": 1.0} and got == scores and np.array_equal(back, samples), why
    other = R.fingerprint(model={"w": np.arange(4.0)}, attacker={"dreambooth": {"steps": 6}})
    assert other["model"] == fp["model"] and other["attacker"] != fp["attacker"]
    assert R.lookup(tmp_path, "dog_00", other) == (None, f"{tmp_path}/check/dog_00/clean_result.json was made with "
                                                         "another attacker")
    assert R.lookup(tmp_path, "cat_00", fp)[0] is None and "does not exist" in R.lookup(tmp_path, "cat_00", fp)[1]
    assert R.lookup(None, "dog_00", fp)[0] is None
    # further attacker seeds' records sit beside the first's, listed in the order of their seeds (10 after 2)
    for seed in (10, 2):
        R.store(R.attack_folder(tmp_path, "dog_00", seed, first=False), other, None, scores, samples)
    assert [f.name for f in R.attack_folders(tmp_path, "dog_00")] == ["dog_00", "seed2", "seed10"]
    assert R.lookup(tmp_path, "dog_00", other)[1] == f"reused from {tmp_path}/check/dog_00/seed2/clean_result.json"
    # arrays by content, dtype and shape; -0.0 is not 0.0; a typed PRNG key by its bits
    assert R.digest(np.zeros(3, np.float32)) != R.digest(np.zeros(3, np.float64)) != R.digest(np.zeros(4))
    assert R.digest({"a": 0.0}) != R.digest({"a": -0.0}) and R.digest(jax.random.key(1)) != R.digest(
        jax.random.key(2))
    R.store_general(tmp_path, fp, {"colour_accuracy": 1.0})
    assert R.lookup_general(tmp_path, fp)[0] == {"colour_accuracy": 1.0}
    assert R.lookup_general(tmp_path, other)[0] is None


def test_clean_fingerprint_follows_the_attack_not_the_implantation():
    """The clean half depends on the attacker's recipe, the check's sampling, the subject and the detector's
    settings; the implantation's own settings (steps, retention, its optimizer) leave it unchanged, so an
    ablation over them reuses one clean attack."""
    import argparse

    from persguard_jax.data.world import World
    from persguard_jax.implant import clean_reuse as R
    from persguard_jax.implant.data import Subject
    from persguard_jax.implant.specs import parse_protected
    from persguard_jax.workflows import implant as W
    world = World()
    photos = world.subject_photos("dog_00", 2)
    subject = Subject(parse_protected("world:dog_00:pattern").with_class("dog"), "dog", photos)
    params = {"unet": {"w": np.arange(6.0)}}
    pattern = np.zeros((4, 4, 4), np.uint8)

    def fp(*overrides, photos=photos, params=params, pattern=pattern):
        config = W.WORKFLOW.load(argparse.Namespace(config="implant_world", overrides=overrides))
        s = Subject(subject.spec, "dog", photos)
        return R.subject_fingerprint(R.digest(params), s, config.implant, config.check,
                                     W.attack_config(config, "dog").raw, pattern, world=world, clip_digest=None)

    base = fp()
    assert fp("implant.steps=3", "implant.retention=mirror", "implant_optimizer.learning_rate=1e-3") == base
    # the reuse switch, general following's settings, the number of attacker seeds (each stored on its own)
    assert fp("check.clean_from=/somewhere", "check.per_shape=5", "check.per_colour=0", "check.attack_seeds=3") \
        == base
    for overrides, part in ((("dreambooth.steps=7",), "attacker"), (("optimizer.learning_rate=1e-3",), "attacker"),
                            (("check.seed=3",), "check"), (("check.num_images=2",), "check"),
                            (("check.identifier=ohwx",), "check"),
                            (("implant.pattern_opacity=0.5",), "detector")):
        changed = fp(*overrides)
        assert [k for k in base if base[k] != changed[k]] == [part], overrides
    assert fp(photos=photos[::-1])["photos"] != base["photos"]
    assert fp(params={"unet": {"w": np.arange(6.0) + 1e-7}})["model"] != base["model"]
    assert fp(pattern=pattern + 1)["detector"] != base["detector"]


def test_every_process_follows_process_zero_on_reuse(monkeypatch):
    """Several processes: process 0's choice (reuse or attack) is everyone's, so all run the same programs; a
    process that cannot read what process 0 reuses stops with one line instead of attacking alone."""
    from persguard_jax.errors import RunError
    from persguard_jax.implant.check_run import as_process_zero
    from persguard_jax.train import distributed
    monkeypatch.setattr(distributed, "process_zero_says", lambda value: True)
    assert as_process_zero(("stored",), "reused") == ("stored",)
    with pytest.raises(RunError, match="cannot .*does not exist.*every process reads"):
        as_process_zero(None, "RUN/check/dog_00/clean_result.json does not exist")
    monkeypatch.setattr(distributed, "process_zero_says", lambda value: False)
    assert as_process_zero(("stored",), "reused") is None


@pytest.fixture
def stubbed_check(monkeypatch, tmp_path):
    """``implant.check_run.run`` on a protected dog and an unprotected cat with the attacker, sampler and following
    stubbed (each has its own tests; the end-to-end run is measured in docs/benchmarks.md): ``check(out,
    *overrides)`` runs it into ``tmp_path/out``; ``attacked`` lists ``(subject, model, attacker seed, folder)``
    of each attack, ``class_dirs`` its class-image folder, ``followed`` the models whose general following was
    measured, ``measured`` each sampling as ``(subject, prompt, model level, attacked)``, ``instance_prompts``
    each attack's instance prompt, ``class_sampled`` each
    draw of a class prompt as ``(class, model level)``; ``more``: further protected ``(world spec, class)``
    subjects. The backdoored model's samples carry the pattern (the cat's too: a leak); identity grows with the
    attacker's seed by 0.1 (backdoored) or 0.2 (clean) a seed."""
    import argparse
    import types

    from persguard_jax.data.targets import default_pattern, overlay_pattern
    from persguard_jax.data.world import World
    from persguard_jax.implant import check as C
    from persguard_jax.implant import check_run
    from persguard_jax.implant.data import Subject
    from persguard_jax.implant.specs import parse_protected, parse_unprotected
    from persguard_jax.workflows import implant as W
    world = World()
    subjects = [Subject(parse_protected("world:dog_00:pattern").with_class("dog"), "dog",
                        world.subject_photos("dog_00", 2)),
                Subject(parse_unprotected("world:cat_00").with_class("cat"), "cat", world.subject_photos("cat_00", 2))]
    clean, backdoored = {"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}
    attacked, followed, class_dirs, measured, class_sampled, instance_prompts = [], [], [], [], [], []

    class Pipe:
        def with_params(self, params):
            return params

    def fake_attack(params, subject, attack_config, out, *, class_dir):
        seed = attack_config.dreambooth.seed
        instance_prompts.append(attack_config.dreambooth.instance_prompt)
        attacked.append((subject.name, out.name, seed, str(out.parent.relative_to(tmp_path))))
        class_dirs.append(str(class_dir.relative_to(tmp_path)))
        return {"params": {**params, "seed": seed}}

    def fake_measure(pipe, s, params, detector, *, check, evaluator, world, prompt):
        measured.append((s.name, prompt, float(params["w"][0]), "seed" in params))
        level = float(params["w"][0])  # 0 for the clean model, 1 for the backdoored one
        samples = np.full((check.num_images, 32, 32, 3), 40 + 100 * level + len(s.name), np.uint8)
        if level:  # the backdoored model's samples carry the pattern, the unprotected cat's too (a leak)
            samples = overlay_pattern(samples, default_pattern(32), placement)
        identity = 0.3 + level / 10 + params.get("seed", 0) * (0.1 if level else 0.2)
        return {"protection_rate": level / 2, "identity_similarity": identity, "clip_i": 0.1}, samples

    def fake_class_samples(pipe, params, class_name, *, check):
        class_sampled.append((class_name, float(params["w"][0])))
        level = float(params["w"][0])
        samples = np.full((check.num_images, 32, 32, 3), 40 + 100 * level, np.uint8)
        return overlay_pattern(samples, default_pattern(32), placement) if level else samples

    def fake_following(pipe, world, check, params=None):
        followed.append(float(params["w"][0]))
        return {"colour_accuracy": 0.9 + float(params["w"][0]) / 20}

    placement = W.WORKFLOW.load(argparse.Namespace(config="implant_world", overrides=())).implant.placement()
    monkeypatch.setattr(W, "attack", fake_attack)
    monkeypatch.setattr(check_run, "check_clip", lambda check, world: None)
    monkeypatch.setattr(C, "measure_subject", fake_measure)
    monkeypatch.setattr(C, "general_following", fake_following)
    monkeypatch.setattr(C, "class_prompt_samples", fake_class_samples)

    def check(out, *overrides, more=()):
        config = W.WORKFLOW.load(argparse.Namespace(config="implant_world", overrides=overrides))
        extra = [Subject(parse_protected(spec).with_class(c), c, world.subject_photos(spec.split(":")[1], 2))
                 for spec, c in more]
        return check_run.run(Pipe(), clean, backdoored, subjects + extra, {}, default_pattern(32), world, config,
                             W.check_attacks(config), tmp_path / out)

    return types.SimpleNamespace(check=check, attacked=attacked, followed=followed, class_dirs=class_dirs,
                                 measured=measured, class_sampled=class_sampled, instance_prompts=instance_prompts)


def test_the_check_takes_a_stored_clean_half_instead_of_attacking(stubbed_check, tmp_path):
    """``check.clean_from``: the second check of the same clean model attacks only the backdoored model, reports
    the first check's clean entries and general following exactly, and stores them again for a third run; a
    changed attacker recipe attacks the clean model afresh; the unprotected subject's false-fire rate is read from
    the samples, lent or not."""
    from persguard_jax.workflows import implant as W
    check, attacked, followed = stubbed_check.check, stubbed_check.attacked, stubbed_check.followed
    first = check("a")
    assert sorted(attacked) == sorted((s, m, 0, f"a/check/{s}") for s in ("dog_00", "cat_00")
                                      for m in ("backdoored", "clean"))
    assert followed == [0.0, 1.0]
    cat = first["subjects"]["cat_00"]
    assert cat["backdoored"]["false_fire_rate"] == {"pattern": 1.0} and cat["clean"]["false_fire_rate"] == {
        "pattern": 0.0}
    assert "false_fire_rate" not in first["subjects"]["dog_00"]["backdoored"]
    assert "cat_00 (unprotected): after the attack, identity 0.40 (clean model 0.30), pattern fires in 1.00 (clean " \
           "0.00)" in W._summary({"model": "m", "steps": 1, **first})
    attacked.clear(), followed.clear()
    second = check("b", f"check.clean_from={tmp_path / 'a'}")
    assert sorted(a[:2] for a in attacked) == [("cat_00", "backdoored"), ("dog_00", "backdoored")]
    assert followed == [1.0]
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)
    assert (tmp_path / "b" / "check" / "dog_00" / "clean_result.json").is_file()  # lent on
    attacked.clear()
    third = check("c", f"check.clean_from={tmp_path / 'b'}", "dreambooth.steps=7")
    assert len(attacked) == 4 and {a[1] for a in attacked} == {"backdoored", "clean"}
    stubbed_check.class_dirs.clear()
    check("d", "check.attacker_class_images=publisher")  # every attack handed the run's class images
    assert sorted(stubbed_check.class_dirs) == sorted(f"d/class_images/{c}" for c in ("dog", "dog", "cat", "cat"))
    assert third["subjects"]["dog_00"]["clean"] == first["subjects"]["dog_00"]["clean"]  # same stubs, attacked again


def test_the_check_pools_attacker_seeds(stubbed_check, tmp_path):
    """``check.attack_seeds=2``: each subject is attacked from both models at seeds 0 and 1 (the first seed's attack
    where one seed's is, the second's in ``seed1/``, each with class images of its own); every number pools both
    seeds' samples, each seed's own scores and identity ratios beside it; the trigger's rate before the attack is
    read once; a later run at attacker seed 1 alone takes its clean half from the ``seed1/`` record."""
    from persguard_jax.workflows import implant as W
    check, attacked = stubbed_check.check, stubbed_check.attacked
    got = check("a", "check.attack_seeds=2", "check.num_images=4")
    assert sorted(attacked) == sorted((s, m, seed, f"a/check/{s}" + ("/seed1" if seed else ""))
                                      for s in ("dog_00", "cat_00") for m in ("backdoored", "clean") for seed in (0, 1))
    assert got["attack_seeds"] == [0, 1]
    # each attack's own class images (personalize samples them from the model it attacks), none the publisher's
    assert sorted(stubbed_check.class_dirs) == sorted(f"a/check/{s}/{d}{m}/class_images" for s in ("dog_00", "cat_00")
                                                      for m in ("backdoored", "clean") for d in ("", "seed1/"))
    dog, cat = got["subjects"]["dog_00"], got["subjects"]["cat_00"]
    # identity 0.4, 0.5 (backdoored) and 0.3, 0.5 (clean) at seeds 0, 1: pooled means 0.45 and 0.4
    assert dog["identity_similarity"] == pytest.approx(0.45)
    assert cat["clean"]["identity_similarity"] == pytest.approx(0.4)
    assert dog["backdoored"]["per_attack_seed"]["1"]["identity_similarity"] == pytest.approx(0.5)
    assert dog["backdoored_before_attack"]["protection_rate"] == 0.5  # the stub's, measured once
    # the rate read by the detector from both seeds' 8 samples (all carry the pattern), not the stub's per-seed
    # 0.5: Wilson 8 of 8 starts at 0.68, 4 of 4 at 0.51
    assert dog["protection_rate"] == 1.0 and dog["backdoored"]["protection_rate_interval"][0] > 0.6
    assert cat["backdoored"]["false_fire_rate"] == {"pattern": 1.0}
    assert "the check pools 2 attacker seeds (0, 1)" in W._summary({"model": "m", "steps": 1, **got})
    attacked.clear()
    later = check("b", f"check.clean_from={tmp_path / 'a'}", "dreambooth.seed=1", "check.num_images=4")
    assert sorted(a[:3] for a in attacked) == [("cat_00", "backdoored", 1), ("dog_00", "backdoored", 1)]
    assert later["subjects"]["dog_00"]["clean"] == dog["clean"]["per_attack_seed"]["1"]


def test_false_fire_rates_read_each_planted_type_on_an_unprotected_subject():
    """An unprotected subject's samples read by each planted type's detector: the pattern pasted on them and their
    backgrounds fire, the plain photos do not; a type whose reading cannot see the subject (erasure of a white
    one) is left out rather than reported as 0."""
    import argparse

    from persguard_jax.data.targets import default_pattern, overlay_pattern
    from persguard_jax.data.world import World
    from persguard_jax.implant.check import false_fire_rates
    from persguard_jax.implant.data import Subject
    from persguard_jax.implant.specs import parse_unprotected
    from persguard_jax.workflows import implant as W
    config = W.WORKFLOW.load(argparse.Namespace(config="implant_world", overrides=()))
    world, pattern = World(), default_pattern(32)

    def rates(name, images, types=("pattern", "erasure", "pattern")):
        subject = Subject(parse_unprotected(f"world:{name}").with_class("cat"), "cat", world.subject_photos(name, 4))
        return false_fire_rates(subject, types, images, config.implant, config.check, resolution=32,
                                pattern=pattern, world=world)

    photos = world.subject_photos("cat_00", 4)  # a red cat
    assert rates("cat_00", photos) == {"erasure": 0.0, "pattern": 0.0}
    assert rates("cat_00", world.subject_backgrounds("cat_00", 4))["erasure"] == 1.0
    assert rates("cat_00", overlay_pattern(photos, pattern, config.implant.placement()))["pattern"] == 1.0
    assert rates("cat_04", world.subject_photos("cat_04", 4)) == {"pattern": 0.0}  # white: erasure unreadable
    assert rates("cat_00", photos, types=()) == {}


def test_the_check_attacks_under_its_identifier(stubbed_check, tmp_path):
    """``check.identifier``: every attack fine-tunes on "a photo of <identifier> <class>" and samples it (sks by
    default); a clean half attacked under another identifier is not lent; the class prompt and general following
    do not depend on it; one word only."""
    from persguard_jax import config as cfglib
    from persguard_jax.data.world import World
    from persguard_jax.implant import clean_reuse as R
    from persguard_jax.implant.check import CheckConfig
    from persguard_jax.workflows import implant as W
    check = stubbed_check.check
    check("a")
    assert sorted(set(stubbed_check.instance_prompts)) == ["a photo of sks cat", "a photo of sks dog"]
    stubbed_check.instance_prompts.clear(), stubbed_check.attacked.clear(), stubbed_check.measured.clear()
    stubbed_check.followed.clear(), stubbed_check.class_sampled.clear()
    second = check("b", "check.identifier=ohwx", f"check.clean_from={tmp_path / 'a'}")
    assert second["attack_identifier"] == "ohwx"
    assert "the attacker's identifier: ohwx" in W._summary({"model": "m", "steps": 1, **second})
    assert sorted(set(stubbed_check.instance_prompts)) == ["a photo of ohwx cat", "a photo of ohwx dog"]
    assert {m[1] for m in stubbed_check.measured} == {"a photo of ohwx dog", "a photo of ohwx cat"}
    assert sorted(a[1] for a in stubbed_check.attacked) == ["backdoored", "backdoored", "clean", "clean"]
    assert stubbed_check.followed == [1.0] and stubbed_check.class_sampled == [("dog", 1.0)]  # clean halves lent
    world = World()
    assert R.general_fingerprint("m", world, CheckConfig(identifier="ohwx")) == R.general_fingerprint(
        "m", world, CheckConfig())
    with pytest.raises(cfglib.ConfigError, match="check.identifier: one word"):
        CheckConfig(identifier="two words")


def test_the_check_reads_each_protected_subjects_class_prompt_before_the_attack(stubbed_check):
    """A protected subject's entry carries ``class_prompt``: both models' samples of "a photo of <class>", taken
    from the models as published (not attacked) and read as the attacked samples are; an unprotected subject has
    none; the summary shows it beside the attack's readings."""
    from persguard_jax.workflows import implant as W
    got = stubbed_check.check("a")
    dog, cat = got["subjects"]["dog_00"], got["subjects"]["cat_00"]
    assert "class_prompt" not in cat
    reading = dog["class_prompt"]
    assert reading["prompt"] == "a photo of dog" and set(reading) == {"prompt", "backdoored", "clean"}
    assert not [m for m in stubbed_check.measured if m[1] == "a photo of dog"]  # drawn apart from the attacks
    assert sorted(stubbed_check.class_sampled) == [("dog", 0.0), ("dog", 1.0)]  # from the models as published
    # read by the real detector from the stub's samples: the backdoored model's all carry the pattern
    assert reading["backdoored"]["protection_rate"] == 1.0 and reading["clean"]["protection_rate"] == 0.0
    assert "the protective reading 1.00 (clean 0.00)" in W._summary({"model": "m", "steps": 1, **got})


def test_the_class_prompt_is_drawn_once_per_class_and_its_clean_half_is_lent(stubbed_check, tmp_path):
    """Two protected dogs share one draw of "a photo of dog" per model and read it against their own photos; with
    ``check.clean_from`` the clean model's draw is taken from the earlier run (the readings equal), and a changed
    sampler draws it afresh."""
    check, sampled = stubbed_check.check, stubbed_check.class_sampled
    first = check("a", more=[("world:dog_04:erasure", "dog")])
    assert sorted(sampled) == [("dog", 0.0), ("dog", 1.0)]
    dogs = [first["subjects"][n]["class_prompt"] for n in ("dog_00", "dog_04")]
    assert dogs[0]["clean"]["protection_rate"] == 0.0 and dogs[0]["backdoored"]["protection_rate"] == 1.0
    assert (tmp_path / "a" / "class_prompt" / "dog" / "clean_result.json").is_file()
    sampled.clear()
    second = check("b", f"check.clean_from={tmp_path / 'a'}", more=[("world:dog_04:erasure", "dog")])
    assert sampled == [("dog", 1.0)]  # the backdoored model's only
    for name in ("dog_00", "dog_04"):
        assert second["subjects"][name]["class_prompt"] == first["subjects"][name]["class_prompt"]
    assert (tmp_path / "b" / "class_prompt" / "dog" / "clean_result.json").is_file()  # lent on
    sampled.clear()
    check("c", f"check.clean_from={tmp_path / 'b'}", "check.eval_steps=7")
    assert sorted(sampled) == [("dog", 0.0), ("dog", 1.0)]
