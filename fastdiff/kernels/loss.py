"""Triton implementation of noising and the fused training loss (docs/design.md §4), the references in
fastdiff/ops/diffusion_loss.py being the specification:

    add_noise:                x_t[b, i]  = alpha[b] z[b, i] + beta[b] ε[b, i]                  float32
    diffusion_loss:           loss[b]    = weight[b] / n · Σ_i (pred[b, i] − target[b, i])²   float32 [B]
    diffusion_loss_backward:  grad[b, i] = grad_loss[b] · weight[b] · 2 / n · (pred − target)  pred's dtype
                              target     = coef_z[b] z[b, i] + coef_eps[b] ε[b, i]

per sample b and element i (flattened C order within the sample, n elements per sample), float32 math,
ε the spec-v1 normal of (seeds[b], stream, element i, offset 0) (docs/design.md §3), regenerated, never
stored.

The loss sums as the C++ kernels do (csrc/include/fastdiff/loss.h): each r² = (pred − target)² in
float32, the 4 squares of a group added in float32, everything beyond in float64. Each program writes
the float64 sum of its block of one sample into a [B, nblocks] buffer (no atomics; the block size
depends only on n and on the backend), torch adds the partials of each sample in float64
(``partials.sum(dim=1)``, a fixed order) and loss[b] = float32(weight[b] · (sum / n)), computed in
float64 and rounded once. Deterministic run to run.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""

import os

import torch
import triton
import triton.language as tl

from . import _launch as _device
from .philox import normal_tile, sample_tile, seed_key, store_cast

_MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1; larger batches are launched in chunks

_MODE_ADD_NOISE = 0
_MODE_LOSS = 1
_MODE_BACKWARD = 2


@triton.jit(do_not_specialize=["stream"])
def _loss_kernel(
    pred_ptr,  # [B, n] float32 | float16 | bfloat16 (dummy in MODE 0)
    z_ptr,  # [B, n] float32 | float16 | bfloat16
    cz_ptr,  # [B] float32: alpha (MODE 0) or coef_z
    ce_ptr,  # [B] float32: beta (MODE 0) or coef_eps
    scale_ptr,  # [B] float32: grad_loss * weight * 2 / n (read only in MODE 2)
    seeds_ptr,  # [B] int64
    out_ptr,  # MODE 0: [B, n] float32; MODE 1: [B, nblocks] float64 partial sums; MODE 2: [B, n] pred's dtype
    stream,  # uint32 value in [0, 2^32), a Python int (i32 or i64 argument)
    n,  # elements per sample; may be specialized (== 1 -> constexpr, % 16 -> alignment): no .to() on it
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,  # groups (of 4 elements) per program
):
    b, q, offs, mask = sample_tile(n, BLOCK)  # [BLOCK, 4] tile of sample b: row = group q, column = lane

    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE != 0:
        p = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cz = tl.load(cz_ptr + b)
    ce = tl.load(ce_ptr + b)

    k0, k1 = seed_key(tl.load(seeds_ptr + b))
    eps = normal_tile(k0, k1, q, stream)
    target = cz * z + ce * eps

    if MODE == 0:
        tl.store(out_ptr + offs, target, mask=mask)
    elif MODE == 1:
        d = tl.where(mask, p - target, 0.0)
        # float32 squares, a group's 4 added in float32, the groups in float64 (loss.h's precision)
        s = tl.sum(tl.sum(d * d, axis=1).to(tl.float64), axis=0)
        tl.store(out_ptr + b * tl.num_programs(0) + tl.program_id(0), s)
    else:
        g = tl.load(scale_ptr + b) * (p - target)
        tl.store(out_ptr + offs, store_cast(g, out_ptr.dtype.element_ty), mask=mask)


def _block(n_groups: int) -> int:
    block_max = 8192 if os.environ.get("TRITON_INTERPRET") == "1" else 256
    return min(block_max, max(16, triton.next_power_of_2(n_groups)))


def _vec(v, device) -> torch.Tensor:
    return v.to(device=device, dtype=torch.float32).contiguous()


def _launch(mode, pred2, z2, cz, ce, scale, seeds, out, stream, n, BLOCK):
    """Launches over (blocks, samples) with the sample axis chunked to the grid-y limit."""
    B = z2.shape[0]
    n_blocks = triton.cdiv(triton.cdiv(n, 4), BLOCK)
    with _device.on_device(z2.device):  # Triton launches on the current device and stream
        for start in range(0, B, _MAX_GRID_Y):
            stop = min(B, start + _MAX_GRID_Y)
            zs = z2[start:stop]
            _loss_kernel[(n_blocks, stop - start)](
                pred2[start:stop] if pred2 is not None else zs,
                zs, cz[start:stop], ce[start:stop],
                scale[start:stop] if scale is not None else cz[start:stop],
                seeds[start:stop], out[start:stop],
                stream, n, MODE=mode, BLOCK=BLOCK,
            )


def add_noise(z, alpha, beta, seeds, stream) -> torch.Tensor:
    """x_t = alpha[b] z + beta[b] ε: float32 with z's shape.

    z: float32/float16/bfloat16 [B, ...] contiguous; alpha, beta: float32 [B]; seeds: int64 [B]; all on
    one device; stream in [0, 2^32). Argument checks are the caller's (fastdiff.ops).
    """
    B = z.shape[0]
    out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    n = z.numel() // B if B else 0
    if B == 0 or n == 0:
        return out
    z2 = z.reshape(B, n)
    _launch(_MODE_ADD_NOISE, None, z2, _vec(alpha, z.device), _vec(beta, z.device), None,
            seeds.contiguous(), out.view(B, n), int(stream), n, _block(triton.cdiv(n, 4)))
    return out


def diffusion_loss(pred, z, coef_z, coef_eps, weight, seeds, stream) -> torch.Tensor:
    """loss[b] = weight[b] / n Σ_i (pred − (coef_z[b] z + coef_eps[b] ε))²: float32 [B], deterministic.

    pred, z: float32/float16/bfloat16 [B, ...] contiguous, same shape (dtypes may differ); coef_z,
    coef_eps, weight: float32 [B]; seeds: int64 [B]; stream in [0, 2^32).
    """
    B = pred.shape[0]
    device = pred.device
    w = _vec(weight, device)
    n = pred.numel() // B if B else 0
    if B == 0 or n == 0:
        # The reference's mean over no elements: nan (times weight).
        return w * torch.full((B,), float("nan"), dtype=torch.float32, device=device)
    BLOCK = _block(triton.cdiv(n, 4))
    n_blocks = triton.cdiv(triton.cdiv(n, 4), BLOCK)
    partials = torch.empty((B, n_blocks), dtype=torch.float64, device=device)
    _launch(_MODE_LOSS, pred.reshape(B, n), z.reshape(B, n), _vec(coef_z, device), _vec(coef_eps, device),
            None, seeds.contiguous(), partials, int(stream), n, BLOCK)
    # loss.h's loss_from_sum: weight * (sum / n) in float64, rounded once
    return (w.double() * (partials.sum(dim=1) / n)).float()


def diffusion_loss_backward(grad_loss, pred, z, coef_z, coef_eps, weight, seeds, stream) -> torch.Tensor:
    """grad[b, i] = grad_loss[b] weight[b] 2 / n (pred − target), in pred's dtype and shape.

    Arguments as diffusion_loss; grad_loss: float32 [B].
    """
    B = pred.shape[0]
    device = pred.device
    out = torch.empty(pred.shape, dtype=pred.dtype, device=device)
    n = pred.numel() // B if B else 0
    if B == 0 or n == 0:
        return out
    # Per-sample scale, rounded as the reference rounds it (float32 products, 2/n as a float32 scalar).
    scale = (_vec(grad_loss, device) * _vec(weight, device) * (2.0 / n)).contiguous()
    _launch(_MODE_BACKWARD, pred.reshape(B, n), z.reshape(B, n), _vec(coef_z, device), _vec(coef_eps, device),
            scale, seeds.contiguous(), out.view(B, n), int(stream), n, _block(triton.cdiv(n, 4)))
    return out
