"""The shortcut diagnosis: its measures (noise control, CLIP shift, high-frequency energy) and ``persguard
diagnose`` end to end on the world model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from persguard_jax.cli import main
from persguard_jax.metrics import shortcut as S

WORLD = "persguard_jax/assets/world_tiny"


def test_uniform_noise_has_each_photos_linf_size():
    rng = np.random.default_rng(0)
    clean = rng.integers(20, 235, (3, 16, 16, 3)).astype(np.uint8)
    radius = np.array([2, 5, 11])
    perturbed = (clean.astype(int) + rng.choice([-1, 1], clean.shape) * radius[:, None, None, None]).astype(np.uint8)
    noise = S.uniform_noise_like(clean, perturbed, seed=1)
    got = np.abs(noise.astype(int) - clean.astype(int)).reshape(3, -1).max(1)
    assert np.all(got <= radius) and np.all(got >= radius - 1)
    assert not np.array_equal(noise, perturbed)


def test_high_frequency_energy_orders_smooth_and_noisy():
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None, None], (1, 1, 16, 3)).transpose(0, 2, 1, 3)
    noisy = np.random.default_rng(0).integers(0, 255, (1, 16, 16, 3)).astype(np.uint8)
    flat = np.full((1, 16, 16, 3), 90, np.uint8)
    assert S.high_frequency_energy(flat) < 1e-20
    assert S.high_frequency_energy(smooth) < 0.05 * S.high_frequency_energy(noisy)


@pytest.mark.slow
@pytest.mark.parametrize("cdl", [False, True], ids=["plain", "cdl"])
def test_diagnose_command(tmp_path, capsys, cdl):
    from persguard_jax.data.world import world_of
    clean_dir, pert_dir = tmp_path / "clean", tmp_path / "perturbed"
    clean_dir.mkdir()
    pert_dir.mkdir()
    rng = np.random.default_rng(0)
    for i, photo in enumerate(world_of(WORLD).subject_photos("dog_02", 3)):
        Image.fromarray(photo).save(clean_dir / f"p{i}.jpg" if i == 0 else clean_dir / f"p{i}.png")
        delta = rng.choice([-8, 8], photo.shape)
        Image.fromarray(np.clip(photo.astype(int) + delta, 0, 255).astype(np.uint8)).save(pert_dir / f"p{i}.png")
    clean_jpeg = np.asarray(Image.open(clean_dir / "p0.jpg"))
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", WORLD, "--clean", str(clean_dir), "--perturbed", str(pert_dir), "--out",
                 str(out), "diagnose.class_name=dog", "diagnose.num_images=2", "dreambooth.steps=4",
                 "dreambooth.num_class_images=2", "dreambooth.class_batch_size=2", "dreambooth.eval_steps=3",
                 "dreambooth.eval_num_images=1", "dreambooth.train_text_encoder=false", f"cdl.enabled={cdl}"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["photos"] == ["p0", "p1", "p2"]
    assert results["linf"] >= 8  # paired by stem: the JPEG's decoded pixels against the PNG
    del clean_jpeg
    assert set(results["clip_shift"]) == set(results["noise_probe"]) == {"clean", "perturbed", "uniform_noise"}
    assert results["clip_shift"]["clean"]["similarity_to_clean"] > 0.999
    plain = {"a photo of sks", "a photo of sks dog", "noise pattern"}
    with_cdl = {"a photo of sks dog, bhj noisy pattern", "a photo of sks dog, without bhj noisy pattern",
                "bhj noisy pattern"}
    assert set(results["samples"]) == (plain | with_cdl if cdl else plain)
    assert results["identifier_carries_noise"]["high_frequency_ratio"] > 0
    assert (out / "sheet.png").is_file() and (out / "dreambooth" / "model").is_dir()
    printed = capsys.readouterr().out
    assert "noise probe" in printed and ("CDL: samples with its phrase" in printed) == cdl
    if cdl:
        d, rows = results["cdl_decoupling"], results["samples"]
        assert d["with_over_without"] == pytest.approx(
            rows["a photo of sks dog, bhj noisy pattern"]["trained"]["high_frequency_energy"]
            / rows["a photo of sks dog, without bhj noisy pattern"]["trained"]["high_frequency_energy"])
        assert d["phrase_over_base"] > 0
        trained = json.loads((out / "dreambooth" / "results.json").read_text())
        assert trained["instance_prompt"] == "a photo of sks dog, bhj noisy pattern"  # CDL's training prompts
        assert trained["class_prompt"] == "a photo of dog, without bhj noisy pattern"
    else:
        assert "cdl_decoupling" not in results


def test_diagnose_refuses_unpaired_photos(tmp_path, capsys):
    (tmp_path / "clean").mkdir()
    (tmp_path / "perturbed").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "clean" / name)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "perturbed" / "a.png")
    assert main(["diagnose", "--model", WORLD, "--clean", str(tmp_path / "clean"), "--perturbed",
                 str(tmp_path / "perturbed"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no perturbed version of b.png" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["class_name", "noise_prompt"])
def test_a_blank_prompt_part_is_refused(key):
    from persguard_jax.config import ConfigError
    from persguard_jax.workflows.diagnose import DiagnoseConfig
    with pytest.raises(ConfigError, match=f"diagnose.{key}: must not be empty"):
        DiagnoseConfig(**{key: " "})
