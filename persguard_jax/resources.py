"""Where the package's files live: shipped configs, the committed world models, the per-user cache.

The only module that knows these places. Configs (``persguard_jax/configs/*.yaml``) and the synthetic world's small
models (``persguard_jax/assets/``) are package data, so a plain ``pip install`` carries them; anything made on
demand (the world's models when the committed ones are missing, JAX's compilation cache) goes to a per-user cache:
``$PERSGUARD_CACHE`` if set, else ``$XDG_CACHE_HOME/persguard_jax``, else ``~/.cache/persguard_jax``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

# Package data is read as plain files next to this module: setuptools installs wheels unzipped, and the model
# loaders need real paths (safetensors, tokenizer files), which importlib.resources would only lend temporarily.
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_SUFFIX = ".yaml"


def configs_dir() -> Path:
    return PACKAGE_DIR / "configs"


def assets_dir() -> Path:
    return PACKAGE_DIR / "assets"


def config_names() -> list[str]:
    """The shipped configs, by name (``dreambooth_sd15``, ...)."""
    return sorted(p.stem for p in configs_dir().glob(f"*{CONFIG_SUFFIX}"))


def config_path(name: str | os.PathLike) -> Path:
    """A config file: ``name`` itself if it is a file, else the shipped config of that name (``dreambooth_sd15`` or
    ``dreambooth_sd15.yaml``). FileNotFoundError (one line, listing the shipped names) when it is neither."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name[: -len(CONFIG_SUFFIX)] if path.name.endswith(CONFIG_SUFFIX) else path.name
    shipped = configs_dir() / f"{stem}{CONFIG_SUFFIX}"
    # only a bare name selects a shipped config: a path with folders that does not exist is a mistake to report
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"{name}: no such config file, and not a shipped config "
                            f"(shipped: {', '.join(config_names())})")


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """The per-user folder for things made on demand (not created here); ``env`` defaults to os.environ."""
    env = os.environ if env is None else env
    if env.get("PERSGUARD_CACHE"):
        return Path(env["PERSGUARD_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "persguard_jax"


def world_asset(name: str, marker: str) -> Path | None:
    """A world model folder made earlier: the committed ``assets/<name>/``, else the cache's ``<name>/model``
    (whichever holds ``marker``); None when neither does. ``workflows.world_assets`` trains the missing ones."""
    for folder in (assets_dir() / name, cache_root() / name / "model"):
        if (folder / marker).is_file():
            return folder
    return None
