"""Triton implementation of the spec-v1 noise stream (docs/design.md §3): per-sample Gaussian noise drawn
from seeds held in a device tensor (CUDA-graph safe: nothing is read back to the host), plus a
Philox4x32-10 known-answer entry point.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""

import math
import os

import torch
import triton
import triton.language as tl

from . import _launch as _device
from .philox import normal4, seed_key, select_lane, store_cast
from .philox import philox4x32_10 as _philox4x32_10

_OUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1; larger batches are launched in chunks


@triton.jit(do_not_specialize=["stream", "q0"])
def _randn_kernel(
    seeds_ptr,  # [B] int64
    out_ptr,  # [B, n] float32 | float64 | float16 | bfloat16
    stream,  # uint32 value in [0, 2^32), passed as a Python int (i32 or i64 argument)
    q0,  # first group touched: offset >> 2 (int64 range)
    lane0,  # offset & 3: lane of output element 0 within group q0 (specialized)
    n,  # elements per sample (specialized)
    BLOCK: tl.constexpr,  # groups (of 4 elements) per program
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k0, k1 = seed_key(tl.load(seeds_ptr + b))

    g = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # [BLOCK] group relative to q0
    q = q0.to(tl.int64) + g
    z0, z1, z2, z3 = normal4(k0, k1, q, stream)  # noise_words takes stream mod 2^32 as uint32

    # [BLOCK, 4] tile: row = group, column = lane; output index of element (q, lane) is
    # 4 q + lane - offset = 4 g + lane - lane0.
    lane = tl.arange(0, 4)[None, :]
    z = select_lane(z0[:, None], z1[:, None], z2[:, None], z3[:, None], lane)
    # lane0 and n are specialized (Triton: == 1 -> a constexpr, % 16 == 0 -> known alignment, which makes the
    # stores 16-byte vectors: 2 st.global.v4 and no shared-memory shuffle for fp32, against 8 scalar stores and
    # 15 bar.sync unspecialized, sm_90 PTX); so no .to() on them: int64 arithmetic promotes them
    idx = g[:, None] * 4 + lane.to(tl.int64) - lane0
    mask = (idx >= 0) & (idx < n)
    tl.store(out_ptr + b * n + idx, store_cast(z, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _philox_kernel(
    ctr_ptr,  # [N, 4] int64, values in [0, 2^32)
    key_ptr,  # [N, 2] int64, values in [0, 2^32)
    out_ptr,  # [N, 4] int64
    N,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = i < N
    c0 = tl.load(ctr_ptr + 4 * i + 0, mask=m, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + 4 * i + 1, mask=m, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + 4 * i + 2, mask=m, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + 4 * i + 3, mask=m, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr + 2 * i + 0, mask=m, other=0).to(tl.uint32)
    k1 = tl.load(key_ptr + 2 * i + 1, mask=m, other=0).to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    # uint32 -> int64 is a zero extension.
    tl.store(out_ptr + 4 * i + 0, w0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=m)


def randn(seeds: torch.Tensor, stream: int, shape: tuple[int, ...], offset: int = 0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Spec-v1 normals: out[b].flatten()[i] = element (offset + i) of stream `stream` of seed seeds[b].

    seeds: int64 [B] on the target device (seeds >= 2^63 in two's complement); stream in [0, 2^32);
    offset >= 0 (64-bit). Returns [B, *shape] of `dtype` (computed in float32, cast on store).
    """
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError(f"seeds must be an int64 tensor [B], got {seeds.dtype} {tuple(seeds.shape)}")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    stream = int(stream)
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream must be in [0, 2^32), got {stream}")
    offset = int(offset)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if offset < 0 or offset + n > 2**64:
        raise ValueError(f"offset must be >= 0 and offset + numel <= 2^64, got {offset}")
    if offset + n > 2**63:  # q = e >> 2 must stay within int64 arithmetic in the kernel
        raise ValueError("offset + numel must be <= 2^63 on the Triton backend")
    B = seeds.shape[0]
    out = torch.empty((B, *shape), dtype=dtype, device=seeds.device)
    if n == 0 or B == 0:
        return out
    seeds = seeds.contiguous()

    q0 = offset >> 2
    lane0 = offset & 3
    n_groups = ((offset + n - 1) >> 2) - q0 + 1
    # The CPU interpreter pays per program, not per element: give it large blocks.
    block_max = 8192 if os.environ.get("TRITON_INTERPRET") == "1" else 256
    BLOCK = min(block_max, max(16, triton.next_power_of_2(n_groups)))
    out2 = out.view(B, n)
    with _device.on_device(seeds.device):
        for start in range(0, B, _MAX_GRID_Y):
            stop = min(B, start + _MAX_GRID_Y)
            grid = (triton.cdiv(n_groups, BLOCK), stop - start)
            _randn_kernel[grid](seeds[start:stop], out2[start:stop], stream, q0, lane0, n, BLOCK=BLOCK)
    return out


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 words: counter int64 [N, 4], key int64 [N, 2] (values in [0, 2^32)) -> int64 [N, 4]."""
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise ValueError("counter and key must be int64 tensors")
    if counter.dim() != 2 or counter.shape[1] != 4 or key.shape != (counter.shape[0], 2):
        raise ValueError(f"expected counter [N, 4] and key [N, 2], got {tuple(counter.shape)}, {tuple(key.shape)}")
    if key.device != counter.device:
        raise ValueError("counter and key must be on the same device")
    counter = counter.contiguous()
    key = key.contiguous()
    N = counter.shape[0]
    out = torch.empty((N, 4), dtype=torch.int64, device=counter.device)
    if N == 0:
        return out
    BLOCK = 128
    with _device.on_device(counter.device):
        _philox_kernel[(triton.cdiv(N, BLOCK),)](counter, key, out, N, BLOCK=BLOCK)
    return out
