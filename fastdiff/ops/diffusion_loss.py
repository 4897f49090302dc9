"""Noising and the fused training loss (DESIGN.md §4). ε is regenerated from the noise stream, never
stored: element i of sample b is the spec-v1 normal of (seeds[b], stream, i).

Kernel contract, with per-sample float32 coefficient vectors [B] computed from the path at t:

    add_noise:            x_t[b, i]  = alpha[b] z[b, i] + beta[b] ε[b, i]
    diffusion_loss:       loss[b]    = weight[b] / n · Σ_i (pred[b, i] − target[b, i])²
                          target     = coef_z[b] z[b, i] + coef_eps[b] ε[b, i]
    …_backward:           grad[b, i] = grad_loss[b] · weight[b] · 2 / n · (pred[b, i] − target[b, i])
    …_residual (CPU):     (loss, pred − target in float32), one pass; the backward is then a scaled copy

(n = elements per sample). Every prediction type's target is affine in (z, ε): velocity
α̇ z + β̇ ε, eps ε, x0 z, score −ε/β. ``*_reference`` are the pure-PyTorch specifications.
"""

from __future__ import annotations

import torch

from fastdiff import _checks
from fastdiff import dispatch as _dispatch
from fastdiff.ops.randn import randn_reference

PRED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(*tensors):
    """float32 math, as the kernels do; float64 when a float64 tensor is involved (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _noise(seeds, stream, like, dtype=torch.float32):
    return randn_reference(seeds, stream, tuple(like.shape[1:]), device=like.device, dtype=dtype)


def _per_sample(v, B, name, device, dtype=torch.float32):
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [B], got {type(v).__name__}")
    if v.shape != (B,):
        raise ValueError(f"{name} must have shape [B] = [{B}], got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the data is on {device}")
    return v.to(dtype)


def _samples(t, B, name):
    if t.dim() < 1 or t.shape[0] != B:
        raise ValueError(f"{name} must have shape [B, ...] with B = {B}, got {tuple(t.shape)}")


def add_noise_reference(z, alpha, beta, seeds, stream):
    """x_t = alpha z + beta ε (per-sample alpha, beta [B]); float32 (float64 for float64 z)."""
    B, f = z.shape[0], _compute_dtype(z)
    shape = (B, *([1] * (z.dim() - 1)))
    a = _per_sample(alpha, B, "alpha", z.device, f).view(shape)
    s = _per_sample(beta, B, "beta", z.device, f).view(shape)
    return a * z.to(f) + s * _noise(seeds, stream, z, f)


def _target(pred, z, coef_z, coef_eps, seeds, stream, f):
    B = pred.shape[0]
    shape = (B, *([1] * (pred.dim() - 1)))
    cz = _per_sample(coef_z, B, "coef_z", pred.device, f).view(shape)
    ce = _per_sample(coef_eps, B, "coef_eps", pred.device, f).view(shape)
    return cz * z.to(f) + ce * _noise(seeds, stream, z, f)


def diffusion_loss_reference(pred, z, coef_z, coef_eps, weight, seeds, stream):
    """Per-sample weighted MSE against target = coef_z z + coef_eps ε: [B] (float32, or float64 for
    float64 pred). Differentiable in pred through ordinary autograd."""
    return diffusion_loss_residual_reference(pred, z, coef_z, coef_eps, weight, seeds, stream)[0]


def diffusion_loss_residual_reference(pred, z, coef_z, coef_eps, weight, seeds, stream):
    """(diffusion_loss_reference, the residual pred − target [B, ...] in the compute dtype)."""
    B, f = pred.shape[0], _compute_dtype(pred, z)
    diff = pred.to(f) - _target(pred, z, coef_z, coef_eps, seeds, stream, f)
    return _per_sample(weight, B, "weight", pred.device, f) * diff.square().reshape(B, -1).mean(dim=1), diff


def grad_from_residual(grad_loss, residual, weight, dtype):
    """The backward from a stored residual: (grad_loss · weight · 2/n) · residual in ``dtype``, the same
    float32 operations in the same order as the fused backward kernel (bitwise equal results)."""
    B, n = residual.shape[0], residual[0].numel()
    scale = grad_loss.to(residual.dtype) * weight.to(residual.dtype) * (2.0 / n)
    return (scale.view(B, *([1] * (residual.dim() - 1))) * residual).to(dtype)


def diffusion_loss_backward_reference(grad_loss, pred, z, coef_z, coef_eps, weight, seeds, stream):
    """∂(Σ_b grad_loss[b] loss[b]) / ∂pred, in pred's dtype."""
    B, f = pred.shape[0], _compute_dtype(pred, z)
    n = pred[0].numel()
    shape = (B, *([1] * (pred.dim() - 1)))
    scale = (grad_loss.to(f) * _per_sample(weight, B, "weight", pred.device, f) * (2.0 / n)).view(shape)
    return (scale * (pred.to(f) - _target(pred, z, coef_z, coef_eps, seeds, stream, f))).to(pred.dtype)


