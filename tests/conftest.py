"""Shared test helpers: the PyTorch oracles are imported lazily so torch-free tests run without them."""
from __future__ import annotations

import os

# 8 fake CPU devices for the sharding tests (must be set before jax starts its CPU backend); single-device
# tests simply run on the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# A compilation cache for this test session only (a fresh folder, inherited by the subprocesses the tests start):
# XLA:CPU takes 10-30 s per training-step compile on 2 cores, and several tests compile the same program.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    _SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="persguard-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


# XLA:CPU's LLVM at -O0 for the suite: most of its time is compiling programs that then run a few steps, and -O0
# compiles them in less CPU time (the whole suite, same day: 34.4 against 39.7 CPU minutes; docs/benchmarks.md).
# The programs (HLO, fusion) are the same; float results may differ in the last bits, so tests compare runs under
# the same flags. An optimisation level the caller sets wins; benchmarks and the commands keep XLA's default.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# XLA:CPU's older loop emitters for fusions instead of its MLIR fusion emitters, for the same reason: the world
# DreamBooth step compiles in 15 s instead of 24 s and runs the same steps to the same losses (docs/benchmarks.md).
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"


def pytest_collection_modifyitems(config, items):
    """The slow tests first (stable otherwise): with two workers, a long test started last leaves one idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE:
        import shutil
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def cpu_env(devices: int, **extra: str) -> dict:
    """The environment of a command a test starts in a process of its own: ``devices`` CPU devices, the suite's
    other XLA flags (its -O0) and compilation cache passed on, no multi-process coordinator inherited, ``extra``
    last."""
    env = dict(os.environ)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def run_command(args: list[str], *, devices: int = 1, cwd: Path | None = None,
                timeout: int = 900) -> subprocess.CompletedProcess:
    """``persguard ARGS`` as a user runs it, in its own process on ``devices`` CPU devices; a failure fails the test
    with the command's last output. One device for the end-to-end tests: a command spreads its batch over every
    device it sees, and the suite's 8 fake devices on 2 cores cost the world implantation 225 s of CPU where one
    device costs 111 s, the same numbers out (docs/benchmarks.md); the sharding itself is tested apart."""
    done = subprocess.run([sys.executable, "-m", "persguard_jax.cli", *args], env=cpu_env(devices), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def torch_state_dict(module) -> dict[str, np.ndarray]:
    """A PyTorch module's state dict as float32 numpy arrays (what a safetensors file would hold)."""
    return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    return torch


@pytest.fixture(scope="module")
def micro():
    """(graph definitions, params, logical axes) of the micro UNet + text encoder (compiles in seconds)."""
    from persguard_jax import sharding as shd
    from persguard_jax.models import functional as F
    from persguard_jax.train.selfcheck import micro_modules
    modules = micro_modules(0)
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    model, params = F.split_modules(modules)
    return model, params, logical


@pytest.fixture(scope="session")
def tiny_upscaler_dir(tmp_path_factory):
    """A tiny random pipeline in the SD x4 upscaler's layout, saved in the diffusers layout."""
    from persguard_jax.models import save_pipeline
    from persguard_jax.models.tiny import tiny_upscaler_pipeline
    return save_pipeline(tiny_upscaler_pipeline(0), tmp_path_factory.mktemp("upscaler") / "pipe")
