"""Global batches for the training loop: deterministic, resumable, each process reading only its share.

A run is a sequence of global batches. Batch ``s`` holds the examples at global positions
``s*G ... s*G+G-1`` of an endless stream that visits the source in a fresh seeded permutation each epoch. Process
``p`` of ``n`` reads rows ``p*G/n ... (p+1)*G/n - 1`` of it and nothing else; ``sharding.global_batch`` then
assembles the process shares into one global array. So the data a step sees depends only on (seed, step, G):
the same for 1 or 64 processes, and after a resume. A row that ``map_fn`` turns into several examples (a DreamBooth
pair: an instance and a class example) may be split between processes: when ``n`` does not divide ``G`` but
divides the examples, every process maps all ``G`` rows and keeps its share of the examples (one pair on two
processes: the instance on one, the class image on the other).

The pipeline is a grain ``MapDataset`` over steps turned into an iterator with a thread pool and prefetch;
its ``get_state()`` (a small dict) is saved with each checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np


def check_split(global_batch: int, examples: int, process_count: int) -> bool:
    """Whether the processes split ``global_batch`` by rows (True) or, when only the ``examples`` those rows make
    divide, by examples (False); ``ValueError`` when neither divides."""
    if global_batch % process_count == 0:
        return True
    if examples % process_count:
        shown = f" ({examples} examples)" if examples != global_batch else ""
        raise ValueError(f"global batch {global_batch}{shown} is not divisible by {process_count} processes")
    return False


class StepBatches:
    """Random-access source: item ``s`` = this process's rows of global batch ``s`` (a dict of stacked arrays)."""

    def __init__(self, source: Sequence[Mapping[str, Any]], *, global_batch: int, num_steps: int, seed: int = 0,
                 shuffle: bool = True, process_index: int | None = None, process_count: int | None = None,
                 transform: Callable[[Mapping[str, Any], np.random.Generator], Mapping[str, Any]] | None = None,
                 map_fn: Callable[[dict], dict] | None = None):
        self.source, self.size = source, len(source)
        if self.size == 0:
            raise ValueError("the data source is empty")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.global_batch, self.num_steps, self.seed, self.shuffle = global_batch, num_steps, seed, shuffle
        self.transform, self.map_fn = transform, map_fn
        self._perms: dict[int, np.ndarray] = {}
        n = self.process_count
        # rows split between processes, or (when only the mapped examples divide) every row read and the
        # examples split: ``local_examples`` is then this process's count of them
        examples = global_batch if global_batch % n == 0 else global_batch * self._examples_per_row()
        self.split_rows = check_split(global_batch, examples, n)
        self.local_batch = global_batch // n if self.split_rows else global_batch
        self.local_examples = None if self.split_rows else examples // n

    def _examples_per_row(self) -> int:
        """How many examples ``map_fn`` makes of one row: 1 without it, and 1 when its output is not one flat
        dict of arrays of one length (groups of different terms cannot be split by position)."""
        if self.map_fn is None:
            return 1
        mapped = self.map_fn({k: np.asarray(v)[None] for k, v in self.source[0].items()})
        lengths = {len(v) if isinstance(v, np.ndarray) else None for v in mapped.values()}
        return lengths.pop() if len(lengths) == 1 and None not in lengths else 1

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

    def _first_row(self) -> int:
        """This process's first row within a global batch."""
        return self.process_index * self.local_batch if self.split_rows else 0

    def indices(self, step: int) -> np.ndarray:
        """Source indices of the rows of global batch ``step`` this process reads."""
        start = step * self.global_batch + self._first_row()
        pos = np.arange(start, start + self.local_batch)
        return np.array([self._order(int(p // self.size))[p % self.size] for p in pos])

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        """This process's share of global batch ``step``: its rows, through ``map_fn`` when given, and then its
        share of the examples when the examples, not the rows, are split."""
        rows = []
        for j, i in enumerate(self.indices(step)):
            row = self.source[int(i)]
            if self.transform is not None:
                # per-example randomness (augmentation) from (seed, step, row): reproducible after a resume
                rng = np.random.default_rng([self.seed, step, self._first_row() + j])
                row = self.transform(row, rng)
            rows.append(row)
        batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
        if self.map_fn is not None:
            batch = self.map_fn(batch)
        if self.local_examples is not None:
            lo = self.process_index * self.local_examples
            batch = {k: v[lo:lo + self.local_examples] for k, v in batch.items()}
        return batch


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
