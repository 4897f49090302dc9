"""Fake (meta) kernels of torch.ops.fastdiff.randn and guided_step, so torch.compile can trace them. (The
other ops register theirs, and their autograd, under their Python wrappers: fastdiff/ops/philox.py,
diffusion_loss.py.)"""

from __future__ import annotations

import torch

from fastdiff import _native

if _native.status.loaded:

    @torch.library.register_fake("fastdiff::randn")
    def _randn_fake(seeds, stream, shape, offset, dtype):
        return seeds.new_empty((seeds.shape[0], *shape), dtype=dtype)

if _native.status.loaded and hasattr(torch.ops.fastdiff, "guided_step"):

    @torch.library.register_fake("fastdiff::guided_step")
    def _guided_step_fake(x, pred, pred_uncond, extra, seeds, stream, cfg, c_x, c_pred, c_extra, c_noise, s_x, s_pred,
                          s_extra, out, side):
        return None  # writes out (and side) in place
