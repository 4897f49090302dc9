"""Noising and the fused loss at per-sample flow times on a built-in path, one op per direction
(docs/design.md §4): ``torch.ops.fastdiff.add_noise_at``, ``diffusion_loss_at`` (CPU: ``…_residual``) and
``diffusion_loss_at_backward`` (CPU: ``diffusion_loss_residual_backward``) take t [B] and the path's code and
parameters (:meth:`GaussianPath.kernel_path`) and compute α_t, β_t and the target's coefficients themselves
(csrc/include/fastdiff/gaussian_path.h, the float64 formulas of fastdiff/gaussian_paths.py): on the host in
the CPU op, on the device in a kernel of a thread per sample ahead of the streaming kernel on CUDA.

:func:`fastdiff.ops.add_noise` and :func:`fastdiff.ops.diffusion_loss` take this route on the native backends
whenever t needs no gradient: add_noise + loss forward + backward went from 85 ATen ops (VP; three of them
host reads of t) to 8 with no host read (tests/test_loss_at_times.py counts them). A bad t is refused by the
CPU op before any work and becomes NaN for its sample on the GPU (no host sync), as on the coefficient path.

Autograd: the loss in pred by the fused backward (CPU: the stored residual, scaled); a double backward or a
gradient in z regenerates ε with torch ops on the coefficients computed in Python, as the coefficient path
does. These ops are not differentiable in t: fastdiff.ops routes a t that needs a gradient to the coefficient
path.
"""

from __future__ import annotations

import torch

from fastdiff import _native
from fastdiff import dispatch as _dispatch
from fastdiff.gaussian_paths import path_from_kernel
from fastdiff.ops.loss_gradients import loss_grads, native_backend, target_coefficients

# PairKind in gaussian_path.h: what the op's second coefficient pair is
PREDICTION_CODES = {"velocity": 1, "eps": 2, "x0": 3, "score": 4, "v": 5}  # gaussian_path.h PairKind
PREDICTION_NAMES = {code: name for name, code in PREDICTION_CODES.items()}


def available(backend: str) -> bool:
    """Whether ``backend`` registered the ops at times (fastdiff/_backends/native_ops.py: cpu and cuda)."""
    return _dispatch.has_kernel(backend, "add_noise_at") and _dispatch.has_kernel(backend, "diffusion_loss_at")


def _pairs(t, path_code, params, pair):
    """float32 [B] coefficient pairs from Python (gradients that need them as tensors), as the kernel has them."""
    path, t = path_from_kernel(path_code, params), t.detach().to(torch.float64)
    if pair == 0:
        c0, c1 = path.coefficients(t)[:2]
    else:
        c0, c1 = target_coefficients(path, t, PREDICTION_NAMES[pair])
    nan = torch.where((t >= 0) & (t <= 1), 0.0, torch.nan)  # a bad time is NaN, as in the kernel
    return (c0 + nan).to(torch.float32), (c1 + nan).to(torch.float32)


def _refuse_time_gradient(needs_t, op):
    if needs_t:
        raise RuntimeError(f"torch.ops.fastdiff.{op} is not differentiable in t; fastdiff.ops.add_noise / "
                           "diffusion_loss differentiate t through the path's coefficients")


