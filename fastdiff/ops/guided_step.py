"""The fused sampler step (DESIGN.md §2): every first-order step, and the second-order and multistep
ones with one extra term, is

    g    = pred_uncond + cfg * (pred - pred_uncond)        (g = pred without pred_uncond)
    out  = c_x * x + c_pred * g + c_extra * extra + c_noise * noise(seeds, stream)
    side = s_x * x + s_pred * g + s_extra * extra          (optional second output)

elementwise per sample, with host-side float64 coefficients (fastdiff.sampling.coefficients) and
the noise of the spec-v1 stream (element i of sample b: seed seeds[b], stream ``stream``, offset 0).
``guided_step`` runs on the selected backend; ``guided_step_reference`` is the specification.

Tensors: x, extra, out, side float32 [B, *S]; pred, pred_uncond [B, *S] float32/float16/bfloat16
(one dtype). All math is float32. ``out`` may be ``x`` (in place) and ``side`` may be ``extra``:
each element reads its inputs before it writes.
"""

from __future__ import annotations

import torch

from fastdiff import _checks
from fastdiff import dispatch as _dispatch
from fastdiff.ops.randn import randn_reference

PRED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, pred, pred_uncond, extra, seeds, out, side, c_noise):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"x must be a float32 tensor (the sampler state), got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: [B, ...]")
    for name, t, dtypes in (("pred", pred, PRED_DTYPES), ("pred_uncond", pred_uncond, PRED_DTYPES),
                            ("extra", extra, (torch.float32,)), ("out", out, (torch.float32,)),
                            ("side", side, (torch.float32,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if pred_uncond is not None and pred_uncond.dtype != pred.dtype:
        raise TypeError(f"pred_uncond must have pred's dtype {pred.dtype}, got {pred_uncond.dtype}")
    if c_noise != 0:
        if seeds is None:
            raise ValueError("seeds are required when c_noise != 0")
        if seeds.shape != (x.shape[0],):
            raise ValueError(f"seeds must hold one seed per sample ({x.shape[0]}), got shape {tuple(seeds.shape)}")


def _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, c_noise):
    if seeds is not None:
        seeds = _checks.seeds_tensor(seeds, x.device)
    stream = _checks.stream_id(stream)
    _check(x, pred, pred_uncond, extra, seeds, out, side, c_noise)
    if seeds is None:
        seeds = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    return seeds, stream


def guided_step_reference(x, pred, pred_uncond=None, *, cfg=1.0, extra=None, seeds=None, stream=0,
                          c_x=1.0, c_pred=0.0, c_extra=0.0, c_noise=0.0, s_x=0.0, s_pred=0.0, s_extra=0.0,
                          out=None, side=None):
    """Pure-PyTorch specification of :func:`guided_step`; returns ``out`` (and writes ``side``)."""
    seeds, stream = _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, c_noise)
    f32 = torch.float32
    g = pred.to(f32)
    if pred_uncond is not None:
        u = pred_uncond.to(f32)
        g = u + f32_scalar(cfg, x) * (g - u)
    result = f32_scalar(c_x, x) * x + f32_scalar(c_pred, x) * g
    side_value = None
    if side is not None:
        side_value = f32_scalar(s_x, x) * x + f32_scalar(s_pred, x) * g
    if extra is not None:
        result = result + f32_scalar(c_extra, x) * extra
        if side_value is not None:
            side_value = side_value + f32_scalar(s_extra, x) * extra
    if c_noise != 0:
        noise = randn_reference(seeds, stream, tuple(x.shape[1:]), device=x.device, dtype=f32)
        result = result + f32_scalar(c_noise, x) * noise
    if side is not None:
        side.copy_(side_value)
    if out is None:
        return result
    out.copy_(result)
    return out


def f32_scalar(c, like):
    return torch.tensor(float(c), dtype=torch.float32, device=like.device)


def guided_step(x, pred, pred_uncond=None, *, cfg=1.0, extra=None, seeds=None, stream=0,
                c_x=1.0, c_pred=0.0, c_extra=0.0, c_noise=0.0, s_x=0.0, s_pred=0.0, s_extra=0.0,
                out=None, side=None, backend=None):
    """One fused sampler step on the selected backend; see the module docstring. Returns ``out``
    (a new tensor when ``out`` is None; pass ``out=x`` to update in place)."""
    seeds, stream = _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, c_noise)
    name = _dispatch.resolve(x.device, backend)
    coeffs = dict(cfg=cfg, c_x=c_x, c_pred=c_pred, c_extra=c_extra, c_noise=c_noise, s_x=s_x, s_pred=s_pred,
                  s_extra=s_extra)
    if name == "reference":
        return guided_step_reference(x, pred, pred_uncond, extra=extra, seeds=seeds, stream=stream, out=out,
                                     side=side, **coeffs)
    if out is None:
        out = torch.empty_like(x)
    tensors = [x, pred, pred_uncond, extra, out, side]
    if not all(t is None or t.is_contiguous() for t in tensors):
        raise ValueError("guided_step kernels need contiguous x, pred, pred_uncond, extra, out and side "
                         "(the sampler passes contiguous buffers; call .contiguous() on custom inputs)")
    if name == "triton":
        from fastdiff.kernels.guided_step import guided_step as triton_step

        triton_step(x, pred, pred_uncond, extra, seeds, stream, out, side, **coeffs)
        return out
    torch.ops.fastdiff.guided_step(x, pred, pred_uncond, extra, seeds, stream, float(cfg), float(c_x), float(c_pred),
                                   float(c_extra), float(c_noise), float(s_x), float(s_pred), float(s_extra), out, side)
    return out
