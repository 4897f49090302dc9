"""``FastDiffEulerAncestralScheduler``: diffusers' EulerAncestralDiscreteScheduler with a fused step."""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows
from fastdiff.sampling.methods.sigma_space import ancestral_step


class FastDiffEulerAncestralScheduler(_FusedStep, EulerAncestralDiscreteScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` with a fused ``step``: the Euler step to sigma_down
    plus sigma_up fresh noise (eta = 1), the x0 prediction as a side output, in one kernel pass. The
    noise is fastdiff's per-sample stream (``set_seeds``; stream 1 + step index), not the generator's."""

    def _rows(self, sigma: float, sigma_next: float) -> tuple[list, bool, bool]:
        """(the coefficient rows, whether they passed the kernel's check, whether the step adds noise)."""
        # x0 = ax x + ag g; diffusers' Euler ancestral step has no "sample" prediction either
        ax, ag = self._x0_coefficients(sigma, "diffusers' Euler ancestral step", sample_ok=False)
        down, up = ancestral_step(sigma, sigma_next, 1.0)
        r = (down - sigma) / sigma  # x' = x + (x - x0) (sigma_down - sigma) / sigma + sigma_up xi
        noise = [up] if up != 0 else []
        rows = [1.0 + r * (1.0 - ax), -r * ag, *noise, ax, ag, *[0.0] * len(noise)]
        return rows, checked_rows(rows), up > 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        i = self._step_position(timestep)
        schedule = self._sigma_schedule()
        rows, checked, noisy = schedule.rows.get(i) or schedule.rows.setdefault(
            i, self._rows(schedule.sigmas[i], schedule.sigmas[i + 1]))
        x, g = self._inputs(model_output, sample)
        seeds = self._seeds_for(x.shape[0], x.device) if noisy else None
        x0 = torch.empty_like(x)
        prev = self._fused_step(x, g, rows, checked, seeds=seeds, streams=[1 + i] if len(rows) == 6 else [], side=x0)
        if prev.dtype is not model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
