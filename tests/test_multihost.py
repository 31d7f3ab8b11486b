"""Every training command runs multi-host: ``launch/local.py -n 2`` running ``persguard personalize`` on the world
model (two jax processes over gloo, one CPU device each) exports the same weights as one process with two
devices and the same global batch, and writes every file once (process 0 writes, Orbax coordinates checkpoints).
The batch is the world recipe's one pair: the instance example on one process, the class example on the other."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, cpu_env

# slow: started first (tests/conftest.py)
pytestmark = pytest.mark.slow

STEPS = 6
OVERRIDES = [f"dreambooth.steps={STEPS}", "dreambooth.batch_size=1", "dreambooth.num_class_images=4",
             "dreambooth.class_batch_size=2", "dreambooth.class_sample_steps=3", "dreambooth.eval_num_images=1",
             "dreambooth.eval_steps=2", "loop.log_every=2", "loop.checkpoint_every=3"]


def _personalize(model: Path, photos: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "persguard_jax.cli", "personalize", "--model", str(model), "--instance-dir",
            str(photos), "--instance-prompt", "a photo of sks dog", "--class-prompt", "a photo of dog", "--out",
            str(out), "--config", "dreambooth_world", *OVERRIDES]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "checkpoints" not in p.parts}


def test_two_processes_export_what_one_process_exports(tmp_path):
    from persguard_jax.data.world import save_photos
    from persguard_jax.workflows import world_assets
    from persguard_jax.data.world import world_of

    model = world_assets.world_model(build=False)
    world = world_of(model)
    subject = next(s for s in world.subjects if s.class_name == "dog" and s.held_out)
    photos = tmp_path / "photos"
    save_photos(world.subject_photos(subject, 4), photos, prefix=subject.name)

    one = subprocess.run(_personalize(model, photos, tmp_path / "one"), env=cpu_env(2), cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "-n", "2", "--devices-per-process", "1",
                          "--", *_personalize(model, photos, tmp_path / "two")],
                         env=cpu_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-5000:] + two.stderr[-3000:]
    assert "[1] personalised model" not in two.stdout  # process 1 neither prints the summary nor writes

    a, b = tmp_path / "one", tmp_path / "two"
    assert _files(a) == _files(b)
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        wa, wb = load_file(a / "model" / part / name), load_file(b / "model" / part / name)
        assert wa.keys() == wb.keys()
        diff = max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa)
        moved = max(float(np.max(np.abs(wa[k] - load_file(model / part / name)[k]))) for k in wa)
        assert diff <= 1e-6 < moved, (part, diff, moved)
    # written once: one record per logged step, one image per class-image index
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(2, STEPS + 1, 2))
    assert sorted(p.name for p in (b / "class_images").iterdir()) == [f"class_{i:05d}.png" for i in range(4)]


def test_protect_runs_on_two_processes(tmp_path):
    """``persguard protect`` on two jax processes (the photos split over them) writes the photos one process with
    two devices writes, each file once."""
    from PIL import Image

    from persguard_jax.data.world import save_photos, world_of
    from persguard_jax.workflows import world_assets
    model = world_assets.world_model(build=False)
    world = world_of(model)
    subject = next(s for s in world.subjects if s.class_name == "cat" and s.held_out)
    photos = tmp_path / "photos"
    save_photos(world.subject_photos(subject, 4), photos, prefix=subject.name)

    def protect(out: str) -> list[str]:
        return [sys.executable, "-m", "persguard_jax.cli", "protect", "--model", str(model), "--images", str(photos),
                "--method", "advdm", "--out", str(tmp_path / out), "protect.class_name=cat", "protect.attack_steps=4",
                "protect.chunk=2", "protect.unroll=false", "protect.eval_draws=2",
                "protect.per_device=never"]  # one process keeps both devices (auto would take one on the CPU)

    one = subprocess.run(protect("one"), env=cpu_env(2), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "-n", "2", "--devices-per-process", "1",
                          "--", *protect("two")], env=cpu_env(1), cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stdout[-5000:] + two.stderr[-3000:]
    a, b = tmp_path / "one", tmp_path / "two"
    assert _files(a) == _files(b)
    for name in sorted(p.name for p in a.glob("*.png")):
        pa, pb = (np.asarray(Image.open(folder / name), np.int16) for folder in (a, b))
        clean = np.asarray(Image.open(photos / name), np.int16)
        assert np.abs(pa - clean).max() > 0
        # sign steps: a gradient summed in another order may flip a near-zero component's sign
        assert np.mean(pa != pb) < 0.01 and np.abs(pa - pb).max() <= 4, name
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 2


def test_sample_evaluate_and_init_tiny_write_once_on_two_processes(tmp_path):
    """The commands outside the workflow table run multi-host too: each process computes, every one checks
    ``--out`` before any writes, and only process 0 writes (before, ``evaluate`` failed on the second process,
    which found process 0's results, and ``sample`` / ``init-tiny`` wrote from both)."""
    from persguard_jax.data.world import save_photos, world_of
    from persguard_jax.models import load_pipeline
    from persguard_jax.workflows import world_assets
    model = world_assets.world_model(build=False)
    world = world_of(model)
    subject = next(s for s in world.subjects if s.class_name == "cat" and s.held_out)
    save_photos(world.subject_photos(subject, 2), tmp_path / "photos", prefix=subject.name)

    def two(*command: str) -> list[str]:
        run = subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "-n", "2", "--devices-per-process",
                              "1", "--", sys.executable, "-m", "persguard_jax.cli", *command],
                             env=cpu_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return [line for line in run.stdout.splitlines() if " wrote " in f" {line}"]

    assert len(two("init-tiny", "--out", "tiny")) == 1
    assert load_pipeline(tmp_path / "tiny").unet is not None
    assert len(two("sample", "--model", str(model), "--prompt", "a photo of a red dog", "--num-images", "2",
                   "--steps", "2", "--out", "grid.png")) == 1
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert len(two("evaluate", "--model", str(model), "--references", "photos", "--prompt", "a photo of sks cat",
                   "--num-images", "2", "--steps", "2", "--out", "evaluation")) == 1
    assert {p.name for p in (tmp_path / "evaluation").iterdir()} == {"results.json", "results.md", "grid.png"}
    assert json.loads((tmp_path / "evaluation" / "results.json").read_text())["model"] == str(model)
