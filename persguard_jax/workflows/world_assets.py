"""Where the synthetic world's pre-trained models come from: committed, cached, or trained now.

``world_model()`` and ``world_clip()`` return a folder, looked up in this order:

1. ``assets/world_tiny/`` / ``assets/world_clip/`` in the repository: small safetensors (a few MB) committed with
   the command that made them (``assets/README.md``), so tests and the demo start in seconds on a fresh clone;
2. the cache, ``runs/world_tiny/model`` / ``runs/world_clip/model`` (or ``$PERSGUARD_CACHE/...``), left by an
   earlier ``persguard pretrain`` / ``persguard train-clip``;
3. otherwise the model is trained now into the cache (minutes on a CPU; ``build=False`` raises instead).
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"


def cache_dir() -> Path:
    return Path(os.environ.get("PERSGUARD_CACHE", ROOT / "runs"))


def _resolve(name: str, marker: str, build, what: str, command: str) -> Path:
    for folder in (ASSETS / name, cache_dir() / name / "model"):
        if (folder / marker).is_file():
            return folder
    if not build:
        raise FileNotFoundError(f"{ASSETS / name}: no {what} (not committed, not in the cache "
                                f"{cache_dir() / name}); make it with `{command}`")
    print(f"no {what} found in {ASSETS / name} or {cache_dir() / name}: training it now ({command})")
    return build(cache_dir() / name)


def world_model(*, build: bool = True) -> Path:
    """The world's pre-trained text-to-image pipeline folder (diffusers layout)."""
    def make(out: Path) -> Path:
        from persguard_jax import config as cfglib
        from persguard_jax.workflows.pretrain import DEFAULT_CONFIG, pretrain
        return Path(pretrain(out, cfglib.load_config(DEFAULT_CONFIG), resume=True)["model"])
    return _resolve("world_tiny", "model_index.json", make if build else None, "pre-trained world model",
                    "persguard pretrain --out runs/world_tiny")


def world_clip(*, build: bool = True) -> Path:
    """The world's CLIP folder (transformers layout), for the metrics."""
    def make(out: Path) -> Path:
        from persguard_jax import config as cfglib
        from persguard_jax.workflows.world_clip import DEFAULT_CONFIG, train_clip
        return Path(train_clip(out, cfglib.load_config(DEFAULT_CONFIG), resume=True)["model"])
    return _resolve("world_clip", "config.json", make if build else None, "world CLIP",
                    "persguard train-clip --out runs/world_clip")
