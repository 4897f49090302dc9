"""The sampling loop's scratch buffers on the CPU, kept between sample() calls.

A fresh multi-MB CPU tensor is memory the allocator maps from the system and the first write faults in
page by page (2048 faults for a 2^20-element guidance pair, a few ms per call on the benchmark machine);
a GPU's caching allocator already reuses its blocks, so the pool is CPU-only. A buffer is taken out of
the pool for the length of a call (concurrent calls never share one) and given back after it; the
pool keeps at most MAX_BYTES, least recently given first out. The returned samples are never pooled.

StageCache keeps the host-side work between calls the same way: the last few stage tables and their
checked kernel rows.
"""

from __future__ import annotations

import threading

import torch

MAX_BYTES = 256 << 20


class ScratchPool:
    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self._free: list[torch.Tensor] = []  # least recently given first
        self._lock = threading.Lock()

    def take(self, shape: tuple, device: torch.device) -> torch.Tensor:
        """A float32 tensor of ``shape`` (uninitialized: a previous call's values)."""
        shape = tuple(shape)
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):
                t = self._free[i]
                if t.shape == shape and t.device == device:
                    return self._free.pop(i)
        return torch.empty(shape, dtype=torch.float32, device=device)

    def give(self, tensors) -> None:
        with self._lock:
            self._free.extend(tensors)
            total = sum(t.numel() * t.element_size() for t in self._free)
            while self._free and total > self.max_bytes:
                dropped = self._free.pop(0)
                total -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    def nbytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._free)


POOL = ScratchPool()


def clear_scratch() -> None:
    """Free the CPU scratch buffers fastdiff.sample keeps between calls."""
    POOL.clear()


class StageCache:
    """The stage tables of the last few (method, path, prediction, grid, options): building one costs
    ~1 ms on the host (150 path conversions for 50 steps), a repeated sample() call reuses it."""

    def __init__(self, size: int = 16):
        self.size, self.tables = size, {}

    def get(self, key):
        try:
            table = self.tables.pop(key, None)
        except TypeError:  # an unhashable option value: no caching
            return None
        if table is not None:
            self.tables[key] = table  # most recent last
        return table

    def put(self, key, stages):
        try:
            self.tables[key] = tuple(stages)
        except TypeError:
            return
        while len(self.tables) > self.size:
            del self.tables[next(iter(self.tables))]
