"""``FastDiffEulerAncestralScheduler``: diffusers' EulerAncestralDiscreteScheduler with a fused step."""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep
from fastdiff.ops.guided_step import guided_step


class FastDiffEulerAncestralScheduler(_FusedStep, EulerAncestralDiscreteScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` with a fused ``step``: the Euler step to sigma_down
    plus sigma_up fresh noise (eta = 1), the x0 prediction as a side output, in one kernel pass. The
    noise is fastdiff's per-sample stream (``set_seeds``; stream 1 + step index), not the generator's."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):  # as diffusers' own check
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to step() is "
                             "not supported; pass one of scheduler.timesteps")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index].double())
        sigma_next = float(self.sigmas[self.step_index + 1].double())
        # x0 = ax x + ag g; diffusers' Euler ancestral step has no "sample" prediction either
        ax, ag = self._x0_coefficients(sigma, "diffusers' Euler ancestral step", sample_ok=False)
        up = math.sqrt(max(0.0, sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
        down = math.sqrt(max(0.0, sigma_next ** 2 - up ** 2))
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
