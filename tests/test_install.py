"""The installed package runs on its own: a wheel built from this tree, installed (not editable) into a fresh venv,
runs ``persguard demo`` from an unrelated folder with the configs and world models it ships.

Offline and cheap: the wheel is built without build isolation and without dependencies, and the fresh venv sees
this test venv's dependencies through a ``.pth`` path line. Such a line adds the folder to ``sys.path`` without
running the ``.pth`` files in it, so the editable install's finder (``__editable__...pth``, which maps
``persguard_jax`` to the source tree) never loads there; the test also checks where the package was imported from.
``make check-install`` is the full version (fresh venv, ``pip install .`` with its dependencies, the real demo).
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds per subprocess; the demo at this scale takes about a minute on 2 busy cores
# The demo shrunk to a smoke run: 2 DreamBooth steps, 2 class images, 2 evaluation images of 2 sampler steps.
SMALL_DEMO = ["dreambooth.steps=2", "dreambooth.num_class_images=2", "dreambooth.class_sample_steps=2",
              "dreambooth.class_batch_size=2", "dreambooth.eval_num_images=2", "dreambooth.eval_steps=2",
              "loop.log_every=1", "loop.checkpoint_every=1000"]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _source_copy(dest: Path) -> Path:
    """What a build reads, copied: an in-tree build would leave build/ behind, whose stale files a later wheel
    would ship (hiding a package-data glob that no longer matches)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "persguard_jax", dest / "persguard_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _fresh_venv(root: Path) -> Path:
    """A venv without pip whose only view of this one is its dependencies' folders (no .pth files run there)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=TIMEOUT)
    python = root / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(purelib, "test_venv_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _user_env(tmp: Path) -> dict[str, str]:
    """This environment as a user's shell would have it: no source tree on PYTHONPATH, one CPU device per core
    (conftest's 8 fake devices dropped), a per-test cache; the session's compilation cache and its other XLA flags
    (-O0: compiling the DreamBooth step is most of this run, 35 s -> 16 s, running it is not) are kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags),
               PERSGUARD_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_anywhere(tmp_path):
    # the wheel is built offline, without build isolation: the build backend must be in this environment
    # (`make venv` and `make test-latest` install it)
    pytest.importorskip("setuptools", minversion="77", reason="needs setuptools>=77 to build the wheel offline")
    wheels = tmp_path / "wheels"
    (tmp_path / "src").mkdir()
    src = _source_copy(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(wheels), str(src)])
    wheel, = wheels.glob("persguard_jax-*.whl")
    python = _fresh_venv(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)])
    shutil.rmtree(src)  # nothing may be read from the build copy either

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _user_env(tmp_path)
    # where everything comes from (fails fast, before the demo would train missing world models for minutes)
    where = _run([str(python), "-c", "import sys, persguard_jax, persguard_jax.resources as r; "
                  "from persguard_jax.workflows import world_assets as w; "
                  "print(persguard_jax.__file__, r.config_path('dreambooth_world'), w.world_model(build=False), "
                  "w.world_clip(build=False)); print(any('editable' in str(f) for f in sys.meta_path))"],
                 cwd=elsewhere, env=env)
    *paths, editable_finder = where.stdout.split()
    installed = (tmp_path / "venv").resolve()
    assert all(Path(p).resolve().is_relative_to(installed) for p in paths), where.stdout
    assert editable_finder == "False", "the editable install's finder is active in the fresh venv"

    demo = _run([str(tmp_path / "venv" / "bin" / "persguard"), "demo", "--out", "report", *SMALL_DEMO],
                cwd=elsewhere, env=env)
    results = json.loads((elsewhere / "report" / "results.json").read_text())
    assert set(results["after"]) >= {"clip_i", "identity_similarity", "colour_match"}, results
    assert (elsewhere / "report" / "report.png").is_file() and "demo done" in demo.stdout
    assert not (tmp_path / "cache" / "world_tiny").exists()  # the shipped models were used, nothing trained
