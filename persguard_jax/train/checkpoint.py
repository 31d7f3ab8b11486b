"""Orbax checkpoints of the training state and the data iterator position.

One checkpoint per saved step under ``<dir>/<step>/``: ``state`` (the ``TrainState`` pytree, restored straight
into its shardings) and ``data`` (the grain iterator state, JSON). Orbax writes each checkpoint to a temporary
folder and renames it when complete, so a run killed mid-save leaves the previous checkpoints intact; saving is
asynchronous (the arrays are copied off the devices before ``save`` returns, the files are written in the
background). Replica-parallel saving (each replica of a replicated array writes a slice of it) is on only when
there is more than one process: within one process every replica's bytes leave through the same host, so slicing
gains nothing, and slicing costs a compiled ``jit(slice)`` per array shape and device (on the test suite's 8
faked CPU devices the first save of the 1M-parameter world model took 24 s with it, 2 s without). A checkpoint
that cannot be read is skipped with a warning and the one before it is used; when none can be read, ``restore``
raises ``CheckpointError`` rather than start again from step 0.
"""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
# The default ``jax.Array`` handler keeps per-host array metadata in this store; Orbax 0.12 has no public path to
# it, and our handler (below) must keep what the default one writes.
from orbax.checkpoint._src.metadata import array_metadata_store

from persguard_jax.errors import RunError

log = logging.getLogger(__name__)


def _drop_closed_loop_callbacks() -> None:
    """After a failed read, TensorStore completes the read's other pieces on threads whose callbacks find Orbax's
    event loop closed: each prints an unraisable ``RuntimeError: Event loop is closed`` traceback (some after the
    command's one-line error). They are noise; drop them (every other unraisable exception is printed as before)."""
    hook = sys.unraisablehook
    if getattr(hook, "_drops_closed_loop", False):
        return

    def drop(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        hook(unraisable)
    drop._drops_closed_loop = True
    sys.unraisablehook = drop


class CheckpointError(RunError):
    """Checkpoints exist but none can be read: resuming would silently restart the run."""


# Replica-parallel across hosts only for slices at least this large: below it the extra write requests cost
# more than the bytes they spread.
MIN_REPLICA_PARALLEL_BYTES = 1 << 20


def type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's default handlers, with replica-parallel array saving only across processes."""
    multi_process = jax.process_count() > 1
    scalar = ocp.type_handlers.ScalarHandler()
    arrays = ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(), use_replica_parallel=multi_process,
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES)
    return ocp.type_handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
        (np.ndarray, ocp.type_handlers.NumpyHandler()), (jax.Array, arrays), (str, ocp.type_handlers.StringHandler()))


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, save_every: int = 1000,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        # Saves every ``save_every`` steps (and when JAX's preemption notice says so); ``save(force=True)`` adds
        # the loop's end and SIGTERM saves. Not Orbax's default InitialSavePolicy, which also saves the first step
        # of every fresh run: a full-state write (about 10 GB for SD 1.5 with AdamW) that only spares one step.
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_decision_policy=policy, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=type_handlers()),
                    "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Save if ``step`` is due (every ``save_every``) or ``force``; returns whether a save started."""
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, None if there is none, and
        ``CheckpointError`` if there are some but none can be read.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set: arrays are read
        directly into those shardings (each host reads only its shards).
        """
        steps = self.steps()
        if not steps:
            return None
        # each array read as a jax.Array straight into its abstract leaf's sharding
        into = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        for step in reversed(steps):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(abstract_state, restore_args=into), data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001: any unreadable checkpoint means: try the one before
                _drop_closed_loop_callbacks()
                msg = f"{self.directory / str(step)}: checkpoint unreadable ({type(e).__name__}: {str(e)[:200]}); " \
                      f"falling back to the previous one"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log.warning(msg)
                continue
            return restored.state, dict(restored.data or {}), step
        raise CheckpointError(f"{self.directory}: none of the checkpoints (steps {steps}) can be read; the run "
                              f"cannot resume (start a new --out, or --overwrite to start this one again)")

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
