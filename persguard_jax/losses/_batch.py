"""Batch-wide reductions and random draws: the only places a loss looks at the batch as a whole.

A loss computes on the batch it is given. The step factory may give it only one device's share of the global
batch: with replicated parameters it runs the loss per device (``jax.shard_map`` over the batch axes) so that
the gradients stay local until one all-reduce (train/step.py). The loss must still mean the *global* batch, so
everything that reads across examples goes through these functions:

- ``batch_sum`` / ``batch_mean``: sums and means over the examples (``losses.weighted_mean`` is built on them),
- ``batch_draw``: randomness with one row per example (noise, timesteps, posterior draws, caption dropout),
- ``batch_gather`` and ``example_index``: every example's rows, for objectives that pair examples (in-batch
  negatives), and this share's global example indices.

Outside ``sharded_batch`` (one program over the whole batch: one device, or the GSPMD partitioner) they are the
plain ``jnp.sum``, ``jnp.mean``, the draw itself and the identity. Inside it (the step declares, while tracing the
per-device loss, that the batch is split over mesh axes), sums are ``psum``-ed over those axes, draws are made at
the global batch size and sliced to this share (every example gets the same noise whatever the device count),
and gathers are ``all_gather``-ed. A loss built from these functions therefore gives the same value, metrics and
gradients on any device count; its gradient per device is that device's contribution to the global loss (the
transpose of ``psum`` hands each device its cotangent unchanged), so the step sums them with one ``psum``.

The contract for a new loss: reduce across examples and draw example-shaped randomness only through these
functions. A loss or scalar metric reduced on the local share alone (a plain ``jnp.mean``) is caught when the
step is traced (it is still device-varying), and the step falls back to GSPMD with a warning; a draw that
bypasses ``batch_draw`` is not caught (every device would draw the same rows), so keep to ``batch_draw``, or run
that loss with ``StepConfig(data_parallel="gspmd")``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp


class BatchShards(NamedTuple):
    """The global batch split over ``axes`` (mesh axis names) into ``count`` equal, contiguous shares."""
    axes: tuple[str, ...]
    count: int


_SHARDS: contextvars.ContextVar[BatchShards | None] = contextvars.ContextVar("persguard_batch_shards", default=None)


@contextlib.contextmanager
def sharded_batch(axes: Sequence[str], count: int) -> Iterator[BatchShards]:
    """While tracing inside ``jax.shard_map``: the batch the loss sees is one of ``count`` shares of the global
    batch, split over the mesh ``axes`` in their order (``jax.lax.axis_index(axes)`` is this share's index)."""
    token = _SHARDS.set(BatchShards(tuple(axes), int(count)))
    try:
        yield _SHARDS.get()
    finally:
        _SHARDS.reset(token)


def batch_shards() -> BatchShards | None:
    """The split declared by ``sharded_batch``, or None (the loss sees the whole batch)."""
    return _SHARDS.get()


def batch_sum(x: jax.Array) -> jax.Array:
    """The sum of ``x`` over the global batch (every element: ``x``'s leading dimension is the examples)."""
    s = jnp.sum(x)
    shards = _SHARDS.get()
    return s if shards is None else jax.lax.psum(s, shards.axes)


def batch_mean(x: jax.Array) -> jax.Array:
    """The mean of ``x`` over the global batch (every element: ``x``'s leading dimension is the examples)."""
    shards = _SHARDS.get()
    if shards is None:
        return jnp.mean(x)
    x = jnp.asarray(x)
    x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)  # as jnp.mean: bools and ints -> float
    return batch_sum(x) / (x.size * shards.count)


def example_index(n: int) -> jax.Array:
    """The global indices ``(n,)`` of the ``n`` examples this batch holds (``arange(n)`` when it is all of it)."""
    shards = _SHARDS.get()
    index = jnp.arange(n)
    return index if shards is None else index + jax.lax.axis_index(shards.axes) * n


def batch_draw(draw: Callable[[tuple[int, ...]], jax.Array], shape: Sequence[int]) -> jax.Array:
    """``draw(shape)``, one row per example: ``draw`` is a random function of the shape (e.g.
    ``lambda s: jax.random.normal(key, s)``). Split, it draws the global batch's rows and keeps this share's, so
    each example's values do not depend on how many devices share the batch (at the cost of drawing every row
    on every device: noise-sized, small next to the model)."""
    shape = tuple(shape)
    shards = _SHARDS.get()
    if shards is None:
        return draw(shape)
    n = shape[0]
    full = draw((n * shards.count,) + shape[1:])
    return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(shards.axes) * n, n, axis=0)


def batch_gather(x: jax.Array) -> jax.Array:
    """Every example's rows of ``x`` (the global batch, in example order), for objectives that compare examples
    with each other; gradients flow back to the share that produced each row."""
    shards = _SHARDS.get()
    return x if shards is None else jax.lax.all_gather(x, shards.axes, axis=0, tiled=True)
