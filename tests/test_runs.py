"""The run skeleton (one table entry per command: config sections parsed before work, --print-config, the
output-folder rules) and DreamBooth's data pieces (pairs only with prior preservation, the class-image cache)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from persguard_jax import config as cfglib
from persguard_jax.cli import WORKFLOWS, main
from persguard_jax.errors import RunError
from persguard_jax.dreambooth import DreamBoothConfig, PairSource, dreambooth_source, ensure_class_images
from persguard_jax.workflows import runs


def test_every_training_command_is_a_table_entry_with_a_shipped_config():
    names = [w.name for w in WORKFLOWS()]
    assert names == ["personalize", "implant", "protect", "purify", "diagnose", "pretrain", "train-clip", "demo"]
    for workflow in WORKFLOWS():  # every shipped default parses with its sections (defaults filled in)
        import argparse
        config = workflow.load(argparse.Namespace(config=None, overrides=()))
        resolved = config.resolved()
        assert set(resolved) == set(workflow.sections()), workflow.name
        assert runs.parse_config(resolved, workflow.sections()).resolved() == resolved  # a fixed point


def test_print_config_shows_defaults_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    args = ["personalize", "--model", "m", "--instance-dir", "p", "--out", str(out), "--config", "dreambooth_world",
            "--print-config", "--instance-prompt", "a photo of sks cat", "dreambooth.steps=7"]
    assert main(args) == 0
    printed = cfglib.parse_yaml(capsys.readouterr().out)
    assert printed["dreambooth"]["instance_prompt"] == "a photo of sks cat"
    assert printed["loop"]["num_steps"] == printed["optimizer"]["total_steps"] == printed["dreambooth"]["steps"] == 7
    assert printed["optimizer"]["b2"] == 0.999  # a default the file does not spell out
    assert not out.exists()
    assert main(["train-clip", "--print-config", "optimizer.warmup_steps=3"]) == 0
    clip = cfglib.parse_yaml(capsys.readouterr().out)
    assert clip["optimizer"]["warmup_steps"] == 3 and clip["optimizer"]["total_steps"] == clip["clip"]["steps"]


@pytest.mark.parametrize("override, message", [
    ("optimiser.learning_rate=1", "unknown sections ['optimiser']; known"),  # pretrain has no optimizer section
    ("pretrian.unet.steps=3", "unknown sections ['pretrian'] (did you mean 'pretrain'?)"),
    ("pretrain.unet.optimizer.lr=1", "unknown keys ['lr']; known"),  # nothing near enough to guess
    ("pretrain.unet.stepz=3", "unknown keys ['stepz'] (did you mean 'steps'?)"),
    ("pretrain.vae.learning_rate=1", "unknown keys ['learning_rate']"),  # the old spelling: one way now
])
def test_bad_sections_fail_before_any_work(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), override]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_output_folder_rules(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        runs.prepare_output(tmp_path / "file", overwrite=True, resume=False)
    with pytest.raises(NotADirectoryError, match="is a file"):
        runs.prepare_output(tmp_path / "file" / "run", overwrite=False, resume=False)
    theirs = tmp_path / "theirs"  # someone's folder, not a run: never continued in, never deleted
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("x")
    for flags in (dict(overwrite=False, resume=True), dict(overwrite=True, resume=False)):
        with pytest.raises(RunError, match="not a run's folder"):
            runs.prepare_output(theirs, **flags)
    assert (theirs / "thesis.tex").read_text() == "x"
    used = tmp_path / "used"
    runs.start_run(used, {"a": {"b": 1}}, overwrite=False, resume=False)
    (used / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--resume"):
        runs.prepare_output(used, overwrite=False, resume=False)
    with pytest.raises(ValueError, match="choose one"):
        runs.prepare_output(used, overwrite=True, resume=True)
    with pytest.raises(cfglib.ConfigError, match=r"another config \(a.b: 1 -> 2\)"):
        runs.start_run(used, {"a": {"b": 2}}, overwrite=False, resume=True)
    runs.start_run(used, {"a": {"b": 1}}, overwrite=False, resume=True)
    assert (used / "results.json").read_text() == "{}"
    # the learning rate (after a diverged run) and the logging cadence may change on resume
    runs.start_run(used, {"a": {"b": 1}, "optimizer": {"learning_rate": 1e-5}, "loop": {"log_every": 3}},
                   overwrite=False, resume=True)
    (used / "checkpoints" / "7").mkdir(parents=True)  # a step folder with nothing in it: no complete checkpoint
    with pytest.raises(RunError, match=r"steps \[7\]\) is complete"):
        runs.prepare_output(used, overwrite=False, resume=True)
    runs.prepare_output(used, overwrite=True, resume=False)
    assert used.is_dir() and not any(used.iterdir())
    runs.prepare_output(tmp_path / "never_started", overwrite=False, resume=True)  # a first launch with --resume



def test_resume_refuses_other_command_line_inputs_than_the_run_started_with(tmp_path, monkeypatch):
    """Inputs outside the config (implant's subject specs, --instance-dir, --model) are kept in the run marker:
    resuming with others would continue another subject's checkpoints into this folder."""
    import argparse
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    out, raw = tmp_path / "run", {"a": {"b": 1}}
    first = argparse.Namespace(protect=["world:dog_00:target"], instance_dir="photos")
    runs.start_run(out, raw, overwrite=False, resume=False, command="implant",
                   inputs=runs.run_inputs(first, "protect", "instance_dir"))
    marker = json.loads((out / runs.RUN_MARKER).read_text())
    assert marker["inputs"] == {"protect": ["world:dog_00:target"], "instance_dir": str(tmp_path / "photos")}
    other = argparse.Namespace(protect=["world:cat_04:pattern"], instance_dir="photos")
    with pytest.raises(ValueError, match=r"started with --protect \['world:dog_00:target'\], not \['world:cat_04"):
        runs.start_run(out, raw, overwrite=False, resume=True, command="implant",
                       inputs=runs.run_inputs(other, "protect", "instance_dir"))
    assert json.loads((out / runs.RUN_MARKER).read_text()) == marker
    monkeypatch.chdir(tmp_path / "photos")  # the same folder named from elsewhere is the same input
    same = argparse.Namespace(protect=["world:dog_00:target"], instance_dir=str(tmp_path / "photos"))
    runs.start_run(out, raw, overwrite=False, resume=True, command="implant",
                   inputs=runs.run_inputs(same, "protect", "instance_dir"))
    (out / runs.RUN_MARKER).write_text('{"command": "implant"}')  # a run from before inputs were kept
    runs.start_run(out, raw, overwrite=False, resume=True, command="implant",
                   inputs=runs.run_inputs(other, "protect", "instance_dir"))


def test_a_run_is_resumed_or_replaced_only_by_its_own_command(tmp_path):
    """The run marker names the command; another command's --overwrite or --resume is refused even when its
    config sections include the run's (an implantation's hold DreamBooth's), and the run is left as it was."""
    run = runs.start_run(tmp_path / "db", {"dreambooth": {"steps": 3}}, overwrite=False, resume=False,
                         command="personalize")
    assert runs.run_command(run) == "personalize"
    (run / "results.json").write_text("{}")
    for flags in (dict(overwrite=True, resume=False), dict(overwrite=False, resume=True)):
        with pytest.raises(RunError, match="a run of `persguard personalize`"):
            runs.check_output(run, **flags, sections=["dreambooth", "implant"], command="implant")
    assert (run / "results.json").read_text() == "{}"
    runs.check_output(run, overwrite=True, resume=False, sections=["dreambooth"], command="personalize")
    # a run from before markers: its config's sections decide
    (run / runs.RUN_MARKER).unlink()
    runs.check_output(run, overwrite=True, resume=False, sections=["dreambooth", "implant"], command="implant")
    with pytest.raises(RunError, match="another command"):
        runs.check_output(run, overwrite=True, resume=False, sections=["purify"], command="purify")
    (run / runs.RUN_MARKER).write_text("[1]")
    with pytest.raises(RunError, match=r"run.json: expected"):
        runs.check_output(run, overwrite=True, resume=False, command="personalize")

# --------------------------------------------------------------------------- DreamBooth's data

@pytest.fixture(scope="module")
def tiny():
    from persguard_jax.models.tiny import tiny_pipeline
    return tiny_pipeline(0)


def test_pairs_only_with_prior_preservation(tiny):
    photos = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    classes = np.random.default_rng(1).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    cfg = DreamBoothConfig(resolution=32, instance_prompt="a sks dog", class_prompt="a dog")
    source, layout = dreambooth_source(tiny, photos, classes, cfg)
    assert isinstance(source, PairSource) and len(source) == 5 and layout is not None
    item = source[4]  # instance 4 mod 3, class 4
    assert item["latent_mean"].shape[0] == 2 and item["input_ids"].shape[0] == 2
    examples = layout({k: np.stack([source[0][k], source[1][k]]) for k in item})
    np.testing.assert_array_equal(examples["is_prior"], [0, 1, 0, 1])
    assert not np.array_equal(item["input_ids"][0], item["input_ids"][1])  # instance vs class prompt

    alone, layout = dreambooth_source(tiny, photos, classes, DreamBoothConfig(resolution=32, prior_weight=0.0))
    assert layout is None and len(alone) == 3 and alone[0]["latent_mean"].ndim == 3  # no duplicated example
    frozen, _ = dreambooth_source(tiny, photos, None, DreamBoothConfig(resolution=32, train_text_encoder=False))
    assert "context" in frozen[0] and "input_ids" not in frozen[0]  # a frozen encoder's output, cached
    # LoRA adapters on the text encoder train it even with train_text_encoder off: prompts stay live ids
    live, _ = dreambooth_source(tiny, photos, None, DreamBoothConfig(resolution=32, train_text_encoder=False),
                                text_trains=True)
    assert "input_ids" in live[0] and "context" not in live[0]
    with pytest.raises(ValueError, match="differ in keys"):
        PairSource({"a": np.zeros(2)}, {"b": np.zeros(2)})


def test_class_images_are_topped_up_not_regenerated(tiny, tmp_path):
    cfg = DreamBoothConfig(resolution=32, num_class_images=3, class_batch_size=2, class_sample_steps=2,
                           class_prompt="a photo of a dog")
    first = ensure_class_images(tiny, tmp_path / "c", cfg, progress=False)
    written = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    assert sorted(written) == ["class_00000.png", "class_00001.png", "class_00002.png"] and len(first) == 3
    more = ensure_class_images(tiny, tmp_path / "c", DreamBoothConfig(**{**cfg.to_dict(), "num_class_images": 5}),
                               progress=False)
    assert len(more) == 5 and all((tmp_path / "c" / n).read_bytes() == b for n, b in written.items())
    fresh = ensure_class_images(tiny, tmp_path / "d", DreamBoothConfig(**{**cfg.to_dict(), "num_class_images": 5,
                                                                           "class_batch_size": 1}), progress=False)
    np.testing.assert_allclose(more, fresh, atol=1 / 127.5)  # image i comes from seed offset i, whatever the batch
