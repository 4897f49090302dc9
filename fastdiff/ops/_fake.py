"""Fake (meta) kernels of the torch.ops.fastdiff ops, so torch.compile can trace them."""

from __future__ import annotations

import torch

from fastdiff import _native

if _native.status.loaded:

    @torch.library.register_fake("fastdiff::randn")
    def _randn_fake(seeds, stream, shape, offset, dtype):
        return seeds.new_empty((seeds.shape[0], *shape), dtype=dtype)

    @torch.library.register_fake("fastdiff::philox4x32_10")
    def _philox_fake(counter, key):
        return torch.empty_like(counter)

if _native.status.loaded and hasattr(torch.ops.fastdiff, "guided_step"):

    @torch.library.register_fake("fastdiff::guided_step")
    def _guided_step_fake(x, pred, pred_uncond, extra, seeds, stream, cfg, c_x, c_pred, c_extra, c_noise, s_x, s_pred,
                          s_extra, out, side):
        return None  # writes out (and side) in place

if _native.status.loaded and hasattr(torch.ops.fastdiff, "diffusion_loss"):

    @torch.library.register_fake("fastdiff::add_noise")
    def _add_noise_fake(z, alpha, beta, seeds, stream):
        return torch.empty_like(z, dtype=torch.float32)

    @torch.library.register_fake("fastdiff::diffusion_loss")
    def _loss_fake(pred, z, coef_z, coef_eps, weight, seeds, stream):
        return pred.new_empty((pred.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("fastdiff::diffusion_loss_backward")
    def _loss_backward_fake(grad_loss, pred, z, coef_z, coef_eps, weight, seeds, stream):
        return torch.empty_like(pred)

    def _loss_setup_context(ctx, inputs, output):
        pred, z, coef_z, coef_eps, weight, seeds, stream = inputs
        ctx.save_for_backward(pred, z, coef_z, coef_eps, weight, seeds)
        ctx.stream = stream

    def _loss_backward(ctx, grad):
        pred, z, coef_z, coef_eps, weight, seeds = ctx.saved_tensors
        grad_pred = torch.ops.fastdiff.diffusion_loss_backward(grad.contiguous(), pred, z, coef_z, coef_eps, weight,
                                                               seeds, ctx.stream)
        return grad_pred, None, None, None, None, None, None

    if hasattr(torch.ops.fastdiff, "diffusion_loss_residual"):

        @torch.library.register_fake("fastdiff::diffusion_loss_residual")
        def _loss_residual_fake(pred, z, coef_z, coef_eps, weight, seeds, stream):
            return pred.new_empty((pred.shape[0],), dtype=torch.float32), torch.empty_like(pred, dtype=torch.float32)

    # one fused backward pass: ε is regenerated from the seeds, nothing but the inputs is saved
    torch.library.register_autograd("fastdiff::diffusion_loss", _loss_backward, setup_context=_loss_setup_context)
