"""Training batches as a pure function of the step, so a resumed or sharded run sees the same data.

For a map-style dataset the order of epoch e is ``randperm(N)`` from a generator seeded with
(seed, e); step s takes the s-th slice of global-batch size of it (the remainder of an epoch is
dropped), and rank r of a DDP job takes the r-th local-batch slice of that. Nothing is carried
between steps, so resuming at step k needs only k.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate


def _split(item):
    """(x, y) from a dataset item: a tensor, or a tuple/list (x, y[, ...])."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and 1 <= len(item):
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, dict) and "x" in item:
        return item["x"], item.get("y")
    raise TypeError("dataset items must be a tensor x, a tuple (x, y) or a dict with 'x' (and 'y'); "
                    f"got {type(item).__name__}")


DEFAULT_BATCH = 128  # the Trainer's batch_size when neither it nor a DataLoader gives one


class StepBatches:
    """``batch(step) -> (x, y)``: rank ``rank``'s share of global batch ``step``.

    ``data``: a map-style Dataset, a tensor or tuple of tensors, or a DataLoader (its dataset,
    collate_fn and batch size are used; its sampler is not)."""

    def __init__(self, data, global_batch: int | None, *, seed: int = 0, rank: int = 0, world: int = 1):
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            lengths = [t.shape[0] if t.dim() else None for t in data]
            if None in lengths or len(set(lengths)) > 1:  # TensorDataset's own check is a bare AssertionError
                raise ValueError(f"data's tensors must hold the same number of samples (first dimension), got "
                                 f"{[tuple(t.shape) for t in data]}")
            data = TensorDataset(*data)
        elif isinstance(data, torch.Tensor):
            if data.dim() < 1:
                raise ValueError("data must hold samples along its first dimension, got a 0-d tensor")
            data = TensorDataset(data)
        self.collate = default_collate
        if global_batch is None and not isinstance(data, DataLoader):
            global_batch = DEFAULT_BATCH
        if isinstance(data, DataLoader):
            # Its dataset and collate_fn are used; the order is fastdiff's own (a pure function of the
            # step), which is what makes resume and sharding exact. Workers are not used.
            if global_batch is None:
                if data.batch_size is None:
                    raise ValueError("batch_size: give one (the DataLoader was made with batch_size=None)")
                global_batch = data.batch_size * world
            self.collate, data = data.collate_fn, data.dataset
        if not isinstance(global_batch, int) or global_batch < 1:
            raise ValueError(f"batch_size must be a positive int, got {global_batch!r}")
        if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
            raise TypeError(f"data must be a map-style Dataset (with __len__), a DataLoader, a tensor or a tuple of "
                            f"tensors; "
                            f"got {type(data).__name__}")
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} must be divisible by the number of processes {world}")
        self.n = len(data)
        if global_batch > self.n:
            raise ValueError(f"batch_size {global_batch} exceeds the dataset size {self.n} (the samples in data)")
        self.data, self.global_batch, self.seed = data, global_batch, seed
        self.local_batch, self.rank = global_batch // world, rank
        self.steps_per_epoch = self.n // global_batch
        self._epoch, self._perm = -1, None

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.global_batch + self.rank * self.local_batch
        return self._order(epoch)[start:start + self.local_batch]

    def __call__(self, step: int):
        idx = self.indices(step)
        if isinstance(self.data, TensorDataset):
            tensors = self.data.tensors
            return tensors[0][idx], (tensors[1][idx] if len(tensors) > 1 else None)
        x, y = _split(self.collate([self.data[int(i)] for i in idx]))
        return x, y