# ---- public ops -------------------------------------------------------------------------------------

def _check_data(name, t, B=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [B, ...], got {type(t).__name__}")
    if t.dtype not in PRED_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 on the reference backend), got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension [B, ...]")
    if B is not None and t.shape[0] != B:
        raise ValueError(f"{name} must have {B} samples, got shape {tuple(t.shape)}")


def _times(t, B, device):
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.full((B,), float(t), dtype=torch.float64, device=device)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"t must be a float or a float tensor [B], got {type(t).__name__}")
    if t.shape != (B,):
        raise ValueError(f"t must have shape [B] = [{B}] (one time per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"t is on {t.device} but the data is on {device}")
    return t.to(torch.float64)


def _seeds_and_stream(seeds, stream, B, device):
    seeds = _checks.seeds_tensor(seeds, device)
    if seeds.shape != (B,):
        raise ValueError(f"seeds must hold one seed per sample ({B}), got shape {tuple(seeds.shape)}")
    return seeds, _checks.stream_id(stream)


def target_coefficients(path, t, prediction):
    """(coef_z, coef_eps) [B] float64 with target = coef_z z + coef_eps ε for each prediction type."""
    al, be, dal, dbe = path.coefficients(t)
    if prediction == "velocity":
        return dal, dbe
    if prediction == "eps":
        return torch.zeros_like(t), torch.ones_like(t)
    if prediction == "x0":
        return torch.ones_like(t), torch.zeros_like(t)
    return torch.zeros_like(t), -1.0 / be  # score: -ε / β (infinite where β = 0)


def _kernel_args(pred, z, t, seeds, stream, path, prediction, weight):
    from fastdiff.paths import check_prediction, get_path

    path, prediction = get_path(path), check_prediction(prediction)
    _check_data("pred", pred)
    _check_data("z", z, pred.shape[0])
    if z.shape != pred.shape:
        raise ValueError(f"z must have pred's shape {tuple(pred.shape)}, got {tuple(z.shape)}")
    B, device = pred.shape[0], pred.device
    if z.device != device:
        raise ValueError(f"z is on {z.device} but pred is on {device}")
    t = _times(t, B, device)
    seeds, stream = _seeds_and_stream(seeds, stream, B, device)
    cz, ce = target_coefficients(path, t, prediction)
    w = torch.ones(B, dtype=torch.float32, device=device) if weight is None else \
        _per_sample(weight, B, "weight", device).detach()
    return cz.to(torch.float32), ce.to(torch.float32), w, seeds, stream


def add_noise(z, t, seeds, stream, path="condot", *, backend=None) -> torch.Tensor:
    """x_t = α_t z + β_t ε with ε from the noise stream (seeds [B], stream id), t [B] per sample."""
    from fastdiff.paths import get_path

    _check_data("z", z)
    B = z.shape[0]
    t = _times(t, B, z.device)
    seeds, stream = _seeds_and_stream(seeds, stream, B, z.device)
    al, be = get_path(path).coefficients(t)[:2]
    alpha, beta = al.to(torch.float32), be.to(torch.float32)
    name = _dispatch.resolve(z.device, backend)
    if name == "reference" or z.dtype == torch.float64:
        return add_noise_reference(z, alpha, beta, seeds, stream)
    z = z.contiguous()
    if name == "triton":
        from fastdiff.kernels.loss import add_noise as triton_add_noise

        return triton_add_noise(z, alpha, beta, seeds, stream)
    return torch.ops.fastdiff.add_noise(z, alpha, beta, seeds, stream)


class _TritonLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, z, cz, ce, w, seeds, stream):
        from fastdiff.kernels.loss import diffusion_loss as triton_loss

        ctx.save_for_backward(pred, z, cz, ce, w, seeds)
        ctx.stream = stream
        return triton_loss(pred, z, cz, ce, w, seeds, stream)

    @staticmethod
    def backward(ctx, grad):
        from fastdiff.kernels.loss import diffusion_loss_backward as triton_backward

        pred, z, cz, ce, w, seeds = ctx.saved_tensors
        return triton_backward(grad.contiguous(), pred, z, cz, ce, w, seeds, ctx.stream), None, None, None, None, None, None


