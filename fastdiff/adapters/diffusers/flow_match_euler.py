"""``FastDiffFlowMatchEulerScheduler``: diffusers' FlowMatchEulerDiscreteScheduler (SD3 / Flux) with a
fused step."""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows


class FastDiffFlowMatchEulerScheduler(_FusedStep, FlowMatchEulerDiscreteScheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3 / Flux) with a fused ``step``: the Euler step
    x' = x + (sigma' - sigma) v, or with ``stochastic_sampling`` x' = (1 - sigma') (x - sigma v) + sigma' xi
    with xi from fastdiff's per-sample noise (stream 1 + step index). Shifts, dynamic shifting and
    sigma options are diffusers' own set_timesteps; per-token timesteps are not supported."""

    def _rows(self, sigma: float, sigma_next: float) -> tuple[list, bool, bool]:
        """(the coefficient rows, whether they passed the kernel's check, whether the step is stochastic)."""
        if self.config.stochastic_sampling:
            noise = [sigma_next] if sigma_next != 0 else []
            rows = [1.0 - sigma_next, -(1.0 - sigma_next) * sigma, *noise, 0.0, 0.0, *[0.0] * len(noise)]
        else:
            rows = [1.0, sigma_next - sigma, 0.0, 0.0]
        return rows, checked_rows(rows), self.config.stochastic_sampling

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, per_token_timesteps: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        if per_token_timesteps is not None:
            raise NotImplementedError("per_token_timesteps: fastdiff's fused flow-matching step takes one timestep "
                                      "per step")
        i = self._step_position(timestep)
        schedule = self._sigma_schedule()
        rows, checked, stochastic = schedule.rows.get(i) or schedule.rows.setdefault(
            i, self._rows(schedule.sigmas[i], schedule.sigmas[i + 1]))
        x, g = self._inputs(model_output, sample)
        if stochastic:  # (the seeds are checked even where sigma' = 0 draws nothing)
            prev = self._fused_step(x, g, rows, checked, seeds=self._seeds_for(x.shape[0], x.device),
                                    streams=[1 + i] if len(rows) == 6 else [])
        else:
            prev = self._fused_step(x, g, rows, checked)
        if prev.dtype is not model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
