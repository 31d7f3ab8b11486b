"""The one training loop every workflow uses: data -> step -> metrics -> checkpoints, resumable.

``train(step_fn, state, frozen, batches, ...)`` restores the newest readable checkpoint in
``<workdir>/checkpoints`` if there is one (state and data position: the resumed run continues exactly where the
saved one was), then runs until ``num_steps``. Every ``log_every`` steps the metrics go to the progress bar,
``metrics.jsonl`` and TensorBoard; every ``checkpoint_every`` steps (and at the end) a checkpoint is saved
asynchronously. A non-finite loss stops the run with ``TrainingDiverged`` before anything of that step is
saved. SIGTERM (TPU preemption, ``kill``) makes the loop save the current step and return cleanly.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
from tqdm.auto import tqdm

from persguard_jax import sharding as shd
from persguard_jax.config import Section
from persguard_jax.errors import RunError
from persguard_jax.train.checkpoint import Checkpointer, abstract_like
from persguard_jax.train.metrics import MetricsWriter, logged_metrics


class TrainingDiverged(RunError):
    """A non-finite loss; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class LoopConfig(Section):
    SECTION = "loop"
    BOUNDS = {"num_steps": "[0, inf)", "log_every": "[1, inf)", "checkpoint_every": "[1, inf)",
              "max_to_keep": "[1, inf)"}
    num_steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 100
    max_to_keep: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = True
    progress: bool = True



@dataclass
class TrainResult:
    state: Any
    step: int
    preempted: bool
    resumed_from: int | None
    last_metrics: dict


class _Preemption:
    """Turns SIGTERM into a flag the loop polls between steps (installed only in the main thread)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _diverged(ckpt: Checkpointer, step: int, loss: float) -> str:
    """The message of a run whose loss at step ``step + 1`` is not finite. That loss was computed from the state
    after ``step`` updates, so a checkpoint of that state is bad too (resuming would diverge again at once): it is
    removed, and the message names the last good one."""
    ckpt.wait()  # let a save in flight land before deciding what to keep
    bad = [s for s in ckpt.steps() if s >= step]
    for s in bad:
        ckpt.manager.delete(s)
    removed = f" (removed the step-{bad[0]} checkpoint: its parameters give this loss)" if bad else ""
    good = [s for s in ckpt.steps() if s < step]
    if good:
        where = (f"the last good checkpoint is {ckpt.directory / str(good[-1])} (step {good[-1]}; rerun with "
                 f"--resume and a lower optimizer.learning_rate to continue from it)")
    else:
        where = (f"no good checkpoint in {ckpt.directory}; rerun with --resume and a lower "
                 f"optimizer.learning_rate to start again")
    return f"training diverged: the loss at step {step + 1} is {loss}{removed}; {where}"


def train(step_fn: Callable, state: Any, frozen: Any, batches, *, workdir: str | Path, cfg: LoopConfig,
          mesh, mesh_cfg: shd.MeshConfig | None = None, state_shardings: Any = None,
          on_log: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run ``step_fn(state, frozen, batch)`` from the state's step (or the restored one) to ``cfg.num_steps``.

    ``batches`` is a checkpointable iterator of process-local numpy batches (``data.batches.batch_iterator``).
    """
    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.max_to_keep, save_every=cfg.checkpoint_every,
                        async_save=cfg.async_checkpoint)
    restored = ckpt.restore(abstract_like(state, state_shardings))
    resumed_from = None
    if restored is not None:
        state, data_state, resumed_from = restored
        if data_state:
            batches.set_state(data_state)
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, tensorboard=cfg.tensorboard)
    bar = tqdm(total=cfg.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not cfg.progress or jax.process_index() != 0)
    # a run resumed at its end runs no step: it reports what its last step logged
    metrics: dict = logged_metrics(writer.path, start) if restored is not None and start >= cfg.num_steps else {}
    preempted = False
    step = start
    t_last, n_last = time.perf_counter(), start
    try:
        with _Preemption() as preemption:
            while step < cfg.num_steps:
                batch = shd.global_batch(next(batches), mesh, mesh_cfg)
                state, device_metrics = step_fn(state, frozen, batch)
                metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    raise TrainingDiverged(_diverged(ckpt, step, metrics["loss"]))
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.num_steps:
                    now = time.perf_counter()
                    metrics["steps_per_s"] = (step - n_last) / max(now - t_last, 1e-9)
                    t_last, n_last = now, step
                    writer.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", it_s=f"{metrics['steps_per_s']:.2f}")
                    if on_log is not None:
                        on_log(step, metrics)
                if preemption.requested:
                    ckpt.save(step, state, batches.get_state(), force=True)
                    preempted = True
                    break
                ckpt.save(step, state, batches.get_state(), force=step == cfg.num_steps)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    if preempted and jax.process_index() == 0:
        tqdm.write(f"SIGTERM: saved step {step} to {ckpt.directory}; rerun the same command to resume")
    return TrainResult(state=state, step=step, preempted=preempted, resumed_from=resumed_from, last_metrics=metrics)