def _has_residual_op():
    return hasattr(torch.ops.fastdiff, "diffusion_loss_residual")


class _ResidualLoss(torch.autograd.Function):
    """The CPU path when pred needs a gradient: the forward also stores the residual pred − target
    (float32, one array of pred's shape), so the backward is a scaled copy instead of a second pass over
    the noise. On a CPU the normals cost far more than the memory: measured (2 threads, N = 2^22 fp32, AVX2
    loops) noising + loss + backward went from 27.9 ms (ε drawn three times) to 21.6 ms. On a GPU the
    noise is nearly free, so CUDA and Triton regenerate ε in the backward and store nothing."""

    @staticmethod
    def forward(ctx, pred, z, cz, ce, w, seeds, stream):
        loss, residual = torch.ops.fastdiff.diffusion_loss_residual(pred, z, cz, ce, w, seeds, stream)
        ctx.save_for_backward(residual, w)
        ctx.pred_dtype = pred.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        residual, w = ctx.saved_tensors
        return grad_from_residual(grad, residual, w, ctx.pred_dtype), None, None, None, None, None, None


def diffusion_loss(pred, z, t, seeds, stream, path="condot", prediction="velocity", weight=None,
                   reduction="mean", *, backend=None) -> torch.Tensor:
    """Weighted MSE between ``pred`` and the target of ``prediction`` for x_t = α_t z + β_t ε, with ε
    regenerated from (seeds, stream) — the same ε that :func:`add_noise` used — never stored.

    Differentiable in ``pred`` (one fused backward pass). ``weight`` [B] scales each sample's loss
    (e.g. min-SNR-γ); ``reduction`` "mean" (over samples), "sum" or "none" ([B]).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    cz, ce, w, seeds, stream = _kernel_args(pred, z, t, seeds, stream, path, prediction, weight)
    name = _dispatch.resolve(pred.device, backend)
    if name == "reference" or pred.dtype == torch.float64 or z.dtype == torch.float64:
        per_sample = diffusion_loss_reference(pred, z, cz, ce, w, seeds, stream)
    else:
        pred, z = pred.contiguous(), z.contiguous()
        if name == "triton":
            per_sample = _TritonLoss.apply(pred, z, cz, ce, w, seeds, stream)
        elif name == "cpu" and pred.requires_grad and torch.is_grad_enabled() and _has_residual_op():
            per_sample = _ResidualLoss.apply(pred, z, cz, ce, w, seeds, stream)
        else:
            per_sample = torch.ops.fastdiff.diffusion_loss(pred, z, cz, ce, w, seeds, stream)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample
