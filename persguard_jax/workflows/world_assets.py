"""Where the synthetic world's pre-trained models come from: committed, cached, or trained now.

``world_model()`` and ``world_clip()`` return a folder, looked up in this order:

1. ``persguard_jax/assets/world_tiny/`` / ``.../world_clip/``, shipped with the package: small safetensors (a few
   MB) committed with the command that made them (``persguard_jax/assets/README.md``), so tests and the demo start
   in seconds on a fresh clone or a fresh install;
2. the per-user cache (``resources.cache_root()``: ``$PERSGUARD_CACHE``, else ``~/.cache/persguard_jax``),
   ``<cache>/world_tiny/model`` / ``<cache>/world_clip/model``, left by an earlier on-demand training or by
   ``persguard pretrain --out <cache>/world_tiny``;
3. otherwise the model is trained now into the cache (minutes on a CPU; ``build=False`` raises instead).
"""
from __future__ import annotations

from pathlib import Path

from persguard_jax import resources

ASSETS = resources.assets_dir()


def cache_dir() -> Path:
    return resources.cache_root()


def _resolve(name: str, marker: str, build, what: str, command: str) -> Path:
    found = resources.world_asset(name, marker)
    if found is not None:
        return found
    if not build:
        raise FileNotFoundError(f"{ASSETS / name}: no {what} (not committed, not in the cache "
                                f"{cache_dir() / name}); make it with `{command}`")
    print(f"no {what} found in {ASSETS / name} or {cache_dir() / name}: training it now ({command})")
    return build(cache_dir() / name)


def _default_config(workflow):
    """A workflow's shipped config, resolved and parsed as its command would."""
    import argparse
    return workflow.load(argparse.Namespace(config=None, overrides=()))


def world_model(*, build: bool = True) -> Path:
    """The world's pre-trained text-to-image pipeline folder (diffusers layout)."""
    def make(out: Path) -> Path:
        from persguard_jax.workflows import pretrain
        return Path(pretrain.pretrain(out, _default_config(pretrain.WORKFLOW), resume=True)["model"])
    return _resolve("world_tiny", "model_index.json", make if build else None, "pre-trained world model",
                    f"persguard pretrain --out {cache_dir() / 'world_tiny'}")


def world_clip(*, build: bool = True) -> Path:
    """The world's CLIP folder (transformers layout), for the metrics."""
    def make(out: Path) -> Path:
        from persguard_jax.workflows import world_clip as clip_wf
        return Path(clip_wf.train_clip(out, _default_config(clip_wf.WORKFLOW), resume=True)["model"])
    return _resolve("world_clip", "config.json", make if build else None, "world CLIP",
                    f"persguard train-clip --out {cache_dir() / 'world_clip'}")
