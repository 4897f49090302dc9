"""``FastDiffEulerScheduler``: diffusers' EulerDiscreteScheduler with a fused step."""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows


class FastDiffEulerScheduler(_FusedStep, EulerDiscreteScheduler):
    """diffusers' ``EulerDiscreteScheduler`` with a fused ``step``: its sigmas (Karras / exponential / beta
    schedules) come from diffusers' set_timesteps; with ``s_churn`` its churn (the sample raised to
    sigma_hat with s_noise x fresh noise before the step, as diffusers does) rides in the same pass, the
    noise being fastdiff's per-sample stream (``set_seeds``; stream 1 + step index)."""

    def _rows(self, sigma: float, sigma_next: float, gamma: float, s_noise: float) -> tuple[list, bool]:
        """The step's coefficients (c_x, c_pred[, c_noise], s_x, s_pred[, s_noise]) and whether they passed the
        kernel's check."""
        sigma_hat = sigma * (gamma + 1.0)
        c = s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2) if gamma > 0 else 0.0  # x_hat = x + c xi
        ax, ag = self._x0_coefficients(sigma, "fastdiff's Euler step")  # x0 = ax x_hat + ag g
        if self.config.prediction_type == "epsilon":
            ag = -sigma_hat  # diffusers converts eps at sigma_hat (v-prediction at sigma)
        # x' = x_hat + (x_hat - x0) (sigma' - sigma_hat) / sigma_hat
        r = (sigma_next - sigma_hat) / sigma_hat
        k = 1.0 + r * (1.0 - ax)
        rows = [k, -r * ag, ax, ag] if c == 0.0 else [k, -r * ag, k * c, ax, ag, ax * c]
        return rows, checked_rows(rows)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        i = self._step_position(timestep)
        schedule = self._sigma_schedule()
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        gamma = min(s_churn / (len(schedule.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        if gamma == 0.0:  # no churn: the schedule's rows, computed once
            rows, checked = schedule.rows.get(i) or schedule.rows.setdefault(i, self._rows(sigma, sigma_next, 0.0,
                                                                                            s_noise))
        else:
            rows, checked = self._rows(sigma, sigma_next, gamma, s_noise)
        x, g = self._inputs(model_output, sample)
        x0 = torch.empty_like(x)
        if len(rows) == 4:
            prev = self._fused_step(x, g, rows, checked, side=x0)
        else:
            prev = self._fused_step(x, g, rows, checked, seeds=self._seeds_for(x.shape[0], x.device),
                                    streams=[1 + i], side=x0)
        if prev.dtype is not model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
