"""What every training command shares: its config's top-level sections, its output folder's rules, its loop.

A run owns one output folder. ``start_run`` refuses a non-empty one unless told (``resume`` continues in it,
``overwrite`` deletes it first) and writes the resolved config there before any work starts, so a run's folder
always says how it was made.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from persguard_jax import config as cfglib

# Loop defaults of the small runs (world pre-training, world CLIP): a config's ``loop`` section overrides them.
SMALL_RUN_LOOP = {"log_every": 25, "checkpoint_every": 250, "max_to_keep": 1, "tensorboard": False}


def check_sections(raw: Mapping[str, Any], known: Iterable[str]) -> None:
    """Fail on a top-level config section the workflow does not read (a typo would otherwise be ignored)."""
    known = set(known)
    unknown = set(raw) - known
    if unknown:
        raise cfglib.ConfigError(f"config: unknown sections {sorted(unknown)}; known: {sorted(known)}")


def prepare_output(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing non-empty folder unless told: ``resume`` continues in it, ``overwrite``
    deletes it first."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if resume:
            return
        if not overwrite:
            raise FileExistsError(f"{out}: already exists and is not empty (pass --resume to continue the run in it, "
                                  f"or --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def start_run(out: str | Path, raw_config: Mapping[str, Any], *, overwrite: bool, resume: bool) -> Path:
    """``prepare_output`` then ``out/config.yaml`` (the resolved config); returns ``out`` as a Path."""
    out = Path(out)
    prepare_output(out, overwrite=overwrite, resume=resume)
    cfglib.dump(dict(raw_config), out / "config.yaml")
    return out


def loop_config(section: Mapping[str, Any], num_steps: int):
    """A ``LoopConfig`` for ``num_steps`` from a config's ``loop`` section over ``SMALL_RUN_LOOP``."""
    from persguard_jax.train import LoopConfig
    return LoopConfig.from_dict({**SMALL_RUN_LOOP, **section, "num_steps": num_steps})
