"""``DiffusersModel``: a diffusers denoiser and its scheduler config as a fastdiff ``model(x, t, y)``."""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from diffusers import DDIMScheduler

from fastdiff.paths import CondOT, DiscreteVP


class DiffusersModel(torch.nn.Module):
    """``model(x, t, y)`` for :func:`fastdiff.sample` from a diffusers denoiser and its scheduler config.

    - ``prediction_type`` epsilon, sample, v_prediction: the path is the training schedule's
      :class:`fastdiff.paths.DiscreteVP` (``alphas_cumprod`` of the config's betas) and the model is
      called at the training timestep tau = T (1 - t) - 1 (rounded where within 1e-3 of an integer,
      so a float32 t hits the trained timesteps exactly); epsilon is an ``"eps"`` model, sample an
      ``"x0"`` model, v_prediction a ``"v"`` model (v = alpha eps - beta x0: CFG and guidance_rescale act
      on v, as diffusers' do).
    - ``prediction_type="flow"`` (or a FlowMatchEulerDiscreteScheduler config): the model predicts
      eps - z on x = (1 - sigma) z + sigma eps, i.e. CondOT with sigma = 1 - t, called at timestep
      sigma T; it is a ``"velocity"`` model u = z - eps. Shifted grids: ``fastdiff.schedules.shifted_timesteps``.

    ``y`` goes to the denoiser's conditioning argument: ``encoder_hidden_states`` where its forward
    takes one, else ``class_labels``; or name it with ``cond_arg``. A dict ``y`` is the forward's keyword
    arguments themselves (SDXL: ``{"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds": ...,
    "time_ids": ...}}``; Flux: ``pooled_projections``, ``txt_ids``, ...), each key a parameter of the forward;
    fastdiff.sample batches and guides it leaf by leaf (docs/sampling.md, Conventions). The sample is passed as
    the first parameter of the denoiser's forward (``sample``, ``hidden_states``) and the timestep as
    ``timestep``.
    """

    def __init__(self, denoiser, scheduler_config, prediction_type: Optional[str] = None,  # config or scheduler
                 cond_arg: Optional[str] = None):
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be a callable diffusers model, got {type(denoiser).__name__}")
        class_name = ""
        if hasattr(scheduler_config, "set_timesteps") and hasattr(scheduler_config, "config"):  # a scheduler
            class_name, scheduler_config = type(scheduler_config).__name__, scheduler_config.config
        config = self._config = dict(scheduler_config)
        class_name = config.get("_class_name", class_name)
        self.denoiser = denoiser
        # flow-matching configs: by class name, or by their keys (a shift and no DDPM betas)
        flow = ("FlowMatch" in class_name or prediction_type == "flow" or config.get("use_flow_sigmas")
                or config.get("prediction_type") == "flow_prediction"
                or ("shift" in config and "beta_start" not in config))
        ptype = "flow" if flow else (prediction_type or config.get("prediction_type", "epsilon"))
        self.prediction_type = ptype
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        if ptype == "flow":
            self.path, self.prediction = CondOT(), "velocity"
        elif ptype in ("epsilon", "sample", "v_prediction"):
            known = {k: v for k, v in config.items() if not k.startswith("_")}
            schedule = DDIMScheduler.from_config(known)
            if float(schedule.alphas_cumprod[-1]) <= 0.0:
                raise ValueError("rescale_betas_zero_snr=True gives alpha_bar = 0 at the last training timestep "
                                 "(infinite noise level), which a fastdiff path cannot hold; use the "
                                 "FastDiff*Scheduler drop-ins for zero-terminal-SNR schedules")
            self.path = DiscreteVP(schedule.alphas_cumprod)
            self.prediction = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[ptype]
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
        self._params = params
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
        grid = [self.path.time(float(v)) for v in taus]
        end = 1.0 if sched.config.set_alpha_to_one else self.path.time(0.0)
        # without set_alpha_to_one, a grid ending at tau = 0 steps to alpha_bar[0] again: diffusers' last step is
        # then the identity (x0 and eps re-combined at the same noise level), and the grid ends there
        return grid + [end] if end > grid[-1] else grid

    def forward(self, x, t, y=None):
        out = self._network_call(x, self.timestep(t).to(x.device), y)
        if self.prediction_type == "flow":
            return -out  # diffusers' flow target is eps - z; fastdiff's velocity is z - eps
        return out

    def _network_call(self, x, timestep, y, fixed=None):
        """The network's output at sample x and diffusers timestep ``timestep``, y as its conditioning."""
        kwargs = {self._sample_arg: x, "timestep": timestep}
        if fixed:
            kwargs.update(fixed)
        if isinstance(y, dict):
            unknown = [k for k in y if k not in self._params or k in kwargs]
            if unknown:
                raise ValueError(f"y's keys {unknown} are not conditioning parameters of the denoiser's forward "
                                 f"{self._params}")
            kwargs.update(y)
        elif y is not None:
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
        return out
