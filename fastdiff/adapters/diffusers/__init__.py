"""diffusers adapter: schedulers with diffusers' API whose ``step`` is fastdiff's fused kernel, and
diffusers denoisers as fastdiff models.

    pipe.scheduler = FastDiffDDIMScheduler.from_config(pipe.scheduler.config)     # or FastDiffEulerScheduler, ...

    model = DiffusersModel(pipe.unet, pipe.scheduler.config)                      # model(x, t, y)
    x = fastdiff.sample(model, None, path=model.path, prediction=model.prediction,
                        timesteps=model.ddim_timesteps(50), method="ddim", ...)

Each class subclasses the diffusers scheduler it replaces, so ``from_config``, ``set_timesteps`` (every
timestep spacing, Karras / exponential sigmas, ...), ``scale_model_input``, ``add_noise``,
``init_noise_sigma``, ``order`` and the config are diffusers' own; only ``step`` changes. A step is
affine in (sample, model_output) for every prediction type (epsilon, v_prediction, sample), so its
coefficients are computed on the host in float64, once per schedule, and the update, the x0 side output
and the noise run in one call of fastdiff's fused step kernel (fastdiff.ops.sampler_step; two, plus a
clamp, with ``clip_sample``), called directly with the prepared rows where the inputs are what it takes
(fastdiff.adapters.diffusers._fused).

Noise (DDPM; DDIM with eta > 0) comes from fastdiff's stream instead of ``torch.randn``: sample b of the
batch uses seed ``seeds[b]`` (``scheduler.set_seeds(...)``; default 0 + b) and step i stream 1 + i, so
image b of a batch equals image b generated alone with the same seed. ``generator`` is accepted and
ignored by ``step`` (the pipelines still use it for the initial noise).
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("diffusers") is None:  # pragma: no cover - exercised only without diffusers
    raise ImportError("fastdiff.adapters.diffusers needs diffusers (pip install diffusers)")

from fastdiff.adapters.diffusers.ddim import FastDiffDDIMScheduler
from fastdiff.adapters.diffusers.ddpm import FastDiffDDPMScheduler
from fastdiff.adapters.diffusers.denoiser import Denoiser, denoiser
from fastdiff.adapters.diffusers.dpm_solver_multistep import FastDiffDPMSolverMultistepScheduler
from fastdiff.adapters.diffusers.euler import FastDiffEulerScheduler
from fastdiff.adapters.diffusers.euler_ancestral import FastDiffEulerAncestralScheduler
from fastdiff.adapters.diffusers.flow_match_euler import FastDiffFlowMatchEulerScheduler
from fastdiff.adapters.diffusers.generic import FastDiffScheduler
from fastdiff.adapters.diffusers.model import DiffusersModel
from fastdiff.adapters.diffusers.unipc_multistep import FastDiffUniPCMultistepScheduler

__all__ = ["Denoiser", "DiffusersModel", "denoiser", "FastDiffDDIMScheduler", "FastDiffDDPMScheduler",
           "FastDiffDPMSolverMultistepScheduler", "FastDiffEulerAncestralScheduler", "FastDiffEulerScheduler",
           "FastDiffFlowMatchEulerScheduler", "FastDiffScheduler", "FastDiffUniPCMultistepScheduler"]
