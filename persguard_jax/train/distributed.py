"""Multi-process start-up: ``jax.distributed.initialize`` from the config or the environment.

``DistributedConfig.from_env()`` reads, in this order:

- ``PERSGUARD_DISTRIBUTED=off`` (one process whatever the environment says) or ``=auto`` (let jax find the
  cluster: a TPU VM pod started with ``gcloud ... --worker=all``, whose worker list lives in the GCE metadata, not
  in the environment);
- explicit ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  (launch/local.py sets them);
- the clusters jax detects itself (``initialize()`` with no arguments) when they say there are several processes:
  a SLURM job step (``srun``: ``SLURM_NTASKS`` > 1 with the step's node list), Open MPI (``mpirun``:
  ``OMPI_COMM_WORLD_SIZE`` > 1 with ``OMPI_MCA_orte_hnp_uri``), a multi-host TPU (``TPU_WORKER_HOSTNAMES`` or
  ``TPU_PROCESS_ADDRESSES`` listing several hosts, or ``MEGASCALE_NUM_SLICES`` > 1).

The variables checked are the ones jax's own cluster detection (jax/_src/clusters/) needs, so a detected cluster
is one ``initialize()`` can join. CPU processes talk through gloo.
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
    auto: bool = False  # call initialize() with no arguments (TPU pods, SLURM, Open MPI)
    cluster: str | None = None  # what asked for auto: "slurm", "ompi", "tpu" or "requested" (PERSGUARD_DISTRIBUTED)

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None) -> "DistributedConfig":
        env = os.environ if env is None else env
        mode = env.get("PERSGUARD_DISTRIBUTED", "").strip().lower()
        if mode not in ("", "auto", "off"):
            raise ValueError(f"PERSGUARD_DISTRIBUTED={mode!r}: use auto or off (or leave it unset)")
        d: dict[str, Any] = {}
        if mode != "off":
            d = dict(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
                     num_processes=_int(env, "JAX_NUM_PROCESSES"), process_id=_int(env, "JAX_PROCESS_ID"))
            if d["coordinator_address"] is None and d["num_processes"] is None:  # nothing explicit: a cluster?
                found = detect_cluster(env)
                if found or mode == "auto":
                    name, count = found or ("requested", None)
                    d.update(auto=True, cluster=name, num_processes=count)
        d.update({k: v for k, v in dict(overrides or {}).items() if v is not None})
        return cls(**d)

    @property
    def requested(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: not an integer") from None


def detect_cluster(env: Mapping[str, str]) -> tuple[str, int | None] | None:
    """(cluster, number of processes, None where only jax can tell) when the environment is one of several
    processes that jax's own detection can join; None for a single process."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    # the step node list is only set inside `srun`: an sbatch script itself is one process even with --ntasks=4
    if all(k in env for k in slurm) and (_int(env, "SLURM_NTASKS") or 1) > 1:
        return "slurm", _int(env, "SLURM_NTASKS")
    ompi_size = _int(env, "OMPI_COMM_WORLD_SIZE") or 1
    if ompi_size > 1:
        if "OMPI_MCA_orte_hnp_uri" not in env:  # Open MPI 5 (PRRTE) no longer sets it; jax cannot find process 0
            raise ValueError(f"Open MPI world of {ompi_size} processes, but no OMPI_MCA_orte_hnp_uri for jax to find "
                             f"the coordinator: set JAX_COORDINATOR_ADDRESS=host:port of rank 0, JAX_NUM_PROCESSES "
                             f"and JAX_PROCESS_ID (or PERSGUARD_DISTRIBUTED=off for independent runs)")
        return "ompi", ompi_size
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    per_slice = len([h for h in hosts.split(",") if h.strip()])
    slices = _int(env, "MEGASCALE_NUM_SLICES") or 1
    if per_slice > 1 or slices > 1:
        return "tpu", per_slice * slices if per_slice else None
    return None


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


def process_zero_says(value: bool) -> bool:
    """Process 0's ``value`` on every process (itself with one process): a choice that each process makes from
    files it reads, and that changes which programs run, is made once, so no process waits on a collective the
    others skip."""
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))
    return value


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of (possibly multi-process, sharded) arrays, the whole arrays on every process."""
    import numpy as np
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))
