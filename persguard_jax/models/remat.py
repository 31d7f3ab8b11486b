"""Rematerialisation (activation checkpointing) policies for the ports, chosen by name from config.

``set_remat(module, "dots_saveable")`` makes every UNet block (down, mid, up) and every CLIP encoder layer
recompute its activations in the backward pass instead of storing them, keeping what the policy saves:
- ``none``: store everything (fastest, most memory);
- ``dots_saveable``: keep matmul/conv outputs without batch dims, recompute the cheap elementwise work
  (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``);
- ``full``: keep only each block's inputs (``nothing_saveable``): least memory, ~one extra forward.
The setting is a static attribute of the modules, so it lives in the graph definition and a loss needs no flag.
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

POLICIES: dict[str, Callable | None] = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"remat policy must be one of {sorted(POLICIES)}, got {policy!r}")
    return policy


def set_remat(module: nnx.Module, policy: str) -> nnx.Module:
    """Set ``policy`` on every sub-module that supports it (those with a ``remat`` attribute); returns ``module``."""
    check_policy(policy)
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, nnx.Module) and hasattr(sub, "remat"):
            sub.remat = policy
    return module


def maybe_remat(fn: Callable, policy: str) -> Callable:
    """``fn`` (whose first argument is a module) wrapped in ``nnx.remat`` with the named policy, or as it is."""
    if policy == "none":
        return fn
    return nnx.remat(fn, policy=POLICIES[check_policy(policy)])
