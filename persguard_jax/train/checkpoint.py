"""Orbax checkpoints of the training state and the data iterator position.

One checkpoint per saved step under ``<dir>/<step>/``: ``state`` (the ``TrainState`` pytree, restored straight
into its shardings) and ``data`` (the grain iterator state, JSON). Orbax writes each checkpoint to a temporary
folder and renames it when complete, so a run killed mid-save leaves the previous checkpoints intact; saving is
asynchronous (the arrays are copied off the devices before ``save`` returns, the files are written in the
background). A checkpoint that cannot be read is skipped with a warning and the one before it is used; when
none can be read, ``restore`` raises ``CheckpointError`` rather than start again from step 0.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from persguard_jax.errors import RunError

log = logging.getLogger(__name__)


class CheckpointError(RunError):
    """Checkpoints exist but none can be read: resuming would silently restart the run."""


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, save_every: int = 1000,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Save if ``step`` is due (every ``save_every``) or ``force``; returns whether a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, None if there is none, and
        ``CheckpointError`` if there are some but none can be read.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set: arrays are read
        directly into those shardings (each host reads only its shards).
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001: any unreadable checkpoint means: try the one before
                msg = f"{self.directory / str(step)}: checkpoint unreadable ({type(e).__name__}: {str(e)[:200]}); " \
                      f"falling back to the previous one"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log.warning(msg)
                continue
            return restored.state, dict(restored.data or {}), step
        if self.steps():
            raise CheckpointError(f"{self.directory}: none of the checkpoints (steps {self.steps()}) can be read; "
                                  f"the run cannot resume (start a new --out, or --overwrite to start this one "
                                  f"again)")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def saved_steps(directory: str | Path) -> tuple[list[int], list[int]]:
    """(every step folder, the ones holding both items) under ``directory``, from the file system alone: a quick
    look (no Orbax, nothing created) that lets a command refuse a ``--resume`` with no complete checkpoint before
    any work. ``restore`` remains the judge of what can be read."""
    directory = Path(directory)
    if not directory.is_dir():
        return [], []
    steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
    complete = [s for s in steps if all((directory / str(s) / item).is_dir() and any((directory / str(s) / item).iterdir())
                                        for item in ("state", "data"))]
    return steps, complete


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (default: each array's own sharding)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
