"""The fused sampler step (docs/design.md §2): every first-order step, and the second-order and multistep
ones with one extra term, is

    g    = pred_uncond + cfg * (pred - pred_uncond)        (g = pred without pred_uncond)
    out  = c_x * x + c_pred * g + c_extra * extra + c_noise * noise(seeds, stream)
    side = s_x * x + s_pred * g + s_extra * extra          (optional second output)

elementwise per sample, with host-side coefficients (fastdiff.sampling.coefficients: finite real
numbers, each rounded to float32 as the kernels round it) and
the noise of the spec-v1 stream (element i of sample b: seed seeds[b], stream ``stream``, offset 0).
``guided_step`` runs on the selected backend; ``guided_step_reference`` is the specification.

Tensors: x, extra, out, side float32 [B, *S]; pred, pred_uncond [B, *S] float32/float16/bfloat16
(one dtype). All math is float32. ``out`` may be ``x`` (in place) and ``side`` may be ``extra``:
each element reads its inputs before it writes.

Autograd: the step is linear in x, pred, pred_uncond and extra; every backend differentiates the
returned ``out`` when ``out`` and ``side`` are None. The kernels' in-place form (``out=``/``side=``)
refuses inputs that require grad (the reference differentiates it through ``copy_``).
"""

from __future__ import annotations

import math
import numbers

import torch

from fastdiff import _checks, _native
from fastdiff import dispatch as _dispatch
from fastdiff.ops.randn import randn_reference

PRED_DTYPES = _checks.PRED_DTYPES
COEFFICIENTS = ("cfg", "c_x", "c_pred", "c_extra", "c_noise", "s_x", "s_pred", "s_extra")


def _coefficient(name, c) -> float:
    # float() would also take '1', True or a 1-element tensor (a host sync): only real numbers pass
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(c).__name__} {c!r}")
    c = float(c)
    if not math.isfinite(c):
        raise ValueError(f"{name} must be finite, got {c}")
    return c


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


def _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, coeffs):
    """(seeds, stream, coefficients as Python floats) after checking every argument."""
    coeffs = {name: _coefficient(name, coeffs[name]) for name in COEFFICIENTS}
    if seeds is not None:
        seeds = _checks.seeds_tensor(seeds, x.device)
    stream = _checks.stream_id(stream)
    _check(x, pred, pred_uncond, extra, seeds, out, side, coeffs["c_noise"])
    if seeds is None:
        seeds = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    return seeds, stream, coeffs


def guided_step_reference(x, pred, pred_uncond=None, *, cfg=1.0, extra=None, seeds=None, stream=0,
                          c_x=1.0, c_pred=0.0, c_extra=0.0, c_noise=0.0, s_x=0.0, s_pred=0.0, s_extra=0.0,
                          out=None, side=None):
    """Pure-PyTorch specification of :func:`guided_step`; returns ``out`` (and writes ``side``)."""
    seeds, stream, k = _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, {
        "cfg": cfg, "c_x": c_x, "c_pred": c_pred, "c_extra": c_extra, "c_noise": c_noise, "s_x": s_x, "s_pred": s_pred,
        "s_extra": s_extra})
    # The coefficients stay Python floats: a float times a float32 tensor is computed with the float
    # rounded to float32 (CPU and CUDA), exactly as the kernels, and creates no device tensor from host
    # data (torch.tensor(c, device=...) would be a host-to-device copy per coefficient per call, a sync
    # in eager mode and a capture error in a CUDA graph).
    f32 = torch.float32
    g = pred.to(f32)
    if pred_uncond is not None:
        u = pred_uncond.to(f32)
        g = u + k["cfg"] * (g - u)
    result = k["c_x"] * x + k["c_pred"] * g
    side_value = None
    if side is not None:
        side_value = k["s_x"] * x + k["s_pred"] * g
    if extra is not None:
        result = result + k["c_extra"] * extra
        if side_value is not None:
            side_value = side_value + k["s_extra"] * extra
    if k["c_noise"] != 0:
        noise = randn_reference(seeds, stream, tuple(x.shape[1:]), device=x.device, dtype=f32)
        result = result + k["c_noise"] * noise
    if side is not None:
        side.copy_(side_value)
    if out is None:
        return result
    out.copy_(result)
    return out


