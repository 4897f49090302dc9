"""diffusers adapter: schedulers with diffusers' API whose ``step`` is fastdiff's fused kernel, and
diffusers denoisers as fastdiff models.

    pipe.scheduler = FastDiffDDIMScheduler.from_config(pipe.scheduler.config)     # or FastDiffEulerScheduler

    model = DiffusersModel(pipe.unet, pipe.scheduler.config)                      # model(x, t, y)
    x = fastdiff.sample(model, None, path=model.path, prediction=model.prediction,
                        timesteps=model.ddim_timesteps(50), method="ddim", ...)

Each class subclasses the diffusers scheduler it replaces, so ``from_config``, ``set_timesteps`` (every
timestep spacing, Karras / exponential sigmas, ...), ``scale_model_input``, ``add_noise``,
``init_noise_sigma``, ``order`` and the config are diffusers' own; only ``step`` changes. A step is
affine in (sample, model_output) for every prediction type (epsilon, v_prediction, sample), so its
coefficients are computed on the host in float64 and the update, the x0 side output and the noise
run in one :func:`fastdiff.ops.guided_step` (two, plus a clamp, with ``clip_sample``).

Noise (DDIM with eta > 0) comes from fastdiff's stream instead of ``torch.randn``: sample b of the
batch uses seed ``seeds[b]`` (``scheduler.set_seeds(...)``; default 0 + b) and step i stream 1 + i, so
image b of a batch equals image b generated alone with the same seed. ``generator`` is accepted and
ignored by ``step`` (the pipelines still use it for the initial noise).
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence, Union

import torch

try:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError("fastdiff.adapters.diffusers needs diffusers (pip install diffusers)") from exc

from fastdiff import _checks
from fastdiff.ops.guided_step import guided_step
from fastdiff.paths import CondOT, DiscreteVP

__all__ = ["DiffusersModel", "FastDiffDDIMScheduler", "FastDiffEulerScheduler", "FastDiffFlowMatchEulerScheduler"]

Seeds = Union[int, Sequence[int], torch.Tensor]


class _FusedStep:
    """Per-sample seeds and the fused affine update shared by the schedulers."""

    _fd_seed: Seeds = 0

    def set_seeds(self, seeds: Seeds) -> None:
        """Per-sample noise seeds: an int (sample b uses seeds + b) or one seed per sample."""
        self._fd_seed = seeds

    def _seeds_for(self, batch: int, device) -> torch.Tensor:
        s = self._fd_seed
        if isinstance(s, int) and not isinstance(s, bool):
            s = [s + b for b in range(batch)]  # as fastdiff.sample's seed=int
        t = _checks.seeds_tensor(s, device, name="seeds")
        if t.shape[0] != batch:
            raise ValueError(f"seeds holds {t.shape[0]} per-sample seeds but the batch has {batch} samples")
        return t

    def _stream(self, timestep) -> int:
        """1 + the index of ``timestep`` in ``self.timesteps`` (the step's noise stream)."""
        if getattr(self, "_fd_timesteps", None) is None:
            self._fd_timesteps = [float(v) for v in self.timesteps.tolist()]
        t = float(timestep)
        try:
            return 1 + self._fd_timesteps.index(t)
        except ValueError:
            raise ValueError(f"timestep {timestep} is not one of scheduler.timesteps (call set_timesteps first)") from None

    @staticmethod
    def _inputs(model_output, sample):
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}")
        x = sample.to(torch.float32).contiguous()
        g = model_output.contiguous()
        if g.dtype not in _checks.PRED_DTYPES:
            g = g.to(torch.float32)
        return x, g


