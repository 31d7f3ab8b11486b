"""Process set-up that every ``persguard`` command does once, before anything touches a jax device.

``setup_process()``:

1. On a CPU, one XLA device per core (``sharding.request_cpu_devices``): XLA:CPU keeps about one core busy per
   device, so the mesh's data axis is what uses the others.
2. ``jax.distributed`` when the environment says this process is one of several (``train.distributed``: explicit
   ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, SLURM, Open MPI, multi-host TPU).
3. JAX's persistent compilation cache, on by default: on a CPU compilation is most of a small run (a repeated
   200-step world personalisation: 228 s -> 65 s). The folder is ``$JAX_COMPILATION_CACHE_DIR`` if set, else
   ``<per-user cache>/jax_compilation_cache`` (``resources.cache_root()``); ``--no-compile-cache`` or
   ``PERSGUARD_NO_COMPILE_CACHE=1`` turn it off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from persguard_jax import resources

NO_CACHE_ENV = "PERSGUARD_NO_COMPILE_CACHE"
# jax's default (1 s) leaves out many of a small CPU run's programs: in the world demo (JAX_LOG_COMPILES=1) VAE
# encoding, CLIP features, metrics and sampler pieces take 0.2-1 s each to compile. Single eager ops compile in
# milliseconds and stay out.
MIN_COMPILE_SECS = 0.2


@dataclass(frozen=True)
class ProcessSetup:
    distributed: bool          # jax.distributed was started (this process is one of several)
    compile_cache: Path | None  # the persistent compilation cache's folder; None when it is off


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def compile_cache_settings(enabled: bool = True, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The jax config updates for the persistent compilation cache (pure: nothing is applied)."""
    env = os.environ if env is None else env
    if not enabled or _flag(env, NO_CACHE_ENV):
        # explicit, so that a JAX_COMPILATION_CACHE_DIR in the environment does not switch it back on
        return {"jax_enable_compilation_cache": False}
    folder = env.get("JAX_COMPILATION_CACHE_DIR") or str(resources.cache_root(env) / "jax_compilation_cache")
    settings: dict[str, Any] = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": folder}
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env:  # the user's own threshold wins
        settings["jax_persistent_cache_min_compile_time_secs"] = MIN_COMPILE_SECS
    return settings


def setup_process(*, compile_cache: bool = True, cpu_devices: int | None = None) -> ProcessSetup:
    """Call once per process, first thing: XLA flags and jax.distributed only take effect before jax starts a
    backend. ``cpu_devices`` overrides one-per-core (``persguard plan --devices`` fakes a pod's count)."""
    from persguard_jax import sharding
    sharding.request_cpu_devices(cpu_devices)
    import jax

    from persguard_jax.train import distributed

    settings = compile_cache_settings(compile_cache)
    for name, value in settings.items():
        jax.config.update(name, value)
    started = distributed.initialize(distributed.DistributedConfig.from_env())
    folder = settings.get("jax_compilation_cache_dir")
    return ProcessSetup(distributed=started, compile_cache=Path(folder) if folder else None)
