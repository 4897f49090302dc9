"""``FastDiffFlowMatchEulerScheduler``: diffusers' FlowMatchEulerDiscreteScheduler (SD3 / Flux) with a
fused step."""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep
from fastdiff.ops.guided_step import guided_step


class FastDiffFlowMatchEulerScheduler(_FusedStep, FlowMatchEulerDiscreteScheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3 / Flux) with a fused ``step``: the Euler step
    x' = x + (sigma' - sigma) v, or with ``stochastic_sampling`` x' = (1 - sigma') (x - sigma v) + sigma' xi
    with xi from fastdiff's per-sample noise (stream 1 + step index). Shifts, dynamic shifting and
    sigma options are diffusers' own set_timesteps; per-token timesteps are not supported."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, per_token_timesteps: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        if per_token_timesteps is not None:
            raise NotImplementedError("per_token_timesteps: fastdiff's fused flow-matching step takes one timestep "
                                      "per step")
        sigma, sigma_next = self._step_sigmas(timestep)
        x, g = self._inputs(model_output, sample)
        prev = torch.empty_like(x)
        if self.config.stochastic_sampling:
            seeds = self._seeds_for(x.shape[0], x.device)
            guided_step(x, g, seeds=seeds, stream=1 + self.step_index, c_x=1.0 - sigma_next,
                        c_pred=-(1.0 - sigma_next) * sigma, c_noise=sigma_next, out=prev)
        else:
            guided_step(x, g, c_x=1.0, c_pred=sigma_next - sigma, out=prev)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
