"""DreamBooth on the synthetic world's pre-trained model (persguard_jax/assets/world_tiny): what the tiny random
model cannot show. The demo (the main job) runs end to end, and, run with and without the prior term, shows prior
preservation keeping the class prompt's samples near the base model's (no language drift toward the subject)."""
from __future__ import annotations

import json

import pytest

from conftest import run_command

DEMO = ["dreambooth.steps=60", "dreambooth.num_class_images=8", "dreambooth.class_sample_steps=8",
        "dreambooth.eval_num_images=8", "dreambooth.eval_steps=8", "loop.checkpoint_every=1000"]


@pytest.mark.slow
def test_demo_end_to_end_and_prior_preservation(tmp_path):
    run = tmp_path / "demo"
    assert "demo done in" in run_command(["demo", "--out", str(run), *DEMO]).stdout
    for name in ("report.png", "loss.png", "results.json", "results.md", "dreambooth/model/model_index.json"):
        assert (run / name).is_file(), name
    with_prior = json.loads((run / "results.json").read_text())
    assert set(with_prior["after"]) == {"clip_i", "identity_similarity", "colour_match", "shape_match",
                                        "texture_match", "mark_match", "subject_match"}
    prompts = [row["prompt"] for row in with_prior["evaluation"]["after"]["prompts"]]
    assert prompts == [with_prior["instance_prompt"], with_prior["class_prompt"]]

    # the prior-preservation run learned the subject: identifier samples move toward its photos in the world
    # CLIP's image space. Measured at these 60 steps (one CPU device): identity similarity 0.23 -> 0.52, CLIP-I
    # 0.17 -> 0.37; the subject's colour is not yet taken (0.00 -> 0.00; the demo's 200 steps: 0.00 -> 1.00), so it
    # is not asserted
    before, after = with_prior["before"], with_prior["after"]
    print("identifier prompt before -> after:", before, after)
    assert after["identity_similarity"] >= before["identity_similarity"] + 0.06, (before, after)
    assert after["clip_i"] >= before["clip_i"] + 0.05, (before, after)

    # the same run without the prior term, into a new folder beside the first (never over it)
    run_command(["demo", "--out", str(run), *DEMO, "dreambooth.prior_weight=0"])
    no_prior = json.loads((tmp_path / "demo-2" / "results.json").read_text())
    assert json.loads((run / "results.json").read_text()) == with_prior
    drift = {k: r["prior_preservation"]["drift_pixel_rms"] for k, r in (("prior", with_prior), ("no_prior", no_prior))}
    turned = {k: r["prior_preservation"]["after"]["colour_match"]
              for k, r in (("prior", with_prior), ("no_prior", no_prior))}
    print("class-prompt drift from the base samples:", drift, "fraction in the subject's colour:", turned)
    # without the prior term "a photo of dog" drifts toward the subject (language drift): class samples take the
    # subject's colour. Measured on persguard_jax/assets/world_tiny: 0.375 of them without the prior term, 0.00 with
    # it. (The pixel RMS drift from the base samples does not separate the two well, 0.113 vs 0.130: it
    # also counts pose and position changes, which the prior term does not hold; reported, not asserted.)
    assert turned["prior"] + 0.25 <= turned["no_prior"], (drift, turned)


def test_demo_writes_a_new_folder_beside_a_used_one(tmp_path):
    from persguard_jax.workflows.demo import fresh_folder
    (tmp_path / "demo").mkdir()
    assert fresh_folder(tmp_path / "demo") == tmp_path / "demo"  # empty: used as is
    (tmp_path / "demo" / "results.json").write_text("{}")
    assert fresh_folder(tmp_path / "demo") == tmp_path / "demo-2"
    (tmp_path / "demo-2" / "x").write_text("")
    assert fresh_folder(tmp_path / "demo") == tmp_path / "demo-3"
    assert (tmp_path / "demo" / "results.json").read_text() == "{}"


def test_demo_takes_the_worlds_size_and_names_another(tmp_path):
    """The subject's photos come at the world's size: a ``dreambooth.resolution`` that differs is one line naming it,
    before any output (a 64 px world under the 32 px config failed in numpy's stack, deep in the first step)."""
    from persguard_jax.workflows.demo import run_demo
    with pytest.raises(ValueError, match=r"dreambooth.resolution=64: the world model .* draws its photos at 32 px"):
        run_demo(tmp_path / "demo", overrides=["dreambooth.resolution=64"])
    assert not (tmp_path / "demo").exists()
