"""The specification of noising and the diffusion loss, in pure PyTorch: ``add_noise_reference``,
``diffusion_loss_reference`` (and its residual and backward twins), the formulas of
fastdiff/ops/diffusion_loss.py's module docstring, with ε from ``randn_reference``. Float32 math
(float64 when a float64 tensor is involved, for gradcheck); differentiable by ordinary autograd.
"""

from __future__ import annotations

import math

import torch

from fastdiff._backends import register_kernel
from fastdiff.ops.randn import randn_reference


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


def _sample_numel(t):
    """Elements per sample n (also for B = 0, where t[0] does not exist)."""
    return math.prod(t.shape[1:])


@register_kernel("reference", "add_noise")
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


@register_kernel("reference", "diffusion_loss")
def diffusion_loss_reference(pred, z, coef_z, coef_eps, weight, seeds, stream):
    """Per-sample weighted MSE against target = coef_z z + coef_eps ε: [B] (float32, or float64 for
    float64 pred). Differentiable in pred through ordinary autograd."""
    return diffusion_loss_residual_reference(pred, z, coef_z, coef_eps, weight, seeds, stream)[0]


def diffusion_loss_residual_reference(pred, z, coef_z, coef_eps, weight, seeds, stream):
    """(diffusion_loss_reference, the residual pred − target [B, ...] in the compute dtype)."""
    B, f = pred.shape[0], _compute_dtype(pred, z)
    diff = pred.to(f) - _target(pred, z, coef_z, coef_eps, seeds, stream, f)
    # reshape(B, n), not (B, -1): -1 is ambiguous for empty inputs; the mean over n = 0 is NaN
    sq = diff.square().reshape(B, _sample_numel(pred))
    return _per_sample(weight, B, "weight", pred.device, f) * sq.mean(dim=1), diff


def grad_from_residual(grad_loss, residual, weight, dtype):
    """The backward from a stored residual: (grad_loss · weight · 2/n) · residual in ``dtype``, the same
    float32 operations in the same order as the fused backward kernel (bitwise equal results)."""
    B, n = residual.shape[0], _sample_numel(residual)
    if residual.numel() == 0:  # nothing to differentiate (and 2 / n undefined for n = 0)
        return torch.zeros(residual.shape, dtype=dtype, device=residual.device)
    scale = grad_loss.to(residual.dtype) * weight.to(residual.dtype) * (2.0 / n)
    return (scale.view(B, *([1] * (residual.dim() - 1))) * residual).to(dtype)


@register_kernel("reference", "diffusion_loss_backward")
def diffusion_loss_backward_reference(grad_loss, pred, z, coef_z, coef_eps, weight, seeds, stream):
    """∂(Σ_b grad_loss[b] loss[b]) / ∂pred, in pred's dtype."""
    B, f = pred.shape[0], _compute_dtype(pred, z)
    n = _sample_numel(pred)
    if pred.numel() == 0:  # empty gradient (B = 0 or n = 0; 2 / n undefined for n = 0)
        return torch.zeros_like(pred)
    shape = (B, *([1] * (pred.dim() - 1)))
    scale = (grad_loss.to(f) * _per_sample(weight, B, "weight", pred.device, f) * (2.0 / n)).view(shape)
    return (scale * (pred.to(f) - _target(pred, z, coef_z, coef_eps, seeds, stream, f))).to(pred.dtype)
