"""Triton implementation of the fused sampler step (docs/design.md §2), ``guided_step_reference`` in
fastdiff/ops/guided_step.py being the specification:

    g    = pred_uncond + cfg * (pred - pred_uncond)        (g = pred without pred_uncond)
    out  = c_x * x + c_pred * g + c_extra * extra + c_noise * z
    side = s_x * x + s_pred * g + s_extra * extra

per sample b and element i (flattened C order within the sample), float32 math, z the spec-v1 normal
of (seeds[b], stream, element i, offset 0) (docs/design.md §3), drawn only when c_noise != 0.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""

import math
import os
import struct

import triton
import triton.language as tl

from . import _launch as _device
from .philox import normal_tile, sample_tile, seed_key

_MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1; larger batches are launched in chunks


@triton.jit(do_not_specialize=["stream", "cfg", "c_x", "c_pred", "c_extra", "c_noise", "s_x", "s_pred",
                               "s_extra"])
def _guided_step_kernel(
    x_ptr,  # [B, n] float32
    pred_ptr,  # [B, n] float32 | float16 | bfloat16
    uncond_ptr,  # [B, n] pred's dtype (dummy unless HAS_UNCOND)
    extra_ptr,  # [B, n] float32 (dummy unless HAS_EXTRA)
    seeds_ptr,  # [B] int64 (not read unless HAS_NOISE)
    out_ptr,  # [B, n] float32, may be x
    side_ptr,  # [B, n] float32 (dummy unless HAS_SIDE), may be extra
    stream,  # uint32 value in [0, 2^32), a Python int (i32 or i64 argument)
    n,  # elements per sample; may be specialized (== 1 -> constexpr, % 16 -> alignment): no .to() on it
    cfg, c_x, c_pred, c_extra, c_noise, s_x, s_pred, s_extra,  # float32 scalars
    HAS_UNCOND: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_SIDE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,  # groups (of 4 elements) per program
):
    b, q, offs, mask = sample_tile(n, BLOCK)  # [BLOCK, 4] tile of sample b: row = group q, column = lane

    # Every input is loaded before anything is stored (out may be x, side may be extra).
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    g = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = u + cfg * (g - u)
    if HAS_EXTRA:
        e = tl.load(extra_ptr + offs, mask=mask, other=0.0)

    res = c_x * x + c_pred * g
    if HAS_SIDE:
        sv = s_x * x + s_pred * g
    if HAS_EXTRA:
        res = res + c_extra * e
        if HAS_SIDE:
            sv = sv + s_extra * e
    if HAS_NOISE:
        k0, k1 = seed_key(tl.load(seeds_ptr + b))
        z = normal_tile(k0, k1, q, stream)
        res = res + c_noise * z

    tl.store(out_ptr + offs, res, mask=mask)
    if HAS_SIDE:
        tl.store(side_ptr + offs, sv, mask=mask)


def _f32(c) -> float:
    """float(c) rounded to the nearest float32 (as torch.tensor(c, dtype=float32) does), as a Python float."""
    c = float(c)
    try:
        return struct.unpack("f", struct.pack("f", c))[0]
    except OverflowError:  # finite float64 beyond float32's range rounds to +-inf
        return math.copysign(math.inf, c)


def guided_step(x, pred, pred_uncond, extra, seeds, stream, out, side, *, cfg, c_x, c_pred, c_extra, c_noise,
                s_x, s_pred, s_extra) -> None:
    """Writes ``out`` (and ``side`` if not None) in place; see the module docstring.

    x, extra, out, side: float32 [B, *S]; pred, pred_uncond: float32/float16/bfloat16 [B, *S] (one dtype);
    all contiguous on one device (``out`` may be ``x``, ``side`` may be ``extra``). seeds: int64 [B] on
    that device (read only when c_noise != 0); stream in [0, 2^32). Argument checks are the caller's
    (fastdiff.ops.guided_step); pred_uncond / extra / side may be None.
    """
    B = x.shape[0]
    n = x.numel() // B if B else 0
    if n == 0 or B == 0:
        return
    stream = int(stream)
    has_noise = float(c_noise) != 0.0
    BLOCK_MAX = 8192 if os.environ.get("TRITON_INTERPRET") == "1" else 256
    n_groups = triton.cdiv(n, 4)
    BLOCK = min(BLOCK_MAX, max(16, triton.next_power_of_2(n_groups)))
    coeffs = [_f32(c) for c in (cfg, c_x, c_pred, c_extra, c_noise, s_x, s_pred, s_extra)]

    x2 = x.view(B, n)
    p2 = pred.view(B, n)
    u2 = pred_uncond.view(B, n) if pred_uncond is not None else None
    e2 = extra.view(B, n) if extra is not None else None
    o2 = out.view(B, n)
    s2 = side.view(B, n) if side is not None else None
    sd = seeds if has_noise else None
    with _device.on_device(x.device):  # Triton launches on the current device and stream
        for start in range(0, B, _MAX_GRID_Y):
            stop = min(B, start + _MAX_GRID_Y)
            xs = x2[start:stop]
            grid = (triton.cdiv(n_groups, BLOCK), stop - start)
            _guided_step_kernel[grid](
                xs, p2[start:stop],
                u2[start:stop] if u2 is not None else p2[start:stop],
                e2[start:stop] if e2 is not None else xs,
                sd[start:stop] if sd is not None else xs,
                o2[start:stop],
                s2[start:stop] if s2 is not None else xs,
                stream, n, *coeffs,
                HAS_UNCOND=u2 is not None, HAS_EXTRA=e2 is not None, HAS_SIDE=s2 is not None, HAS_NOISE=has_noise,
                BLOCK=BLOCK,
            )
