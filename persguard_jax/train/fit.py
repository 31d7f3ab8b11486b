"""``fit``: the engine's sections wired in one call (mesh -> state -> shardings -> step -> data -> loop).

Workflows describe what trains (a loss and two parameter trees with their logical axes) and where the examples
come from (a random-access source); ``fit`` does the rest the same way for all of them, so no workflow builds its
own step or loop::

    result = fit(loss_fn, train_params, frozen, train_logical=..., frozen_logical=..., source=examples,
                 global_batch=64, workdir=out / "unet", optimizer=OptimizerConfig(...), loop=LoopConfig(...))

The optimizer may be any optax transform instead (a PGD sign step, an ascent step): the same step, loop and
checkpoints run it, and ``lr_schedule`` says what learning rate to log for it. ``before_step`` (a
``train.dispatch.InnerSteps``) runs a first-order inner loop as separate programs ahead of each step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import optax

from persguard_jax import sharding as shd
from persguard_jax.data.batches import StepBatches, batch_iterator
from persguard_jax.train.dispatch import InnerSteps, with_inner_steps
from persguard_jax.train.loop import LoopConfig, TrainResult, train
from persguard_jax.train.optim import Optimizer, resolve_optimizer
from persguard_jax.train.state import create_state
from persguard_jax.train.step import StepConfig
from persguard_jax.train.step_cache import cached_train_step


def fit(loss_fn: Callable, train_params: Any, frozen: Any, *, train_logical: Any, frozen_logical: Any,
        source: Sequence[Mapping[str, Any]], global_batch: int, workdir: str | Path, optimizer: Optimizer,
        loop: LoopConfig, step: StepConfig = StepConfig(), mesh_cfg: shd.MeshConfig = shd.MeshConfig(),
        seed: int = 0, map_fn: Callable[[dict], dict] | None = None, ema: bool = False,
        on_log: Callable[[int, dict], None] | None = None,
        lr_schedule: optax.ScalarOrSchedule | None = None,
        before_step: InnerSteps | None = None) -> tuple[TrainResult, Any]:
    """Train ``train_params`` on ``loss_fn(params, batch, rng)`` (params = trainable and frozen trees merged by
    the step) for ``loop.num_steps`` steps of ``global_batch`` examples drawn from ``source`` (item ``i`` -> a
    dict of arrays; ``map_fn`` turns each stacked batch into the loss's batch). Checkpoints, metrics and the
    data position go to ``workdir``; an existing checkpoint there is resumed. Returns the loop's result and the
    frozen tree as placed on the mesh.

    ``optimizer``: an ``OptimizerConfig`` (its schedule is logged as ``learning_rate``) or any optax transform,
    with ``lr_schedule`` (a schedule or a constant) for the ``learning_rate`` to log; without it none is logged.
    ``before_step``: inner steps run ahead of every step, their result in the frozen tree the loss sees
    (``train.dispatch``)."""
    mesh = shd.make_mesh(mesh_cfg)
    opt, _ = resolve_optimizer(optimizer, lr_schedule)
    state, state_sh = create_state(train_params, train_logical, opt, mesh, mesh_cfg, seed=seed, ema=ema,
                                   rng_impl=step.rng_impl)
    frozen_sh = shd.param_shardings(frozen_logical, frozen, mesh, mesh_cfg)
    frozen = jax.device_put(frozen, frozen_sh)
    batches = StepBatches(source, global_batch=global_batch, num_steps=loop.num_steps, seed=seed, map_fn=map_fn)
    first = batches[0]
    step_frozen_sh = frozen_sh if before_step is None else {**frozen_sh,
                                                            **before_step.shardings(state_sh.params, frozen_sh)}
    # the step of an earlier fit of the same recipe in this process, if any (train.step_cache)
    step_fn = cached_train_step(loss_fn, optimizer, state_shardings=state_sh, frozen_shardings=step_frozen_sh,
                                batch_shardings=shd.local_batch_sharding(first, mesh, mesh_cfg), cfg=step,
                                lr_schedule=lr_schedule)
    if before_step is not None:
        step_fn = with_inner_steps(step_fn, before_step, rng_impl=step.rng_impl)
    result = train(step_fn, state, frozen, batch_iterator(batches), workdir=workdir, cfg=loop,
                   mesh=mesh, mesh_cfg=mesh_cfg, state_shardings=state_sh, on_log=on_log)
    return result, frozen
