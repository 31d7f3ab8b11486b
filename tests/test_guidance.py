"""``guidance_shift_target`` / ``guidance_shift_loss``: the unconditional branch that makes guided sampling draw a
target where the conditional branch draws an anchor; the algebra in every prediction space, and the loss by hand on
the linear stand-in UNet of test_losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax import losses, schedulers
from persguard_jax.losses import LossConfig
from test_losses import AC, SCHEDULE, T_COEF, FakeModel, fake_batch, fake_params

KEY = jax.random.key(0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("guidance", [2.0, 4.0, 7.5])
def test_guided_output_lands_on_the_target(prediction_type, guidance):
    rng = np.random.default_rng(1)
    anchor, target, x_t = (jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32) for _ in range(3))
    t = jnp.array([10, 400, 900])
    # the conditional branch: the exact denoiser of the anchor at x_t
    a = AC[np.asarray(t)][:, None, None, None]
    out_c = schedulers.training_target(SCHEDULE, anchor, (x_t - np.sqrt(a) * anchor) / np.sqrt(1 - a), t,
                                       prediction_type)
    out_u = losses.guidance_shift_target(SCHEDULE, x_t, t, anchor, target, guidance, prediction_type)
    guided = out_u + guidance * (out_c - out_u)
    x0, _ = schedulers.predict_x0_eps(SCHEDULE, guided, x_t, t, prediction_type)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(target), atol=2e-3)
    # and without guidance the unconditional branch alone draws the anchor pushed away from the target
    x0_u, _ = schedulers.predict_x0_eps(SCHEDULE, out_u, x_t, t, prediction_type)
    np.testing.assert_allclose(np.asarray(x0_u), np.asarray(anchor - (target - anchor) / (guidance - 1)),
                               atol=2e-3)


def test_loss_matches_hand_computation():
    params, batch = fake_params(), fake_batch()
    rng = np.random.default_rng(2)
    anchor, target = (rng.normal(size=batch["latents"].shape).astype(np.float32) for _ in range(2))
    batch = {**batch, "anchor": jnp.asarray(anchor), "target": jnp.asarray(target)}
    sf, w = 0.5, 4.0
    loss, aux = losses.guidance_shift_loss(params, batch, KEY, model=FakeModel(), schedule=SCHEDULE,
                                           cfg=LossConfig(scaling_factor=sf), guidance=w)
    t = np.asarray(batch["timesteps"])
    a = AC[t][:, None, None, None]
    x0, noise = (np.asarray(batch[k], np.float64) for k in ("latents", "noise"))
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    x0_u = sf * anchor - (sf * target - sf * anchor) / (w - 1)
    want = (x_t - np.sqrt(a) * x0_u) / np.sqrt(1 - a)
    unet = params["unet"]
    ctx = np.asarray(batch["context"], np.float64).mean(axis=(1, 2))[:, None, None, None]
    pred = x_t * np.asarray(unet["w"]) + float(unet["c"]) * ctx + T_COEF * t[:, None, None, None]
    snr = AC[t] / (1 - AC[t])
    per = ((pred - want) ** 2).reshape(len(t), -1).mean(1) * np.minimum(1.0 / snr, 1.0)
    np.testing.assert_allclose(np.asarray(aux["per_example"]), per, rtol=1e-4)
    np.testing.assert_allclose(float(loss), per.mean(), rtol=1e-4)


def test_rejects_guidance_that_cancels_the_branch():
    with pytest.raises(ValueError, match="guidance must be > 1"):
        losses.guidance_shift_target(SCHEDULE, jnp.zeros((1, 2, 2, 1)), jnp.array([5]), jnp.zeros((1, 2, 2, 1)),
                                     jnp.zeros((1, 2, 2, 1)), 1.0, "epsilon")


def test_max_timestep_limits_the_drawn_timesteps():
    params, batch = fake_params(), fake_batch(fixed=False)
    rng = np.random.default_rng(3)
    shape = batch["latents"].shape
    batch = {**batch, "noise": jnp.asarray(rng.normal(size=shape), jnp.float32),
             "anchor": jnp.asarray(rng.normal(size=shape), jnp.float32),
             "target": jnp.asarray(rng.normal(size=shape), jnp.float32)}
    fn = losses.bind(losses.guidance_shift_loss, model=FakeModel(), schedule=SCHEDULE, guidance=3.0)
    at_zero, _ = fn(params, {**batch, "timesteps": jnp.zeros(shape[0], jnp.int32)}, KEY)
    limited, _ = fn(params, batch, KEY, max_timestep=1)
    drawn, _ = fn(params, batch, KEY)
    assert float(limited) == pytest.approx(float(at_zero), rel=1e-6)
    assert float(drawn) != pytest.approx(float(at_zero), rel=1e-3)


def test_per_example_guidance_sizes_each_example_for_its_own_scale():
    """``batch["guidance"]`` (``implant.guidance_scale_by_type``): each example's shift is the one the scalar
    scale of that example gives, whatever the loss was bound with."""
    params, batch = fake_params(), fake_batch()
    rng = np.random.default_rng(4)
    anchor, target = (jnp.asarray(rng.normal(size=batch["latents"].shape), jnp.float32) for _ in range(2))
    batch = {**batch, "anchor": anchor, "target": target}
    n = anchor.shape[0]
    scales = np.where(np.arange(n) % 2 == 0, 1.25, 4.0).astype(np.float32)
    fn = losses.bind(losses.guidance_shift_loss, model=FakeModel(), schedule=SCHEDULE, guidance=7.5)
    _, mixed = fn(params, {**batch, "guidance": jnp.asarray(scales)}, KEY)
    for w in (1.25, 4.0):
        _, alone = fn(params, batch, KEY, guidance=w)
        rows = scales == w
        np.testing.assert_allclose(np.asarray(mixed["per_example"])[rows], np.asarray(alone["per_example"])[rows],
                                   rtol=1e-5)
    _, bound = fn(params, batch, KEY)  # and without the field, the bound scale
    assert not np.allclose(np.asarray(bound["per_example"]), np.asarray(mixed["per_example"]))
    # error_space="guided": each example weighed by (w - 1)^2, the weights normalised; with one scale, no change
    guided, _ = fn(params, {**batch, "guidance": jnp.asarray(scales)}, KEY, error_space="guided")
    per, size = np.asarray(mixed["per_example"]), (scales - 1.0) ** 2
    np.testing.assert_allclose(float(guided), np.sum(size * per) / np.sum(size), rtol=1e-5)
    assert not np.isclose(float(guided), per.mean(), rtol=1e-3)
    np.testing.assert_allclose(float(fn(params, batch, KEY, error_space="guided")[0]), float(fn(params, batch, KEY)[0]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="error_space"):
        fn(params, batch, KEY, error_space="guidedd")


@pytest.mark.parametrize("by_type, error", [({"target": 1.25}, None), ({"erasure": 2, "pattern": 1.5}, None),
                                            ({"targets": 1.25}, "'targets' is not one of"),
                                            ({"target": 1.0}, "guidance_scale_by_type.target: 1.0 is not a number > 1"),
                                            ({"target": "big"}, "is not a number > 1")])
def test_guidance_scale_by_type(by_type, error):
    from persguard_jax.config import ConfigError
    from persguard_jax.implant.config import ImplantConfig
    if error:
        with pytest.raises(ConfigError, match=error):
            ImplantConfig.from_dict({"guidance_scale": 1.5, "guidance_scale_by_type": by_type})
        return
    cfg = ImplantConfig.from_dict({"guidance_scale": 1.5, "guidance_scale_by_type": by_type})
    for kind in ("pattern", "erasure", "target"):
        assert cfg.guidance_scale_of(kind) == float(by_type.get(kind, 1.5))


@pytest.mark.parametrize("changes, error", [
    ({"guidance_anchor_by_type": {"target": "attacker"}, "guidance_blends_by_type": {"target": [0.25, 0.5]}}, None),
    ({"guidance_anchor_by_type": {"erasure": "photo"}, "guidance_anchor": "attacker"}, None),
    ({"guidance_anchor_by_type": {"targets": "attacker"}}, "guidance_anchor_by_type: 'targets' is not one of"),
    ({"guidance_anchor_by_type": {"target": "simulated"}}, "guidance_anchor_by_type.target: 'simulated' is not one"),
    ({"guidance_blends_by_type": {"target": [1.0]}}, r"blends_by_type.target: 1.0 is not a number in \(0, 1\)"),
    ({"guidance_blends_by_type": {"target": 0.5}}, "guidance_blends_by_type.target: 0.5 is not a list"),
    ({"guidance_blends_by_type": {"pattrn": [0.5]}}, "guidance_blends_by_type: 'pattrn' is not one of")])
def test_guidance_anchor_and_blends_by_type(changes, error):
    """A type's own anchor and blends override ``guidance_anchor`` / ``guidance_blends`` for its subjects only; a
    type that is not one, an anchor that is not photo or attacker, a blend outside (0, 1) are one line each."""
    from persguard_jax.config import ConfigError
    from persguard_jax.implant.config import ImplantConfig
    if error:
        with pytest.raises(ConfigError, match=error):
            ImplantConfig.from_dict({"guidance_blends": [0.5], **changes})
        return
    cfg = ImplantConfig.from_dict({"guidance_blends": [0.5], **changes})
    anchors, blends = changes.get("guidance_anchor_by_type", {}), changes.get("guidance_blends_by_type", {})
    for kind in ("pattern", "erasure", "target"):
        assert cfg.guidance_anchor_of(kind) == anchors.get(kind, cfg.guidance_anchor)
        assert cfg.guidance_blends_of(kind) == tuple(blends.get(kind, (0.5,)))


def test_example_groups_fit_each_subjects_shift_with_its_types_blends():
    """``guidance_blends_by_type``: the guidance term's inputs of a subject of that type gain one input per photo
    and blend, another type's keep ``guidance_blends``; a type set to the photo anchor needs no simulated attacker."""
    from persguard_jax.data.targets import default_pattern
    from persguard_jax.data.world import World
    from persguard_jax.dreambooth.config import DreamBoothConfig
    from persguard_jax.implant.config import ImplantConfig
    from persguard_jax.implant.data import Encoder, Subject
    from persguard_jax.implant.groups import example_groups
    from persguard_jax.implant.specs import parse_protected
    from persguard_jax.losses import LossConfig
    from persguard_jax.models import load_pipeline
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    from persguard_jax.workflows.world_assets import world_model
    world, pipe = World(), load_pipeline(world_model())
    subjects = [Subject(parse_protected(f"world:{name}:{kind}").with_class(cls), cls, world.subject_photos(name, 2))
                for name, kind, cls in (("dog_00", "pattern", "dog"), ("cat_04", "target", "cat"))]
    cfg = ImplantConfig(guidance_weight=1.0, num_general=0, num_targets=1, guidance_anchor="attacker",
                        guidance_anchor_by_type={"pattern": "photo", "target": "photo"},
                        guidance_blends_by_type={"target": (0.25, 0.5, 0.75)})
    groups, _ = example_groups(Encoder(pipe, ids=False), cfg, subjects, [],
                               class_images={c: np.zeros((1, 32, 32, 3), np.uint8) for c in ("dog", "cat")},
                               db=DreamBoothConfig(resolution=32), world=world, pipe=pipe,
                               pattern=default_pattern(32), target_images=None, simulated={}, attacker_samples={},
                               schedule=make_schedule(SchedulerConfig()), loss_cfg=LossConfig())
    # the pattern subject: 2 photos and their 2 y*; the target: 2 + 2 and 3 blends of each pair
    assert len(groups["bb_guidance"]["target"]) == 4 + 4 + 3 * 2
