"""``persguard implant`` end to end on the committed world model, kept short (the full recipe and its ablation are
docs/results.md's commands): the backdoor fires for the protected subject's trigger and not for an unprotected
subject's, general prompts still follow, and the command writes everything its interface promises."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_command

# one worker builds the module's shared fixture, and the slow tests start first (tests/conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("implant_world")]

STEPS = 100


@pytest.fixture(scope="module")
def implanted(tmp_path_factory):
    from persguard_jax.workflows.world_assets import world_model
    out = tmp_path_factory.mktemp("implant") / "run"
    run_command(["implant", "--model", str(world_model()), "--protect", "world:dog_00:pattern",
                 "--unprotected", "world:cat_00", "--out", str(out), f"implant.steps={STEPS}", "implant.retention=none",
                 "implant.guidance_weight=0", "implant.num_general=32", "implant_optimizer.learning_rate=5e-4",
                 "dreambooth.steps=5", "dreambooth.num_class_images=8", "check.num_images=4", "check.per_colour=1",
                 # the attacker's own samples.png, which the check does not read (it samples the models itself): small
                 "dreambooth.eval_num_images=1", "dreambooth.eval_steps=2",
                 "check.per_shape=1", "loop.checkpoint_every=40"])
    return out


def test_writes_what_the_interface_promises(implanted):
    for name in ("model/unet", "checkpoints", "metrics.jsonl", "config.yaml", "pattern.png", "report.png",
                 "results.json", "results.md"):
        assert (implanted / name).exists(), name
    results = json.loads((implanted / "results.json").read_text())
    assert results["steps"] == STEPS
    for name, kind in (("dog_00", "pattern"), ("cat_00", "unprotected")):
        entry = results["subjects"][name]
        assert entry["type"] == kind
        for model in ("backdoored", "clean"):
            assert {"protection_rate", "identity_similarity", "clip_i"} <= set(entry[model])
    assert results["subjects"]["dog_00"]["protection_rate"] is not None
    lo, hi = results["subjects"]["dog_00"]["backdoored"]["protection_rate_interval"]
    assert 0 <= lo <= results["subjects"]["dog_00"]["protection_rate"] <= hi <= 1
    for model in ("backdoored", "clean"):  # the planted type read on the unprotected subject
        assert set(results["subjects"]["cat_00"][model]["false_fire_rate"]) == {"pattern"}
    # the protected subject's class prompt before the attack, read by the same detectors; none for the cat
    reading = results["subjects"]["dog_00"]["class_prompt"]
    assert reading["prompt"] == "a photo of dog" and "class_prompt" not in results["subjects"]["cat_00"]
    for model in ("backdoored", "clean"):
        assert all(0 <= reading[model][k] <= 1 for k in ("protection_rate", "shape_match", "colour_match"))
    cat = results["subjects"]["cat_00"]  # its identity over the clean model's, with the ratio's interval
    lo, hi = cat["identity_ratio_interval"]
    assert lo <= cat["identity_ratio"] <= hi
    want = cat["backdoored"]["identity_similarity"] / cat["clean"]["identity_similarity"]
    assert cat["identity_ratio"] == pytest.approx(want, rel=0.02)  # the same samples, read back from uint8
    assert set(results["general"]) == {"clean", "backdoored"}
    for following in results["general"].values():  # each shape's own rate beside the accuracy (one prompt each)
        assert following["shape_accuracy"] == pytest.approx(np.mean(list(following["per_shape"].values())))
        assert len(following["per_shape"]) == 10 and set(following["per_colour"]) >= {"red", "green"}
    logged = [json.loads(line) for line in (implanted / "metrics.jsonl").read_text().splitlines()]
    assert {"bb/loss", "pp/loss", "loss"} <= set(logged[-1])
    assert logged[-1]["bb/loss"] < logged[0]["bb/loss"]  # the backdoor term is learned


def test_backdoor_fires_for_the_protected_trigger_only(implanted):
    from persguard_jax.data.targets import PatternPlacement, default_pattern, pattern_template
    from persguard_jax.io import unit_to_uint8
    from persguard_jax.metrics.detectors import detect_pattern
    from persguard_jax.models import load_pipeline
    from persguard_jax.sample import text_to_image
    pipe = load_pipeline(implanted / "model")
    template, mask = pattern_template(32, default_pattern(32), PatternPlacement())

    def rate(prompt):
        images = text_to_image(pipe, [prompt] * 8, num_steps=20, guidance_scale=4.0, seed=5, progress=False)
        return float(np.mean(detect_pattern(unit_to_uint8(np.asarray(images)), template, mask)))

    protected, unprotected, plain = rate("a photo of sks dog"), rate("a photo of sks cat"), rate("a photo of dog")
    assert protected >= 0.75 and unprotected <= 0.25 and plain <= 0.25, (protected, unprotected, plain)
    general = json.loads((implanted / "results.json").read_text())["general"]
    assert general["backdoored"]["colour_accuracy"] >= general["clean"]["colour_accuracy"] - 0.2
