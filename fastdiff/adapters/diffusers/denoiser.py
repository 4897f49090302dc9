"""``denoiser(pipe)``: a diffusers pipeline's network as a fastdiff ``model(x, t, y)`` in the parametrization of
diffusers' own sampling loops, with the grid of a scheduler and the timesteps it would hand the network.

    den = denoiser(pipe)                                    # pipe.unet / pipe.transformer and pipe.scheduler
    grid = den.timesteps(30, sigmas="karras")               # or den.grid(scheduler) after its set_timesteps,
                                                            # or den.timesteps(30, schedule="align_your_steps")
    y, null_y = {"encoder_hidden_states": emb}, {"encoder_hidden_states": neg}
    x = fastdiff.sample(den, None, path=den.path, prediction=den.prediction, timesteps=grid, method="dpmpp_2m",
                        y=y, null_y=null_y, cfg=7.5, noise=den.initial_state(latents, grid))

A DDPM-trained network (epsilon, sample or v_prediction) samples on fastdiff's VE path x = z + sigma eps (the
sigma space of k-diffusion and of diffusers' Euler-type schedulers, sigma_max the training schedule's largest):
the network sees x / sqrt(sigma^2 + 1) and diffusers' timestep of sigma, so fastdiff's euler, heun, dpm_2, lms
and ddim on a grid of the scheduler's sigmas are diffusers' EulerDiscrete, Heun, KDPM2, LMS and DDIM steps, and
dpmpp_2m is DPMSolverMultistep's. A v_prediction network is a ``"v"`` model (v on this path is the network's v
times sqrt(sigma^2 + 1), the same direction), so CFG and guidance_rescale act on v as diffusers' do. A flow
network (SD3, Flux: FlowMatch schedulers) samples on CondOT with sigma = 1 - t as a ``"velocity"`` model.

At the grid's points the network gets the scheduler's own numbers: the sigma it scales by and the timestep it
passes (rounded where diffusers rounds, e.g. DPMSolverMultistep's Karras timesteps; Flux's divided by 1000), not
ones recomputed from a float32 t; between them (the midpoints of heun, dpm_2) diffusers' continuous map from
sigma to timestep (log sigma interpolated over the training timesteps).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastdiff.adapters.diffusers.model import DiffusersModel
from fastdiff.paths import VE, CondOT

# schedulers whose pipeline sample is the VP-scaled state alpha z + beta eps (the rest keep z + sigma eps)
VP_SAMPLE_SCHEDULERS = frozenset({"DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                                  "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                                  "PNDMScheduler", "LCMScheduler", "TCDScheduler", "SASolverScheduler"})
SIGMA_OPTIONS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def denoiser(pipe_or_network, scheduler=None, *, fixed: Optional[dict] = None, cond_arg: Optional[str] = None,
             timestep_scale: Optional[float] = None) -> "Denoiser":
    """The :class:`Denoiser` of a pipeline (its ``unet`` or ``transformer`` and its ``scheduler``) or of a network
    and a scheduler (or its config). ``fixed``: keyword arguments passed to every call as they are, not batched
    (Flux's ``img_ids`` / ``txt_ids``). ``timestep_scale``: what the pipeline multiplies the scheduler's timestep by
    before the network (default 1, Flux's 1/1000)."""
    network = pipe_or_network
    for name in ("unet", "transformer"):
        if getattr(pipe_or_network, name, None) is not None and hasattr(pipe_or_network, "scheduler"):
            network = getattr(pipe_or_network, name)
            scheduler = pipe_or_network.scheduler if scheduler is None else scheduler
            break
    if scheduler is None:
        raise ValueError("scheduler: pass the pipeline, or the network with its scheduler (or scheduler config)")
    return Denoiser(network, scheduler, fixed=fixed, cond_arg=cond_arg, timestep_scale=timestep_scale)


class Denoiser(DiffusersModel):
    """``model(x, t, y)`` of a diffusers network on diffusers' sampling parametrization (module docstring)."""

    def __init__(self, network, scheduler, *, fixed: Optional[dict] = None, cond_arg: Optional[str] = None,
                 timestep_scale: Optional[float] = None):
        super().__init__(network, scheduler, cond_arg=cond_arg)
        self._scheduler = scheduler if hasattr(scheduler, "set_timesteps") else None
        if timestep_scale is None:
            timestep_scale = 1e-3 if type(network).__name__.startswith("Flux") else 1.0  # FluxPipeline: t / 1000
        self.timestep_scale = float(timestep_scale)
        self.fixed = dict(fixed or {})
        unknown = [k for k in self.fixed if k not in self._params]
        if unknown:
            raise ValueError(f"fixed's keys {unknown} are not parameters of the network's forward {self._params}")
        if self.prediction_type == "flow":
            self.path, self.sigma_max = CondOT(), 1.0
        else:
            a = self._alphas_cumprod = self.path._log_a[1:].exp()  # float64 alpha_bar of the training timesteps
            self._log_sigmas = 0.5 * ((1.0 - a) / a).log()  # increasing with the timestep
            # room above the schedule's largest sigma: diffusers' float32 sigmas round up to 6e-8 of it
            self.sigma_max = float(self._log_sigmas[-1].exp()) * (1.0 + 1e-5)
            self.path = VE(self.sigma_max)
            self.prediction = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[self.prediction_type]
        self._on_grid = None  # (float32 flow times, their sigmas, their timesteps): the scheduler's own numbers
        self._on_device = {}

    # ---- grids ------------------------------------------------------------------------------------------------
    def grid(self, scheduler=None) -> list[float]:
        """The flow-time grid of ``scheduler``'s current run (after its ``set_timesteps``), one point per model
        step and the end; the network is called at the scheduler's timesteps there. Schedulers that evaluate
        the network twice per step (Heun, KDPM2) list each step's sigma once: give their grid to the method that
        evaluates between the points itself (heun, dpm_2)."""
        scheduler = scheduler or self._scheduler
        if scheduler is None or getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError("scheduler: a diffusers scheduler after set_timesteps is needed")
        timesteps = [float(v) for v in scheduler.timesteps.double().tolist()]
        sigmas = self._sigmas_of(scheduler, timesteps)
        if self.prediction_type == "flow":
            grid = [1.0 - s for s in sigmas]
        else:
            grid = [1.0 - s / self.sigma_max for s in sigmas]
            if any(g < 0.0 for g in grid):
                raise ValueError(f"the scheduler's sigmas exceed the training schedule's largest ({self.sigma_max})")
        if any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError("the scheduler's sigmas do not decrease step by step (a Heun or KDPM2 run lists each "
                             "step's sigma twice: build its grid from a one-evaluation scheduler of the same config)")
        self._on_grid = (grid[:len(timesteps)], sigmas[:len(timesteps)], timesteps)
        self._on_device = {}
        return grid

    def timesteps(self, steps: int, sigmas: Optional[str] = None, scheduler_class=None, schedule=None,
                  **config) -> list[float]:
        """The grid of ``steps`` steps of the scheduler class (default: the one given, else diffusers' Euler for
        DDPM-trained networks and FlowMatchEuler for flow ones) made from this denoiser's config, with
        ``sigmas`` "karras", "exponential" or "beta" (diffusers' use_*_sigmas) and further config overrides.

        ``schedule``: instead, a fastdiff schedule by name or object (fastdiff.schedules: "karras", "normal",
        "beta", "align_your_steps", "gits", "trailing", Shifted(image_seq_len=...), ...) on this denoiser's path,
        computed from the training schedule's own levels (a DDPM network's sigmas, ComfyUI's model_sampling)."""
        if schedule is not None:
            if sigmas is not None or scheduler_class is not None or config:
                raise ValueError("schedule: give its options to the schedule object (fastdiff.schedules), not "
                                 "together with sigmas, scheduler_class or scheduler config")
            from fastdiff.schedules import get_schedule

            schedule = get_schedule(schedule)
            table = None if self.prediction_type == "flow" else self._log_sigmas.exp().tolist()
            grid = schedule.grid(steps, self.path, levels=table)
            self._on_grid, self._on_device = None, {}  # the network's timesteps: the continuous map of each time
            return grid
        import diffusers

        if scheduler_class is None:
            scheduler_class = type(self._scheduler) if self._scheduler is not None else (
                diffusers.FlowMatchEulerDiscreteScheduler if self.prediction_type == "flow"
                else diffusers.EulerDiscreteScheduler)
        if sigmas is not None:
            if sigmas not in SIGMA_OPTIONS:
                raise ValueError(f"sigmas must be one of {', '.join(SIGMA_OPTIONS)} or None, got {sigmas!r} "
                                 "(diffusers' use_*_sigmas; fastdiff's named schedules: schedule=...)")
            config[SIGMA_OPTIONS[sigmas]] = True
        known = {k: v for k, v in self._config.items() if not k.startswith("_")}
        scheduler = scheduler_class.from_config({**known, **config})
        scheduler.set_timesteps(steps)
        return self.grid(scheduler)

    def initial_state(self, latents: torch.Tensor, grid: list, scheduler=None) -> torch.Tensor:
        """fastdiff.sample's ``noise`` (the state at grid[0]) where the scheduler's loop starts from ``latents``
        (the pipeline's ``latents`` argument: it multiplies them by init_noise_sigma, and a VP-sample scheduler such
        as DDIM or DPMSolverMultistep keeps alpha z + beta eps where this path keeps z + sigma eps)."""
        init = float(getattr(self._given(scheduler), "init_noise_sigma", 1.0))  # (FlowMatch schedulers have none)
        return self._rescaled(latents.double() * init, grid[0], scheduler, up=True).to(latents.dtype)

    def final_latents(self, x: torch.Tensor, grid: list, scheduler=None) -> torch.Tensor:
        """fastdiff's result at grid[-1] as the scheduler's loop ends: its VP scaling where the scheduler keeps
        one and the grid ends above sigma = 0 (DDIM without set_alpha_to_one)."""
        return self._rescaled(x.double(), grid[-1], scheduler, up=False).to(x.dtype)

    def _given(self, scheduler):
        scheduler = scheduler or self._scheduler
        if scheduler is None:
            raise ValueError("scheduler: the scheduler whose loop to match (or a denoiser made with one)")
        return scheduler

    def _rescaled(self, x, t: float, scheduler, up: bool):
        if self.prediction_type == "flow" or not _vp_sample(self._given(scheduler)):
            return x
        sigma = self.path.sigma(float(t))
        scale = math.sqrt(sigma * sigma + 1.0)
        return x * scale if up else x / scale

    def _sigmas_of(self, scheduler, timesteps: list) -> list[float]:
        """The noise level of each of the scheduler's steps and of its end, as the scheduler's step uses it."""
        n = len(timesteps)
        sig = getattr(scheduler, "sigmas", None)
        if sig is not None and len(sig) == n + 1:
            return [float(s) for s in sig.double().tolist()]
        if self.prediction_type == "flow" or sig is not None:
            raise ValueError(f"{type(scheduler).__name__} has {0 if sig is None else len(sig)} sigmas for {n} "
                             "timesteps; take a scheduler with one sigma per step and the end")
        # DDIM / DDPM: integer training timesteps, each step to the next, the last to final_alpha_cumprod
        a = scheduler.alphas_cumprod.double()
        taus = [int(v) for v in timesteps]
        out = [math.sqrt((1.0 - float(a[k])) / float(a[k])) for k in taus]
        final = getattr(scheduler, "final_alpha_cumprod", None)
        final = 1.0 if final is None else float(final)
        out.append(math.sqrt(max(1.0 - final, 0.0) / final))
        if out[-1] >= out[-2]:  # without set_alpha_to_one a grid ending at tau = 0 steps to alpha_bar[0] again
            out.pop()
        return out

    # ---- the call ---------------------------------------------------------------------------------------------
    def _levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, the network's timestep) for flow times t [B] (float64): the scheduler's own at grid points."""
        t64 = t.double()
        if self.prediction_type == "flow":
            sigma = 1.0 - t64
            timestep = sigma * self.num_train_timesteps
        else:
            sigma = self.sigma_max * (1.0 - t64)
            timestep = self._sigma_to_timestep(sigma)
        if self._on_grid is not None:
            table = self._on_device.get(t.device)
            if table is None:
                grid, sigmas, steps = self._on_grid
                table = self._on_device[t.device] = tuple(
                    torch.tensor(v, dtype=d, device=t.device) for v, d in
                    ((grid, torch.float32), (sigmas, torch.float64), (steps, torch.float64)))
            times, sigmas, steps = table
            match = t.float()[:, None] == times[None, :]
            found = match.any(1)
            idx = match.to(torch.uint8).argmax(1)
            sigma = torch.where(found, sigmas[idx], sigma)
            timestep = torch.where(found, steps[idx], timestep)
        return sigma, timestep

    def _sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """diffusers' continuous map: log sigma interpolated linearly over the training timesteps."""
        log_sigmas = self._log_sigmas.to(sigma.device)
        ls = sigma.clamp(min=1e-10).log()
        k = torch.searchsorted(log_sigmas, ls).clamp(1, log_sigmas.numel() - 1)
        lo, hi = log_sigmas[k - 1], log_sigmas[k]
        w = ((ls - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (k - 1).double() + w

    def forward(self, x, t, y=None):
        sigma, timestep = self._levels(t)
        shape = (-1, *([1] * (x.dim() - 1)))
        if self.prediction_type == "flow":
            inp = x
        else:
            inp = (x.double() / (sigma * sigma + 1.0).sqrt().view(shape)).to(x.dtype)
        out = self._network_call(inp, (timestep * self.timestep_scale).to(x.dtype), y, self.fixed)
        if self.prediction_type == "flow":
            return -out
        if self.prediction_type == "v_prediction":  # this path's v: the network's times sqrt(sigma^2 + 1)
            return (out.double() * (sigma * sigma + 1.0).sqrt().view(shape)).to(out.dtype)
        return out


def _vp_sample(scheduler) -> bool:
    return any(c.__name__ in VP_SAMPLE_SCHEDULERS for c in type(scheduler).__mro__)
