"""Timing shared by the bench ops (fastdiff.bench.harness, fastdiff.bench.latency): interleaved rounds of a group
of cases, peak memory, the device's name."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch

from fastdiff.bench.case import Case


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(group: list[Case], repeat: int = 15, warmup: int = 2, device="cpu",
                     min_time: float = 0.02, rounds: Optional[dict] = None,
                     swap: tuple[str, str] = ()) -> dict[str, float]:
    """Median seconds per call of each case, measured round-robin (one timing of each case per
    round), so that drifting machine load affects all sides alike. Each timing averages enough calls
    to last ``min_time``. ``rounds``: filled with each case's per-round timings. ``swap``: two cases
    (adjacent in ``group``) that trade places every other round, so that neither always runs right
    after the cases before them (a peer's loop leaves the caches and the allocator cold: the next
    case paid up to 1.5x its time on the 2-core benchmark machine). Python's garbage collector is
    off while timing, as in timeit; the young objects are collected after each timing, outside it
    (torchsde's loop leaves ~200 MB of tensors in reference cycles per call at 2^20, which a collection
    would otherwise free inside whichever case runs next)."""
    loops = {}
    for c in group:
        for _ in range(warmup):
            c.fn()
        _sync(device)
        t0 = time.perf_counter()
        c.fn()
        _sync(device)
        once = max(time.perf_counter() - t0, 1e-7)
        loops[c.impl] = max(1, int(min_time / once))
    samples: dict[str, list[float]] = {c.impl: [] for c in group}
    swapped = list(group)
    if swap:
        i, j = (next(n for n, c in enumerate(group) if c.impl == name) for name in swap)
        swapped[i], swapped[j] = swapped[j], swapped[i]
    gc.collect()
    gc.disable()
    try:
        for r in range(repeat):
            for c in (swapped if r % 2 else group):
                k = loops[c.impl]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(k):
                    c.fn()
                _sync(device)
                samples[c.impl].append((time.perf_counter() - t0) / k)
                gc.collect(0)  # what this case left in cycles (all young: no collection ran during it)
    finally:
        gc.enable()
    if rounds is not None:
        rounds.update(samples)
    return {impl: statistics.median(v) for impl, v in samples.items()}


def peak_memory(fn: Callable, device) -> Optional[int]:
    """Peak bytes allocated on a CUDA device by one call (None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base




def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
