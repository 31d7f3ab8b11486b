"""Helpers shared by the benchmarks: interleaved timing, machine readings (load, CPU steal), versions.

The scripts are run as ``python benchmarks/<name>.py``: Python puts ``benchmarks/`` first on ``sys.path``, so
they import this module as ``from common import ...``.
"""
from __future__ import annotations

import os
import platform
import statistics
import time


def request_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices; only effective before jax's CPU backend starts (call it before importing
    jax). Leaves XLA_FLAGS alone when it already names a device count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def interleaved(variants: dict, batches: dict, *, rounds: int, block: int, warmup: int):
    """Median seconds per step of each variant, blocks of ``block`` steps interleaved over ``rounds`` rounds.

    ``variants[name](batch)`` runs one step and returns its loss (a float, so the step has finished);
    ``batches[name]`` is the list of batches it cycles through. Returns (medians, all step times, first-step
    losses) keyed like ``variants``.
    """
    times = {name: [] for name in variants}
    first_loss = {}
    counters = dict.fromkeys(variants, 0)

    def run(name, record):
        bs = batches[name]
        b = bs[counters[name] % len(bs)]
        counters[name] += 1
        t0 = time.perf_counter()
        loss = variants[name](b)
        dt = time.perf_counter() - t0
        first_loss.setdefault(name, loss)
        if record:
            times[name].append(dt)

    for name in variants:
        for _ in range(warmup):
            run(name, False)
    for _ in range(rounds):
        for name in variants:
            for _ in range(block):
                run(name, True)
    return {name: statistics.median(ts) for name, ts in times.items()}, times, first_loss


def versions(packages=("jax", "jaxlib", "flax", "optax", "torch", "diffusers")) -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def cpu_times():
    """Aggregate (steal, total) jiffies from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_pct(before, after) -> float | None:
    """Percent of CPU time the hypervisor gave to other guests between two ``cpu_times()`` readings."""
    if not before or not after:
        return None
    return 100.0 * (after[0] - before[0]) / max(after[1] - before[1], 1)


def load_avg_1min() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
