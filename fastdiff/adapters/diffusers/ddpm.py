"""``FastDiffDDPMScheduler``: diffusers' DDPMScheduler with a fused step (DDPMPipeline, lerobot's DiffusionPolicy)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows, clip_of
from fastdiff.ops.randn import randn as fastdiff_randn

MAX_KEPT_ROWS = 4096
# diffusers' fixed_large_log takes (log beta_t) ** 0.5 as the standard deviation: NaN for every beta_t < 1
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
# the model's extra channels give the variance (improved DDPM): the noise is an elementwise std times the draw
LEARNED = ("learned", "learned_range")


class FastDiffDDPMScheduler(_FusedStep, DDPMScheduler):
    """diffusers' ``DDPMScheduler`` with a fused ``step``: the posterior mean of the x0 estimate and the sample plus
    the variance type's noise (fixed_small, fixed_small_log, fixed_large) in one kernel call, clip_sample's clamp of
    x0 included (the kernel's clip); with thresholding, x0 first, thresholded, then the step from it (two calls).
    The noise is fastdiff's stream of the per-sample seeds (``set_seeds``), added at every step but the last (t = 0),
    as diffusers does. A learned
    variance (``learned``: the model's extra channels are the variance; ``learned_range``: they interpolate between
    the log of fixed_small's and fixed_large's, Nichol & Dhariwal 2021) is elementwise: the fused call gives the
    mean and x0, and the noise times the model's standard deviation is added after it (one more pass)."""

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        super().set_timesteps(num_inference_steps, device, timesteps)
        self._fd_timesteps = self._fd_previous = None

    def _previous(self, t: int) -> int:
        """diffusers' previous_timestep (the next entry of timesteps, -1 after the last) without its tensor ops."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1
        prev = self.__dict__.get("_fd_previous")
        if prev is None:
            ts = [int(v) for v in self.timesteps.tolist()]
            prev = self._fd_previous = {a: b for a, b in zip(ts, ts[1:] + [-1])}
        if t not in prev:
            raise ValueError(f"timestep {t} is not one of scheduler.timesteps (call set_timesteps first)")
        return prev[t]

    def _rows(self, t: int) -> tuple:
        """(std, rows, checked, clip) of the step from training timestep t, from the float64 alphas_cumprod (once per
        scheduler and timestep)."""
        alphas_cumprod, config = self.alphas_cumprod, self.config
        memo = self.__dict__.get("_fd_rows")
        if memo is None or memo[0] is not alphas_cumprod or memo[1] != alphas_cumprod._version or memo[2] is not config:
            memo = self._fd_rows = (alphas_cumprod, alphas_cumprod._version, config, alphas_cumprod.double().tolist(),
                                    {})
        prev_t = self._previous(t)
        rows = memo[4].get((t, prev_t))
        if rows is None:
            if len(memo[4]) >= MAX_KEPT_ROWS:
                memo[4].clear()
            rows = memo[4][(t, prev_t)] = self._step_rows(memo[3], t, prev_t)
        return rows

    def _step_rows(self, alphas: list, t: int, prev_t: int) -> tuple:
        a_t = alphas[t]
        a_prev = alphas[prev_t] if prev_t >= 0 else 1.0  # diffusers' self.one
        al, be = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        ptype = self.config.prediction_type
        if ptype == "epsilon":  # x0 = ax x + ag g
            ax, ag = 1.0 / al, -be / al
        elif ptype == "sample":
            ax, ag = 0.0, 1.0
        elif ptype == "v_prediction":
            ax, ag = al, -be
        else:
            raise ValueError(f"prediction_type={ptype!r} is not supported; fastdiff's DDPM step takes epsilon, "
                             "sample or v_prediction")
        current_alpha = a_t / a_prev
        current_beta = 1.0 - current_alpha
        c_x0 = math.sqrt(a_prev) * current_beta / (1.0 - a_t)  # the posterior mean: c_x0 x0 + c_x x
        c_x = math.sqrt(current_alpha) * (1.0 - a_prev) / (1.0 - a_t)
        std = 0.0
        if t > 0 and self.config.variance_type not in LEARNED:  # (a learned one is added after the kernel)
            small = max((1.0 - a_prev) / (1.0 - a_t) * current_beta, 1e-20)
            std = math.sqrt(current_beta) if self.config.variance_type == "fixed_large" else math.sqrt(small)
        noise = [std] if std != 0 else []
        clip = clip_of(self.config, c_x0)  # clip_sample alone: the one pass clamps x0 (the side row), d = c_x0
        if clip is not None:
            rows = ([c_x + c_x0 * ax, c_x0 * ag, *noise, ax, ag, *[0.0] * len(noise)],)
        elif self.config.thresholding or self.config.clip_sample:
            # x0 first (x0 = ax x + ag g), thresholded or clamped (diffusers' order), then the mean from it
            rows = ([ax, ag, 0.0, 0.0], [c_x, 0.0, c_x0, *noise, 0.0, 0.0, 0.0, *[0.0] * len(noise)])
        else:
            rows = ([c_x + c_x0 * ax, c_x0 * ag, *noise, ax, ag, *[0.0] * len(noise)],)
        return std, rows, all(checked_rows(r) for r in rows), clip

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        variance_type = self.config.variance_type
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type={variance_type!r} is not supported by FastDiffDDPMScheduler "
                             f"(it takes {', '.join(VARIANCE_TYPES)}; diffusers' fixed_large_log gives NaN)")
        predicted = None
        if variance_type in LEARNED:
            channels = sample.shape[1] if sample.dim() > 1 else 0
            if model_output.dim() < 2 or model_output.shape[1] != 2 * channels:
                raise ValueError(f"variance_type={variance_type!r} needs the model's variance channels: model_output "
                                 f"with 2 x sample's {channels} channels on dim 1, got {tuple(model_output.shape)}")
            model_output, predicted = model_output.split(channels, dim=1)
        t = int(timestep)
        std, rows, checked, clip = self._rows(t)
        prev, x0 = self._x0_step(model_output, timestep, sample, std, rows, checked, clip)
        if predicted is not None and t > 0:
            prev = self._add_learned_noise(prev, predicted, t, timestep)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _add_learned_noise(self, mean, predicted, t: int, timestep):
        """mean + std xi with the model's elementwise std (diffusers' _get_variance), xi the step's stream."""
        a_t = float(self.alphas_cumprod[t])
        prev_t = self._previous(t)
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        beta = 1.0 - a_t / a_prev
        v = predicted.to(torch.float32)
        if self.config.variance_type == "learned":
            std = v.sqrt()  # the channels are the variance itself (NaN where negative, as diffusers)
        else:
            small = max((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
            lo, hi = math.log(small), math.log(beta)
            std = (0.5 * (lo + (v + 1.0) * (0.5 * (hi - lo)))).exp()  # exp(log variance / 2)
        seeds = self._seeds_for(mean.shape[0], mean.device)
        xi = fastdiff_randn(seeds, self._stream(timestep), tuple(mean.shape[1:]), device=mean.device)
        return (mean.to(torch.float32) + std * xi).to(mean.dtype)
