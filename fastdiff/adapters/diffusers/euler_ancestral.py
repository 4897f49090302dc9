"""``FastDiffEulerAncestralScheduler``: diffusers' EulerAncestralDiscreteScheduler with a fused step."""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep
from fastdiff.ops.guided_step import guided_step
from fastdiff.sampling.methods.sigma_space import ancestral_step


class FastDiffEulerAncestralScheduler(_FusedStep, EulerAncestralDiscreteScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` with a fused ``step``: the Euler step to sigma_down
    plus sigma_up fresh noise (eta = 1), the x0 prediction as a side output, in one kernel pass. The
    noise is fastdiff's per-sample stream (``set_seeds``; stream 1 + step index), not the generator's."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        sigma, sigma_next = self._step_sigmas(timestep)
        # x0 = ax x + ag g; diffusers' Euler ancestral step has no "sample" prediction either
        ax, ag = self._x0_coefficients(sigma, "diffusers' Euler ancestral step", sample_ok=False)
        down, up = ancestral_step(sigma, sigma_next, 1.0)
        r = (down - sigma) / sigma  # x' = x + (x - x0) (sigma_down - sigma) / sigma + sigma_up xi
        x, g = self._inputs(model_output, sample)
        seeds = self._seeds_for(x.shape[0], x.device) if up > 0 else None
        prev, x0 = torch.empty_like(x), torch.empty_like(x)
        guided_step(x, g, seeds=seeds, stream=1 + self.step_index, c_x=1.0 + r * (1.0 - ax), c_pred=-r * ag,
                    c_noise=up, s_x=ax, s_pred=ag, out=prev, side=x0)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