def _launch(name, x, pred, pred_uncond, extra, seeds, stream, out, side, k):
    """Runs the step kernel of backend ``name`` (writes out and side)."""
    tensors = [x, pred, pred_uncond, extra, out, side]
    if not all(t is None or t.is_contiguous() for t in tensors):
        raise ValueError("guided_step kernels need contiguous x, pred, pred_uncond, extra, out and side "
                         "(the sampler passes contiguous buffers; call .contiguous() on custom inputs)")
    if name == "triton":
        from fastdiff.kernels.guided_step import guided_step as triton_step

        triton_step(x, pred, pred_uncond, extra, seeds, stream, out, side, **k)
    else:
        torch.ops.fastdiff.guided_step(x, pred, pred_uncond, extra, seeds, stream, *(k[c] for c in COEFFICIENTS),
                                       out, side)


class _GuidedStep(torch.autograd.Function):
    """A kernel step returning a new ``out``, differentiable: the step is linear in x, pred, pred_uncond
    and extra (the noise is a constant), so the backward is the transposed combination of grad."""

    @staticmethod
    def forward(ctx, x, pred, pred_uncond, extra, seeds, stream, name, k):
        ctx.k, ctx.pred_dtype, ctx.has_uncond = k, pred.dtype, pred_uncond is not None
        out = torch.empty_like(x)
        _launch(name, x, pred, pred_uncond, extra, seeds, stream, out, None, k)
        return out

    @staticmethod
    def backward(ctx, grad):
        # The reference's autograd, op for op (grad_g = c_pred grad, then through u + cfg (p - u)), so
        # the gradients are the reference's bit for bit; linear in grad, so with create_graph these
        # ops give the double backward too.
        k, needs = ctx.k, ctx.needs_input_grad
        grad_x = k["c_x"] * grad if needs[0] else None
        grad_extra = k["c_extra"] * grad if needs[3] else None
        grad_pred = grad_uncond = None
        if needs[1] or needs[2]:
            grad_g = k["c_pred"] * grad
            if ctx.has_uncond:
                scaled = k["cfg"] * grad_g
                grad_pred = scaled.to(ctx.pred_dtype) if needs[1] else None
                grad_uncond = (grad_g - scaled).to(ctx.pred_dtype) if needs[2] else None
            else:
                grad_pred = grad_g.to(ctx.pred_dtype)
        return grad_x, grad_pred, grad_uncond, grad_extra, None, None, None, None


def guided_step(x, pred, pred_uncond=None, *, cfg=1.0, extra=None, seeds=None, stream=0,
                c_x=1.0, c_pred=0.0, c_extra=0.0, c_noise=0.0, s_x=0.0, s_pred=0.0, s_extra=0.0,
                out=None, side=None, backend=None):
    """One fused sampler step on the selected backend; see the module docstring. Returns ``out``
    (a new tensor when ``out`` is None; pass ``out=x`` to update in place)."""
    seeds, stream, k = _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, {
        "cfg": cfg, "c_x": c_x, "c_pred": c_pred, "c_extra": c_extra, "c_noise": c_noise, "s_x": s_x, "s_pred": s_pred,
        "s_extra": s_extra})
    name = _dispatch.resolve(x.device, backend)
    if name == "reference":
        return guided_step_reference(x, pred, pred_uncond, extra=extra, seeds=seeds, stream=stream, out=out,
                                     side=side, **k)
    inputs = {"x": x, "pred": pred, "pred_uncond": pred_uncond, "extra": extra}
    grad_inputs = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and grad_inputs:
        if out is not None or side is not None:
            raise RuntimeError(
                f"guided_step: {grad_inputs[0]} requires grad, but the {backend or name} kernel writes out=/side= in "
                "place, which autograd cannot differentiate; call it without out= and side= (it returns a new, "
                "differentiable out), or under torch.no_grad()")
        return _GuidedStep.apply(x, pred, pred_uncond, extra, seeds, stream, name, k)
    if out is None:
        out = torch.empty_like(x)
    _launch(name, x, pred, pred_uncond, extra, seeds, stream, out, side, k)
    return out


if _native.status.loaded and hasattr(torch.ops.fastdiff, "guided_step"):

    @torch.library.register_fake("fastdiff::guided_step")
    def _guided_step_fake(x, pred, pred_uncond, extra, seeds, stream, cfg, c_x, c_pred, c_extra, c_noise, s_x, s_pred,
                          s_extra, out, side):
        return None  # writes out (and side) in place