class FastDiffDDIMScheduler(_FusedStep, DDIMScheduler):
    """diffusers' ``DDIMScheduler`` with a fused ``step`` (DDIM, eta in [0, 1], clip_sample supported;
    dynamic thresholding is not: it is not affine in the model output)."""

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device)
        self._fd_timesteps = None

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Optional[torch.Generator] = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                             "scheduler")
        if self.config.thresholding:
            raise NotImplementedError("thresholding=True (dynamic thresholding) is not supported by fastdiff's fused "
                                      "DDIM step; use diffusers' DDIMScheduler or thresholding=False")
        if variance_noise is not None:
            raise NotImplementedError("variance_noise: fastdiff draws the noise from per-sample seeds "
                                      "(scheduler.set_seeds); pass no variance_noise")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t].double())
        a_prev = float(self.alphas_cumprod[prev_t].double()) if prev_t >= 0 else float(self.final_alpha_cumprod)
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
        x, g = self._inputs(model_output, sample)
        seeds = self._seeds_for(x.shape[0], x.device) if std > 0 else None
        stream = self._stream(timestep) if std > 0 else 0
        prev = torch.empty_like(x)
        x0 = torch.empty_like(x)
        if self.config.clip_sample:
            # x0 first, clamped, then the update with the clamped x0 as the extra input
            guided_step(x, g, c_x=ax, c_pred=ag, out=x0)
            x0.clamp_(-self.config.clip_sample_range, self.config.clip_sample_range)
            if use_clipped_model_output:  # eps recomputed from the clamped x0
                c_x, c_p, c_e = k / be, 0.0, al1 - k * al / be
            else:
                c_x, c_p, c_e = k * ex, k * eg, al1
            guided_step(x, g, extra=x0, seeds=seeds, stream=stream, c_x=c_x, c_pred=c_p, c_extra=c_e, c_noise=std,
                        out=prev)
        else:
            guided_step(x, g, seeds=seeds, stream=stream, c_x=al1 * ax + k * ex, c_pred=al1 * ag + k * eg,
                        c_noise=std, s_x=ax, s_pred=ag, out=prev, side=x0)
        prev = prev.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


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
        ptype = self.config.prediction_type
        if ptype in ("original_sample", "sample"):  # x0 = ax x + ag g
            ax, ag = 0.0, 1.0
        elif ptype == "epsilon":
            ax, ag = 1.0, -sigma
        elif ptype == "v_prediction":
            ax, ag = 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
        else:
            raise ValueError(f"prediction_type={ptype!r} is not supported; fastdiff's Euler step takes epsilon, "
                             "v_prediction or sample")
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


class FastDiffFlowMatchEulerScheduler(_FusedStep, FlowMatchEulerDiscreteScheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3 / Flux) with a fused ``step``: the Euler step
    x' = x + (sigma' - sigma) v, or with ``stochastic_sampling`` x' = (1 - sigma') (x - sigma v) + sigma' xi
    with xi from fastdiff's per-sample noise (stream 1 + step index). Shifts, dynamic shifting and
    sigma options are diffusers' own set_timesteps; per-token timesteps are not supported."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, per_token_timesteps: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):  # as diffusers' own check
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to step() is "
                             "not supported; pass one of scheduler.timesteps")
        if per_token_timesteps is not None:
            raise NotImplementedError("per_token_timesteps: fastdiff's fused flow-matching step takes one timestep "
                                      "per step")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index].double())
        sigma_next = float(self.sigmas[self.step_index + 1].double())
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


