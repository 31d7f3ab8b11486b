"""Multi-process start-up: ``jax.distributed.initialize`` from the config or the environment.

On TPU pods and SLURM/Open MPI clusters jax finds the coordinator itself (``initialize()`` with no arguments).
Elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(launch/ has runners that do), or pass them in the config. CPU processes talk through gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import jax


@dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # call initialize() with no arguments (TPU pods, SLURM)

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None) -> "DistributedConfig":
        env = os.environ
        d = dict(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
                 num_processes=int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None,
                 process_id=int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None)
        d.update({k: v for k, v in dict(overrides or {}).items() if v is not None})
        return cls(**d)

    @property
    def requested(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1


_initialized = False


def initialize(cfg: DistributedConfig | None = None) -> bool:
    """Start jax.distributed if the config (default: the environment) asks for more than one process.
    Returns whether it did. Call before anything touches a jax device."""
    global _initialized
    cfg = cfg or DistributedConfig.from_env()
    if _initialized or not cfg.requested:
        return _initialized
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.auto:
        jax.distributed.initialize()
    else:
        if cfg.coordinator_address is None or cfg.process_id is None:
            raise ValueError("multi-process run: set coordinator_address and process_id (or JAX_COORDINATOR_ADDRESS "
                             "and JAX_PROCESS_ID) next to num_processes")
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id)
    _initialized = True
    return True


# --------------------------------------------------------------------------- who writes, and host copies

def is_writer() -> bool:
    """Whether this process writes reports, images, exports and results (process 0; Orbax coordinates its own
    checkpoint writes across processes)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the same ``name`` (a no-op with one process): e.g. files one process
    wrote are complete before the others read them."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of (possibly multi-process, sharded) arrays, the whole arrays on every process."""
    import numpy as np
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))
