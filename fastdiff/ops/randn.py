"""The noise stream, spec v1 (docs/design.md §3): standard normals as a pure function of
(seed, stream, element), identical on every backend.

``randn`` dispatches to the selected backend; ``randn_reference`` is the specification in pure
PyTorch (float64 Box–Muller on the exact Philox words, then cast).
"""

from __future__ import annotations

import math

import torch

from fastdiff import _checks, _native
from fastdiff import dispatch as _dispatch
from fastdiff._backends import register_kernel
from fastdiff.ops.philox import M32, philox_rounds


def _normalize(seeds, stream, shape, device, dtype, offset):
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else torch.get_default_device()
    else:
        device = _checks.device_arg("device", device)
    seeds = _checks.seeds_tensor(seeds, device)
    shape, dtype = _checks.shape_tuple(shape), _checks.float_dtype(dtype)
    _checks.check_memory(f"{seeds.shape[0]} seeds of shape = {shape}",
                         seeds.shape[0] * math.prod(shape) * dtype.itemsize, device)
    return seeds, _checks.stream_id(stream), shape, device, dtype, _checks.offset_value(offset)


def randn_reference(seeds, stream, shape, *, device=None, dtype=torch.float32, offset=0) -> torch.Tensor:
    """Spec v1 normals ``[len(seeds), *shape]``; element i of sample b is element ``offset + i`` of
    the stream ``stream`` of seed ``seeds[b]``. Pure PyTorch, any device."""
    seeds, stream, shape, device, dtype, offset = _normalize(seeds, stream, shape, device, dtype, offset)
    B, n = seeds.shape[0], _checks.numel(shape)
    if B == 0 or n == 0:
        return torch.empty((B, *shape), dtype=dtype, device=device)
    q0, q1 = offset >> 2, (offset + n + 3) >> 2
    q = torch.arange(q0, q1, dtype=torch.int64, device=device)  # the groups of 4 that cover the range
    k0 = (seeds & M32)[:, None]
    k1 = ((seeds >> 32) & M32)[:, None]
    zeros = torch.zeros((), dtype=torch.int64, device=device)
    w0, w1, w2, w3 = philox_rounds(q & M32, q >> 32, zeros + stream, zeros, k0, k1)  # each [B, G]

    def uniform(w):  # ((w >> 8) + 0.5) 2^-24, exact in float64
        return ((w >> 8).to(torch.float64) + 0.5) * 2.0**-24

    r01 = torch.sqrt(-2.0 * torch.log(uniform(w0)))
    r23 = torch.sqrt(-2.0 * torch.log(uniform(w2)))
    t01 = 2.0 * math.pi * uniform(w1)
    t23 = 2.0 * math.pi * uniform(w3)
    normals = torch.stack((r01 * torch.cos(t01), r01 * torch.sin(t01), r23 * torch.cos(t23), r23 * torch.sin(t23)),
                          dim=-1).reshape(B, -1)  # [B, 4G], starting at element 4 q0
    start = offset - 4 * q0
    return normals[:, start:start + n].to(dtype).reshape(B, *shape)


def randn(seeds, stream, shape, *, device=None, dtype=torch.float32, offset=0, backend=None) -> torch.Tensor:
    """Standard normals of the noise stream, spec v1: ``[len(seeds), *shape]``.

    Args:
        seeds: per-sample 64-bit seeds, a list of ints in [0, 2^64) or a 1-D int64 tensor (seeds
            >= 2^63 stored as two's complement). Sample b depends only on ``seeds[b]``.
        stream: draw id in [0, 2^32) (sampling: 0 initial noise, 1 + i the noise of step i).
        shape: per-sample shape; elements are numbered in flattened C order.
        device: output device (default: the seeds tensor's device, else torch's default device).
        dtype: float32 (default), float64, float16 or bfloat16.
        offset: index of the first element within each sample's stream.
        backend: overrides :func:`fastdiff.use_backend` / ``FASTDIFF_BACKEND`` for this call.
    """
    seeds, stream, shape, device, dtype, offset = _normalize(seeds, stream, shape, device, dtype, offset)
    return _dispatch.kernel(_dispatch.resolve(device, backend), "randn")(seeds, stream, shape, offset, dtype)


@register_kernel("reference", "randn")
def _randn_reference_kernel(seeds, stream, shape, offset, dtype):
    return randn_reference(seeds, stream, shape, device=seeds.device, dtype=dtype, offset=offset)


if _native.status.loaded:

    @torch.library.register_fake("fastdiff::randn")
    def _randn_fake(seeds, stream, shape, offset, dtype):
        return seeds.new_empty((seeds.shape[0], *shape), dtype=dtype)
