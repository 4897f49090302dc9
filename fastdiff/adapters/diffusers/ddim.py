"""``FastDiffDDIMScheduler``: diffusers' DDIMScheduler with a fused step."""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows, clip_of

MAX_KEPT_ROWS = 1024


class FastDiffDDIMScheduler(_FusedStep, DDIMScheduler):
    """diffusers' ``DDIMScheduler`` with a fused ``step`` (DDIM, eta in [0, 1]; clip_sample clamps the x0 estimate
    in the one fused pass (the kernel's clip); dynamic thresholding between two fused passes)."""

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device)
        self._fd_timesteps = None

    def _rows(self, t: int, prev_t: int, eta: float, use_clipped_model_output: bool) -> tuple:
        """(std, rows of the one pass or of the two passes, whether they passed the kernel's check, the kernel's clip
        or None) of the step from
        training timestep t to prev_t, from the float64 alphas_cumprod (read once per scheduler: 3 torch ops per
        number otherwise)."""
        alphas_cumprod, final, config = self.alphas_cumprod, self.final_alpha_cumprod, self.config
        memo = self.__dict__.get("_fd_rows")
        if memo is None or memo[0] is not alphas_cumprod or memo[1] != alphas_cumprod._version or \
                memo[2] is not final or memo[3] is not config:
            memo = self._fd_rows = (alphas_cumprod, alphas_cumprod._version, final, config,
                                    alphas_cumprod.double().tolist(), {})
        key = (t, prev_t, eta, use_clipped_model_output)
        rows = memo[5].get(key)
        if rows is None:
            if len(memo[5]) >= MAX_KEPT_ROWS:  # (an eta varied from call to call)
                memo[5].clear()
            rows = memo[5][key] = self._step_rows(memo[4], t, prev_t, eta, use_clipped_model_output)
        return rows

    def _step_rows(self, alphas: list, t: int, prev_t: int, eta: float, use_clipped_model_output: bool) -> tuple:
        a_t = alphas[t]
        a_prev = alphas[prev_t] if prev_t >= 0 else float(self.final_alpha_cumprod)
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
        noise = [std] if std != 0 else []
        # clip_sample alone: one pass, x0 (the side row) clamped by the kernel's clip, out += d (x0c - x0) with d
        # the coefficient of x0 in the step: al1 with the unclipped eps, al1 - k al / be with eps recomputed from
        # the clamped x0 (use_clipped_model_output: eps = (x - al x0c) / be)
        clip = clip_of(self.config, al1 - k * al / be if use_clipped_model_output and self.config.clip_sample else al1)
        if clip is not None:
            rows = ([al1 * ax + k * ex, al1 * ag + k * eg, *noise, ax, ag, *[0.0] * len(noise)],)
        elif self.config.thresholding or self.config.clip_sample:
            # x0 first (x0 = ax x + ag g), thresholded or clamped (diffusers' order), then the update with it as
            # the extra input
            if use_clipped_model_output:  # eps recomputed from the clamped x0
                c_x, c_p, c_e = k / be, 0.0, al1 - k * al / be
            else:
                c_x, c_p, c_e = k * ex, k * eg, al1
            rows = ([ax, ag, 0.0, 0.0], [c_x, c_p, c_e, *noise, 0.0, 0.0, 0.0, *[0.0] * len(noise)])
        else:
            rows = ([al1 * ax + k * ex, al1 * ag + k * eg, *noise, ax, ag, *[0.0] * len(noise)],)
        return std, rows, all(checked_rows(r) for r in rows), clip

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
        std, rows, checked, clip = self._rows(t, t - self.config.num_train_timesteps // self.num_inference_steps, eta,
                                              use_clipped_model_output)
        prev, x0 = self._x0_step(model_output, timestep, sample, std, rows, checked, clip)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
