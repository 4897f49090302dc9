"""``FastDiffEulerScheduler``: diffusers' EulerDiscreteScheduler with a fused step."""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep
from fastdiff.ops.guided_step import guided_step


class FastDiffEulerScheduler(_FusedStep, EulerDiscreteScheduler):
    """diffusers' ``EulerDiscreteScheduler`` with a fused ``step`` (s_churn = 0; its sigmas, including
    Karras / exponential / beta schedules, come from diffusers' set_timesteps)."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):  # as diffusers' own check
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to step() is "
                             "not supported; pass one of scheduler.timesteps")
        if s_churn != 0.0:
            raise NotImplementedError(f"s_churn={s_churn}: fastdiff's fused Euler step is churn-free (s_churn = 0)")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index].double())
        sigma_next = float(self.sigmas[self.step_index + 1].double())
        ax, ag = self._x0_coefficients(sigma, "fastdiff's Euler step")  # x0 = ax x + ag g
        # x' = x + (x - x0) (sigma' - sigma) / sigma
        r = (sigma_next - sigma) / sigma
        x, g = self._inputs(model_output, sample)
        prev, x0 = torch.empty_like(x), torch.empty_like(x)
        guided_step(x, g, c_x=1.0 + r * (1.0 - ax), c_pred=-r * ag, s_x=ax, s_pred=ag, out=prev, side=x0)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
