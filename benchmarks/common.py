"""Helpers shared by the benchmarks: interleaved timing, machine readings (load, CPU steal), versions.

The scripts are run as ``python benchmarks/<name>.py``: Python puts ``benchmarks/`` first on ``sys.path``, so
they import this module as ``from common import ...``.
"""
from __future__ import annotations

import os
import platform
import statistics
import time


def add_timing_args(p) -> None:
    """The interleaved-timing flags every benchmark takes (see ``interleaved``)."""
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    p.add_argument("--block", type=int, default=4, help="steps per variant per round (default 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, the cores here)")


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
