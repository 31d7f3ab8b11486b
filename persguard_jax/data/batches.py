"""Global batches for the training loop: deterministic, resumable, each process reading only its share.

A run is a sequence of global batches. Batch ``s`` holds the examples at global positions
``s*G ... s*G+G-1`` of an endless stream that visits the source in a fresh seeded permutation each epoch. Process
``p`` of ``n`` reads rows ``p*G/n ... (p+1)*G/n - 1`` of it and nothing else; ``sharding.global_batch`` then
assembles the process shares into one global array. So the data a step sees depends only on (seed, step, G):
the same for 1 or 64 processes, and after a resume.

The pipeline is a grain ``MapDataset`` over steps turned into an iterator with a thread pool and prefetch;
its ``get_state()`` (a small dict) is saved with each checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np


class StepBatches:
    """Random-access source: item ``s`` = this process's rows of global batch ``s`` (a dict of stacked arrays)."""

    def __init__(self, source: Sequence[Mapping[str, Any]], *, global_batch: int, num_steps: int, seed: int = 0,
                 shuffle: bool = True, process_index: int | None = None, process_count: int | None = None,
                 transform: Callable[[Mapping[str, Any], np.random.Generator], Mapping[str, Any]] | None = None):
        self.source, self.size = source, len(source)
        if self.size == 0:
            raise ValueError("the data source is empty")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {self.process_count} processes")
        self.global_batch, self.num_steps, self.seed, self.shuffle = global_batch, num_steps, seed, shuffle
        self.local_batch = global_batch // self.process_count
        self.transform = transform
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_steps

    def _order(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)  # read by several grain threads: no check-then-index
        if perm is None:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
            if len(self._perms) > 4:
                self._perms = {}
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int) -> np.ndarray:
        """Source indices of this process's rows of global batch ``step``."""
        start = step * self.global_batch + self.process_index * self.local_batch
        pos = np.arange(start, start + self.local_batch)
        return np.array([self._order(int(p // self.size))[p % self.size] for p in pos])

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        rows = []
        for j, i in enumerate(self.indices(step)):
            row = self.source[int(i)]
            if self.transform is not None:
                # per-example randomness (augmentation) from (seed, step, row): reproducible after a resume
                rng = np.random.default_rng([self.seed, step, self.process_index * self.local_batch + j])
                row = self.transform(row, rng)
            rows.append(row)
        return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def batch_iterator(batches: StepBatches, *, map_fn: Callable[[dict], dict] | None = None, num_threads: int = 2,
                   prefetch: int = 4):
    """A checkpointable grain iterator over ``batches`` (``get_state()`` / ``set_state()``), each batch passed
    through ``map_fn`` if given (in grain's worker threads)."""
    ds = grain.MapDataset.source(batches)
    if map_fn is not None:
        ds = ds.map(map_fn)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


class ArraySource:
    """A source over in-memory arrays with a common leading dimension (``{"latents": (N, ...), ...}``)."""

    def __init__(self, arrays: Mapping[str, Any]):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: len(v) for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays have different lengths: {sizes}")
        self.size = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}