class DiffusersModel(torch.nn.Module):
    """``model(x, t, y)`` for :func:`fastdiff.sample` from a diffusers denoiser and its scheduler config.

    - ``prediction_type`` epsilon, sample, v_prediction: the path is the training schedule's
      :class:`fastdiff.paths.DiscreteVP` (``alphas_cumprod`` of the config's betas) and the model is
      called at the training timestep tau = T (1 - t) - 1 (rounded where within 1e-3 of an integer,
      so a float32 t hits the trained timesteps exactly); epsilon is an ``"eps"`` model, sample an
      ``"x0"`` model, and v = alpha eps - beta x0 is turned into x0 = alpha x - beta v (``"x0"``).
    - ``prediction_type="flow"`` (or a FlowMatchEulerDiscreteScheduler config): the model predicts
      eps - z on x = (1 - sigma) z + sigma eps, i.e. CondOT with sigma = 1 - t, called at timestep
      sigma T; it is a ``"velocity"`` model u = z - eps. Shifted grids: ``fastdiff.schedules.shifted_timesteps``.

    ``y`` goes to the denoiser's conditioning argument: ``encoder_hidden_states`` where its forward
    takes one, else ``class_labels``; or name it with ``cond_arg``. The sample is passed as the first
    parameter of the denoiser's forward (``sample``, ``hidden_states``) and the timestep as ``timestep``.
    """

    def __init__(self, denoiser, scheduler_config, prediction_type: Optional[str] = None,  # config or scheduler
                 cond_arg: Optional[str] = None):
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be a callable diffusers model, got {type(denoiser).__name__}")
        class_name = ""
        if hasattr(scheduler_config, "set_timesteps") and hasattr(scheduler_config, "config"):  # a scheduler
            class_name, scheduler_config = type(scheduler_config).__name__, scheduler_config.config
        config = dict(scheduler_config)
        class_name = config.get("_class_name", class_name)
        self.denoiser = denoiser
        # flow-matching configs: by class name, or by their keys (a shift and no DDPM betas)
        flow = ("FlowMatch" in class_name or prediction_type == "flow"
                or ("shift" in config and "beta_start" not in config))
        ptype = "flow" if flow else (prediction_type or config.get("prediction_type", "epsilon"))
        self.prediction_type = ptype
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        if ptype == "flow":
            self.path, self.prediction = CondOT(), "velocity"
        elif ptype in ("epsilon", "sample", "v_prediction"):
            known = {k: v for k, v in config.items() if not k.startswith("_")}
            schedule = DDIMScheduler.from_config(known)
            self.path = DiscreteVP(schedule.alphas_cumprod)
            self.prediction = {"epsilon": "eps", "sample": "x0", "v_prediction": "x0"}[ptype]
            self._ddim_config = known
        else:
            raise ValueError(f"prediction_type={ptype!r} is not supported; DiffusersModel takes epsilon, sample, "
                             "v_prediction or flow")
        params = list(inspect.signature(denoiser.forward if hasattr(denoiser, "forward") else denoiser).parameters)
        self._sample_arg = params[0] if params else "sample"
        if cond_arg is None:
            cond_arg = next((a for a in ("encoder_hidden_states", "class_labels") if a in params), None)
        elif cond_arg not in params:
            raise ValueError(f"cond_arg={cond_arg!r} is not a parameter of the denoiser's forward {params}")
        self.cond_arg = cond_arg
        self._return_dict = "return_dict" in params

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's timestep for flow times t [B]."""
        if self.prediction_type == "flow":
            return (1.0 - t.double()) * self.num_train_timesteps
        tau = self.path.tau(t.double())
        near = (tau - tau.round()).abs() < 1e-3
        return torch.where(near, tau.round(), tau)

    def ddim_timesteps(self, steps: int) -> list:
        """The flow-time grid of diffusers' DDIMScheduler.set_timesteps(steps) for this config (each
        step to tau - T // steps, the last to alpha_bar = final_alpha_cumprod), for fastdiff.sample."""
        if self.prediction_type == "flow":
            raise ValueError("ddim_timesteps is for DDPM-type schedules; flow models take a CondOT grid "
                             "(e.g. fastdiff.schedules.shifted_timesteps)")
        sched = DDIMScheduler.from_config(self._ddim_config)
        sched.set_timesteps(steps)
        taus = [int(v) for v in sched.timesteps.tolist()]
        stride = self.num_train_timesteps // steps
        if any(b != a - stride for a, b in zip(taus, taus[1:])):
            raise ValueError(f"timestep_spacing={sched.config.timestep_spacing!r} gives timesteps that DDIM does not "
                             f"step between (diffusers steps by T // steps = {stride}); use 'leading'")
        end = 1.0 if sched.config.set_alpha_to_one else self.path.time(0.0)
        return [self.path.time(float(v)) for v in taus] + [end]

    def forward(self, x, t, y=None):
        kwargs = {self._sample_arg: x, "timestep": self.timestep(t).to(x.device)}
        if y is not None:
            if self.cond_arg is None:
                raise ValueError("y was given but the denoiser has no conditioning argument; pass cond_arg")
            kwargs[self.cond_arg] = y
        if self._return_dict:
            kwargs["return_dict"] = False
        out = self.denoiser(**kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif hasattr(out, "sample"):
            out = out.sample
        if self.prediction_type == "flow":
            return -out  # diffusers' flow target is eps - z; fastdiff's velocity is z - eps
        if self.prediction_type == "v_prediction":
            alpha, beta = (c.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) for c in self.path.coefficients(t)[:2])
            return alpha * x - beta * out
        return out
