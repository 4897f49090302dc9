"""``FastDiffEulerScheduler``: diffusers' EulerDiscreteScheduler with a fused step."""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep
from fastdiff.ops.guided_step import guided_step
from fastdiff.ops.sampler_step import sampler_step


class FastDiffEulerScheduler(_FusedStep, EulerDiscreteScheduler):
    """diffusers' ``EulerDiscreteScheduler`` with a fused ``step``: its sigmas (Karras / exponential / beta
    schedules) come from diffusers' set_timesteps; with ``s_churn`` its churn (the sample raised to
    sigma_hat with s_noise x fresh noise before the step, as diffusers does) rides in the same pass, the
    noise being fastdiff's per-sample stream (``set_seeds``; stream 1 + step index)."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        sigma, sigma_next = self._step_sigmas(timestep)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1.0)
        c = s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2) if gamma > 0 else 0.0  # x_hat = x + c xi
        ax, ag = self._x0_coefficients(sigma, "fastdiff's Euler step")  # x0 = ax x_hat + ag g
        if self.config.prediction_type == "epsilon":
            ag = -sigma_hat  # diffusers converts eps at sigma_hat (v-prediction at sigma)
        # x' = x_hat + (x_hat - x0) (sigma' - sigma_hat) / sigma_hat
        r = (sigma_next - sigma_hat) / sigma_hat
        k = 1.0 + r * (1.0 - ax)
        x, g = self._inputs(model_output, sample)
        prev, x0 = torch.empty_like(x), torch.empty_like(x)
        if c == 0.0:
            guided_step(x, g, c_x=k, c_pred=-r * ag, s_x=ax, s_pred=ag, out=prev, side=x0)
        else:
            sampler_step(x, [g], coeffs=[k, -r * ag, k * c, ax, ag, ax * c], seeds=self._seeds_for(x.shape[0], x.device),
                         streams=[1 + self.step_index], outs=[prev], side=x0)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