def _call(backend, op, needs_grad, *args):
    """The backend's op; below autograd where nothing needs a gradient: torch.library.register_autograd runs a
    Python wrapper even then (measured on the CPU: 11 µs a call through it, 6 µs below it)."""
    overload = _dispatch.kernel(backend, op).direct()
    if needs_grad:
        return overload(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return overload(*args)


def add_noise_at(z, t, seeds, stream, kernel_path, backend):
    code, params = kernel_path
    return _call(backend, "add_noise_at", z.requires_grad and torch.is_grad_enabled(), z, t, seeds, stream, code,
                 list(params))


def _weight_or_ones(weight, like):
    return torch.ones(like.shape[0], dtype=torch.float32, device=like.device) if weight is None else weight


def _loss_grads_at(needs, grad, pred, z, t, weight, seeds, stream, code, params, prediction, backend):
    """(grad_pred, grad_z) through the coefficient path's torch-op gradients (double backward, or z)."""
    cz, ce = _pairs(t, code, params, prediction)
    grads = loss_grads((needs[0], needs[1], False, False), grad, pred, z, cz, ce, _weight_or_ones(weight, pred),
                        seeds, stream, backend)
    return grads[0], grads[1]


class _ResidualLossAt(torch.autograd.Function):
    """The CPU's loss at times when pred needs a gradient: the forward also keeps pred − target (float32), so
    the backward is a scaled copy (fastdiff.ops.diffusion_loss._KernelLoss says why: 27.9 → 21.6 ms)."""

    @staticmethod
    def forward(ctx, pred, z, t, weight, seeds, stream, code, params, prediction, backend):
        loss, residual = _call(backend, "diffusion_loss_at_residual", False, pred, z, t, weight, seeds, stream, code,
                               params, prediction)
        ctx.save_for_backward(pred, z, t, weight, seeds, residual)
        ctx.args, ctx.backend = (stream, code, params, prediction), backend
        return loss

    @staticmethod
    def backward(ctx, grad):
        pred, z, t, weight, seeds, residual = ctx.saved_tensors
        _refuse_time_gradient(ctx.needs_input_grad[2], "diffusion_loss_at_residual")
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled() or needs[1]:
            grads = _loss_grads_at(needs, grad, pred, z, t, weight, seeds, *ctx.args, ctx.backend)
        else:
            grads = (torch.ops.fastdiff.diffusion_loss_residual_backward(grad, residual, weight, pred.dtype), None)
        return (*grads, None, None, None, None, None, None, None, None)


def diffusion_loss_at(pred, z, t, weight, seeds, stream, kernel_path, prediction, backend):
    """Per-sample losses [B] float32 at times t; ``prediction`` a name of fastdiff.paths."""
    code, params = kernel_path
    params, pair = list(params), PREDICTION_CODES[prediction]
    if (_dispatch.has_kernel(backend, "diffusion_loss_at_residual") and pred.requires_grad
            and torch.is_grad_enabled()):
        return _ResidualLossAt.apply(pred, z, t, weight, seeds, stream, code, params, pair, backend)
    needs_grad = (pred.requires_grad or z.requires_grad) and torch.is_grad_enabled()
    return _call(backend, "diffusion_loss_at", needs_grad, pred, z, t, weight, seeds, stream, code, params, pair)


if _native.status.loaded and hasattr(torch.ops.fastdiff, "add_noise_at"):

    @torch.library.register_fake("fastdiff::add_noise_at")
    def _add_noise_at_fake(z, t, seeds, stream, path, path_params):
        return torch.empty_like(z, dtype=torch.float32, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastdiff::diffusion_loss_at")
    def _loss_at_fake(pred, z, t, weight, seeds, stream, path, path_params, prediction):
        return pred.new_empty((pred.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("fastdiff::diffusion_loss_at_residual")
    def _loss_at_residual_fake(pred, z, t, weight, seeds, stream, path, path_params, prediction):
        return (pred.new_empty((pred.shape[0],), dtype=torch.float32),
                torch.empty_like(pred, dtype=torch.float32, memory_format=torch.contiguous_format))

    @torch.library.register_fake("fastdiff::diffusion_loss_at_backward")
    def _loss_at_backward_fake(grad_loss, pred, z, t, weight, seeds, stream, path, path_params, prediction):
        return torch.empty_like(pred, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastdiff::diffusion_loss_residual_backward")
    def _residual_backward_fake(grad_loss, residual, weight, dtype):
        return torch.empty_like(residual, dtype=dtype, memory_format=torch.contiguous_format)

    def _add_noise_at_setup(ctx, inputs, output):
        z, t, seeds, stream, path, path_params = inputs
        ctx.save_for_backward(t)
        ctx.args, ctx.z_dtype = (path, path_params), z.dtype

    def _add_noise_at_backward(ctx, grad):
        (t,) = ctx.saved_tensors
        _refuse_time_gradient(ctx.needs_input_grad[1], "add_noise_at")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        alpha, _ = _pairs(t, *ctx.args, 0)
        shape = (grad.shape[0], *([1] * (grad.dim() - 1)))
        return (alpha.view(shape) * grad.to(torch.float32)).to(ctx.z_dtype), None, None, None, None, None

    # an encoder upstream of z gets its gradient (alpha grad, as the reference)
    torch.library.register_autograd("fastdiff::add_noise_at", _add_noise_at_backward, setup_context=_add_noise_at_setup)

    def _loss_at_setup(ctx, inputs, output):
        pred, z, t, weight, seeds, stream, path, path_params, prediction = inputs
        ctx.save_for_backward(pred, z, t, weight, seeds)
        ctx.args = (stream, path, path_params, prediction)

    def _loss_at_backward(ctx, grad):
        pred, z, t, weight, seeds = ctx.saved_tensors
        needs = ctx.needs_input_grad
        _refuse_time_gradient(needs[2], "diffusion_loss_at")
        if torch.is_grad_enabled() or needs[1]:
            grads = _loss_grads_at(needs, grad, pred, z, t, weight, seeds, *ctx.args, native_backend(pred))
        elif needs[0]:  # the fused backward: one op, the coefficients again from t in the op
            grads = (torch.ops.fastdiff.diffusion_loss_at_backward(grad, pred, z, t, weight, seeds, *ctx.args), None)
        else:
            grads = (None, None)
        return (*grads, None, None, None, None, None, None, None)

    # one fused backward pass: ε regenerated from the seeds, the coefficients from t; nothing else saved
    torch.library.register_autograd("fastdiff::diffusion_loss_at", _loss_at_backward, setup_context=_loss_at_setup)



__all__ = ["PREDICTION_CODES", "add_noise_at", "available", "diffusion_loss_at"]
