"""``FastDiffDDIMScheduler``: diffusers' DDIMScheduler with a fused step."""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep
from fastdiff.ops.guided_step import guided_step
from fastdiff.sampling.features.thresholding import DynamicThresholding


class FastDiffDDIMScheduler(_FusedStep, DDIMScheduler):
    """diffusers' ``DDIMScheduler`` with a fused ``step`` (DDIM, eta in [0, 1]; clip_sample and dynamic
    thresholding clamp the x0 estimate between the two fused passes)."""

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device)
        self._fd_timesteps = None

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Optional[torch.Generator] = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                             "scheduler")
        if variance_noise is not None:
            raise NotImplementedError("variance_noise: fastdiff draws the noise from per-sample seeds "
                                      "(scheduler.set_seeds); pass no variance_noise")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t].double())
        a_prev = float(self.alphas_cumprod[prev_t].double()) if prev_t >= 0 else float(self.final_alpha_cumprod)
        al, be, al1 = math.sqrt(a_t), math.sqrt(1.0 - a_t), math.sqrt(a_prev)
        ptype = self.config.prediction_type
        if ptype == "epsilon":  # x0 = ax x + ag g, eps = ex x + eg g
            ax, ag, ex, eg = 1.0 / al, -be / al, 0.0, 1.0
        elif ptype == "sample":
            ax, ag, ex, eg = 0.0, 1.0, 1.0 / be, -al / be
        elif ptype == "v_prediction":
            ax, ag, ex, eg = al, -be, be, al
        else:
            raise ValueError(f"prediction_type={ptype!r} is not supported; fastdiff's DDIM step takes epsilon, "
                             "sample or v_prediction")
        var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = eta * math.sqrt(max(var, 0.0))
        k = math.sqrt(max(1.0 - a_prev - std * std, 0.0))
        x, g = self._inputs(model_output, sample)
        seeds = self._seeds_for(x.shape[0], x.device) if std > 0 else None
        stream = self._stream(timestep) if std > 0 else 0
        prev = torch.empty_like(x)
        x0 = torch.empty_like(x)
        if self.config.thresholding or self.config.clip_sample:
            # x0 first, thresholded or clamped (diffusers' order), then the update with it as the extra input
            guided_step(x, g, c_x=ax, c_pred=ag, out=x0)
            if self.config.thresholding:
                x0.copy_(DynamicThresholding(self.config.dynamic_thresholding_ratio,
                                             self.config.sample_max_value).apply(x0))
            else:
                x0.clamp_(-self.config.clip_sample_range, self.config.clip_sample_range)
            if use_clipped_model_output:  # eps recomputed from the clamped x0
                c_x, c_p, c_e = k / be, 0.0, al1 - k * al / be
            else:
                c_x, c_p, c_e = k * ex, k * eg, al1
            guided_step(x, g, extra=x0, seeds=seeds, stream=stream, c_x=c_x, c_pred=c_p, c_extra=c_e, c_noise=std,
                        out=prev)
        else:
            guided_step(x, g, seeds=seeds, stream=stream, c_x=al1 * ax + k * ex, c_pred=al1 * ag + k * eg,
                        c_noise=std, s_x=ax, s_pred=ag, out=prev, side=x0)
        prev = prev.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
