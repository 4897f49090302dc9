"""``FastDiffScheduler``: one diffusers scheduler over fastdiff's method registry.

    pipe.scheduler = FastDiffScheduler.from_config(pipe.scheduler.config)   # Heun, LMS, KDPM2, PNDM, DEIS, ...
    pipe.scheduler = FastDiffScheduler(method="dpmpp_2m", grid_scheduler="EulerDiscreteScheduler",
                                       grid_config={"use_karras_sigmas": True}, beta_schedule="scaled_linear", ...)

The config names a registered fastdiff method (``method``, ``method_options``) and the diffusers scheduler whose
``set_timesteps`` makes the grid (``grid_scheduler``, ``grid_config`` plus the training-schedule keys at the top
level): set_timesteps instantiates that class from the config and runs its own set_timesteps, so every
timestep spacing and Karras / exponential / beta sigmas come from diffusers, and ``timesteps``, ``sigmas``,
``init_noise_sigma``, ``add_noise`` are its own. ``from_config`` of a diffusers scheduler's config picks the method
that reproduces it (fastdiff.adapters.diffusers.scheduler_map) or refuses it, naming the option.

``step`` runs ONE STAGE of the method's stage table per call (a stage: one model evaluation, one fused
``sampler_step`` call), so ``timesteps`` holds one entry per stage (Heun's and KDPM2's repeated and midpoint
timesteps, PNDM's repeated second one, the singlestep DPM-Solver's inner points of its groups: diffusers' own), and
``prev_sample`` is the next stage's input. The
model output's conversion to x0 (epsilon, v_prediction, sample, flow's eps - z, EDM's c_skip / c_out) and the
scaling between the pipeline's sample and fastdiff's state (scheduler_map) are folded into each stage's
coefficient rows, computed once per schedule in float64; ``pred_original_sample`` is the kernel's side output
where the stage's side buffer is free or already holds x0 (else None).

Noise (DDPM, DDIM with eta, the ancestral and SDE methods) comes from fastdiff's per-sample streams, not the
generator: sample b uses seed ``seeds[b]`` (``set_seeds``; default 0 + b) and grid step i draws stream 1 + i (a
second draw of a step: 1 + i + 2^24, fastdiff.sampling.core.stage.draw_stream), so image b of a batch is image b
generated alone with its seed. ``generator`` is accepted and ignored.
"""

from __future__ import annotations

import math

import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from fastdiff.adapters.diffusers import scheduler_map as smap
from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows
from fastdiff.paths import VE, CondOT, DiscreteVP, affine_coefficients
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.deis import LOWER_ORDER_FINAL_BELOW
from fastdiff.sampling.methods.sigma_space import noise_level

ETA_METHODS = ("ddim", "tcd")  # methods whose eta step() takes per call (diffusers' DDIM and TCD step(eta=...))


@dataclass
class FastDiffSchedulerOutput(BaseOutput):
    """``prev_sample``: the next stage's input; ``pred_original_sample``: the x0 estimate, or None."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class FastDiffScheduler(_FusedStep, SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any fastdiff method one stage per ``step`` (see the module docstring)."""

    config_name = "scheduler_config.json"
    _compatibles = [*smap.SUPPORTED]
    order = 1

    @register_to_config
    def __init__(self, method: str = "euler", method_options: Optional[dict] = None,
                 grid_scheduler: str = "EulerDiscreteScheduler", grid_config: Optional[dict] = None,
                 scaling: Optional[str] = None, num_train_timesteps: Optional[int] = None,
                 beta_start: Optional[float] = None, beta_end: Optional[float] = None,
                 beta_schedule: Optional[str] = None, trained_betas=None, prediction_type: Optional[str] = None,
                 timestep_spacing: Optional[str] = None, steps_offset: Optional[int] = None,
                 shift: Optional[float] = None):
        record = get_method(method)
        self._options = dict(method_options or {})
        extra = sorted(set(self._options) - set(record.options))
        if extra:
            raise ValueError(f"method_options {extra} are not options of method={method!r} (it takes "
                             f"{', '.join(record.options) or 'none'})")
        cls = getattr(diffusers, grid_scheduler, None) if isinstance(grid_scheduler, str) else None
        if cls is None or not issubclass(cls, SchedulerMixin):
            raise ValueError(f"grid_scheduler={grid_scheduler!r} is not a diffusers scheduler class")
        default = smap.SUPPORTED.get(grid_scheduler, (None, None, None, 1))
        self._scaling = scaling or default[2]
        if self._scaling not in smap.SCALINGS:
            raise ValueError(f"scaling={scaling!r} must be one of {', '.join(smap.SCALINGS)} (none is known for "
                             f"grid_scheduler={grid_scheduler!r})")
        given = {k: v for k, v in locals().items() if k in smap.COMMON and v is not None}
        accepted = inspect.signature(cls.__init__).parameters
        kw = {k: v for k, v in {**(grid_config or {}), **given}.items() if k in accepted}
        self._orig = cls(**kw)
        # the grid scheduler's values of the training-schedule keys not given, for pipelines that read them
        self.register_to_config(**{k: self._orig.config[k] for k in smap.COMMON
                                   if k not in given and k in self._orig.config})
        self._record, self.order = record, default[3] if default[0] == method else 1
        self.timesteps = self.num_inference_steps = None
        self._plans, self._buffers = {}, {}
        self._step_index = self._begin_index = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """FastDiffScheduler from its own config, or from a diffusers scheduler's (``pipe.scheduler.config``): the
        method reproducing that scheduler (ValueError naming the scheduler or option where none does)."""
        if isinstance(config, ConfigMixin):  # a scheduler: its class names its config
            config = {"_class_name": type(config).__name__, **config.config}
        config = dict(config or {})
        own = set(inspect.signature(cls.__init__).parameters) - {"self"}
        name = cls.__name__ if not config.get("_class_name") and set(config) - {"_use_default_values"} <= own \
            else smap.identify(config)
        if name != cls.__name__:
            config = {"_class_name": cls.__name__, **smap.fastdiff_config(name, config)}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ---- diffusers' scheduler API -------------------------------------------------------------------------
    @property
    def init_noise_sigma(self):
        if self._scaling in ("vp", "flow", "discrete"):  # the sample is (nearly) unit noise at the grid's start
            return 1.0
        return self._orig.init_noise_sigma

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at stage ``begin_index`` of ``timesteps`` (img2img: ``t_start * order``), a step's first stage."""
        self._begin_index = begin_index
        if hasattr(self._orig, "set_begin_index"):
            self._orig.set_begin_index(begin_index)

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        """diffusers' grid scheduler's set_timesteps (its keywords: timesteps, sigmas, mu, ...), then this run's
        stage table over its noise levels."""
        orig = self._orig
        orig.set_timesteps(num_inference_steps, device=device, **kwargs)
        self.timesteps, self.num_inference_steps = orig.timesteps, orig.num_inference_steps
        if hasattr(orig, "sigmas"):
            self.sigmas = orig.sigmas
        if self._scaling == "discrete":  # LCM, TCD: the training schedule's path and timesteps (scheduler_map)
            self._path = DiscreteVP(orig.alphas_cumprod)
            levels = [*orig.timesteps.tolist(), smap.DISCRETE_END.get(self.config.grid_scheduler, -1)]
            self._grid = [self._path.time(float(tau)) for tau in levels]
        elif self._scaling == "flow":
            levels = smap.noise_levels(self.config.grid_scheduler, orig)
            self._path, self._grid = CondOT(), [1.0 - s for s in levels]
        else:
            levels = smap.noise_levels(self.config.grid_scheduler, orig)
            self._path = VE(levels[0])
            self._grid = [self._path.time(s) for s in levels]
        self._plans, self._buffers = {}, {}
        self._step_index = self._begin_index = None
        self._fd_run = None
        plan = self._plan(0, None)
        if len(plan.stages) != len(self.timesteps):
            raise RuntimeError(f"method={self.config.method!r} makes {len(plan.stages)} model evaluations over "
                               f"{self.config.grid_scheduler}'s grid of {len(levels) - 1} steps, but its timesteps "
                               f"hold {len(self.timesteps)}: choose a method with the grid scheduler's evaluations")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        if self._step_index is None:
            self._init_step_index(timestep)
        plan = self._plan(self._start()[0], None)
        m = plan.model_scale[self._step_index - plan.first]
        return sample if m == 1.0 else sample * m

    def add_noise(self, original_samples, noise, timesteps):
        return self._orig.add_noise(original_samples, noise, timesteps)

    def __len__(self):
        return self.config.num_train_timesteps or 1000

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: Optional[float] = None,
             generator=None, return_dict: bool = True, **unsupported):
        """Stage ``step_index`` of the method's table: one fused kernel call writing its output (the next stage's
        input, returned as ``prev_sample``) and its side buffer. ``eta``: DDIM's or TCD's gamma (methods 'ddim',
        'tcd'; None: the config's method_options, TCD's 0.3 as diffusers' step default; others take 0 or
        None); ``generator`` is ignored (the noise is fastdiff's per-sample stream, ``set_seeds``)."""
        given = {k: v for k, v in unsupported.items() if v not in (None, False)}
        if given:
            raise ValueError(f"step({', '.join(f'{k}={v!r}' for k, v in given.items())}) is not supported by "
                             "FastDiffScheduler: set the method's options in its config (method_options)")
        if eta not in (None, 0, 0.0) and self.config.method not in ETA_METHODS:
            raise ValueError(f"eta={eta!r} applies to method='ddim' or 'tcd'; method={self.config.method!r} takes "
                             "its noise options from method_options")
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        start, _ = self._start()
        plan = self._plan(start, eta if self.config.method in ETA_METHODS else None)
        k = self._step_index - plan.first
        if not 0 <= k < len(plan.stages):
            raise ValueError(f"step called {self._step_index + 1} times, but the schedule has {len(self.timesteps)} "
                             "stages (call set_timesteps to start a new run)")
        st, (rows, checked, streams) = plan.stages[k], plan.rows[k]
        x, g = self._inputs(model_output, sample)
        buffers = self._buffers
        buffers[st.input] = x
        try:
            history = [buffers[h] for h in st.history_buffers()]
        except KeyError as exc:
            raise ValueError(f"stage {self._step_index} reads buffer {exc} that no earlier step wrote (steps must run "
                             "in order from the first stage or the begin index)") from None
        seeds = self._seeds_for(x.shape[0], x.device) if streams else None
        side = torch.empty_like(x)
        out = self._fused_step(x, g, rows, checked, history=history, seeds=seeds, streams=streams, side=side)
        buffers[st.out] = out
        if st.side is not None:
            buffers[st.side] = side
        x0 = side if plan.x0_side[k] else None
        self._step_index += 1
        prev = out if out.dtype is sample.dtype else out.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return FastDiffSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # ---- the stage tables ---------------------------------------------------------------------------------
    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        if self.timesteps is None:
            raise ValueError("call set_timesteps before scale_model_input or step")
        t = timestep.to(self.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
        hits = (self.timesteps == t).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f"timestep {timestep} is not one of scheduler.timesteps (call set_timesteps first)")
        self._step_index = hits[1] if len(hits) > 1 else hits[0]  # diffusers' rule: a repeat is a step's start

    def _start(self) -> tuple[int, int]:
        """(grid step, stage) where this run starts: the begin index's step (0 without one)."""
        full = self._plan(0, None)
        first = self._begin_index or 0
        if not 0 <= first < len(full.stages) or (first > 0 and not full.stages[first - 1].final):
            raise ValueError(f"begin index {first} is not the first stage of a step of method="
                             f"{self.config.method!r} (stages: {len(full.stages)}; pass t_start * scheduler.order)")
        step = full.stages[first].step
        if self.config.method == "lms" and step > 0 and self._options.get("order", 4) > 1:
            raise ValueError(f"begin index {first}: diffusers' LMSDiscreteScheduler started mid-schedule weights its "
                             "first steps with the full order's coefficients over the one or two derivatives it has "
                             "(its warm-up counts from step 0); fastdiff's lms restarts its warm-up, so it does not "
                             "reproduce that: use diffusers' scheduler for img2img with LMS")
        if self.config.method == "dpm_singlestep" and step > 0 and step not in self._group_starts():
            raise ValueError(f"begin index {first} falls inside a group of DPMSolverSinglestepScheduler's order list "
                             "(diffusers lowers the order there, keeping the whole schedule's groups); fastdiff "
                             f"restarts the method at a group's first step: steps {sorted(self._group_starts())}")
        return step, first

    def _group_starts(self) -> set:
        """The grid steps where a DPM-Solver singlestep group starts on the whole schedule."""
        from fastdiff.sampling.methods.dpm_singlestep import group_sizes

        levels = [self._level(t) for t in self._grid]
        skip = 1 if math.isinf(levels[0]) else 0  # a first step from alpha = 0 stands alone (DDIM's limit)
        opts = self._options
        sizes = group_sizes(len(self._grid) - 1 - skip, opts.get("order", 2), opts.get("lower_order_final", True),
                            levels[-1] == 0.0)
        starts, k = set(range(skip + 1)), skip
        for size in sizes:
            starts.add(k)
            k += size
        return starts

    def _plan(self, start: int, eta) -> SimpleNamespace:
        """The stage table from grid step ``start`` (a run from a begin index starts the method there: multistep
        history and warm-up restart, as diffusers' do) and each stage's folded rows, once per schedule."""
        key = (start, eta)
        if key in self._plans:
            return self._plans[key]
        options = dict(self._options)
        if eta is not None:
            options["eta"] = float(eta)
        if self.config.method == "deis" and options.get("lower_order_final") and \
                len(self._grid) - 1 >= LOWER_ORDER_FINAL_BELOW:
            options["lower_order_final"] = False  # diffusers' DEIS counts its rule over the whole schedule
        if self.config.method == "sa_solver" and self.config.grid_scheduler == "SASolverScheduler":
            options.update(self._sa_solver_tau())
        grid = self._grid[start:]
        stages = self._record.stages(self._path, grid, "x0", **options)
        first = 0 if start == 0 else self._plan(0, None).stages.index(
            next(s for s in self._plan(0, None).stages if s.step == start))
        plan = SimpleNamespace(stages=stages, first=first, rows=[], x0_side=[], model_scale=[])
        cfg = self._orig.config
        sigma_data = cfg.get("sigma_data", 0.5)
        scale = {}  # buffer -> f with fastdiff's value = f x the stored one
        for k, st in enumerate(stages):
            if st.start_churn is not None:
                raise ValueError(f"method={self.config.method!r} with churn: churn is not supported by "
                                 "FastDiffScheduler")
            if k + 1 < len(stages) and stages[k + 1].input != st.out:
                raise NotImplementedError(f"method={self.config.method!r}: stage {k + 1} reads {stages[k + 1].input!r}"
                                          f", not stage {k}'s output {st.out!r}")
            sigma = self._level(st.t)
            if self._scaling == "discrete":  # the state is the sample; the method converts on the path itself
                a, b = affine_coefficients(self._path, st.t, self.config.prediction_type, "x0")
            else:
                a, b = smap.x0_coefficients(self._scaling, self.config.prediction_type, sigma, sigma_data,
                                            cfg.get("sigma_min", 0.0))
            f_in = 1.0 / smap.sample_scale(self._scaling, sigma)
            t_next = stages[k + 1].t if k + 1 < len(stages) else grid[-1]
            q_out = smap.sample_scale(self._scaling, self._level(t_next))
            scale[st.input] = f_in
            hist = [(st.c_extra, st.s_extra, scale.get(st.extra, 1.0))] if st.extra else []
            hist += [(c, s, scale.get(h, 1.0)) for h, c, s in st.history]
            draws = [c for _, c in st.draws()]
            row = [(st.c_x + st.c_pred * a) * f_in * q_out, st.c_pred * b * q_out, *(c * f * q_out for c, _, f in hist),
                   *(c * q_out for c in draws)]
            if st.side is None:  # the side output is free: the stage's x0 estimate (LCM's: its denoised sample)
                ax, bx = st.x0 if st.x0 != (0.0, 0.0) else (0.0, 1.0)
                side, is_x0 = [(ax + bx * a) * f_in, bx * b, *(0.0 for _ in hist)], True
            else:
                side = [(st.s_x + st.s_pred * a) * f_in, st.s_pred * b, *(s * f for _, s, f in hist)]
                is_x0 = (st.s_x, st.s_pred) == (0.0, 1.0) and all(s == 0.0 for _, s, _ in hist)
            rows = row + side + [0.0] * len(draws)
            streams = [s + start for s in st.streams()]  # draw_stream(i) of the full grid's step i
            plan.rows.append((rows, checked_rows(rows), streams))
            plan.x0_side.append(is_x0)
            plan.model_scale.append(smap.model_input_scale(self._scaling, sigma, sigma_data))
            scale[st.out] = 1.0 / q_out
            if st.side is not None:
                scale[st.side] = 1.0
        self._plans[key] = plan
        return plan

    def _sa_solver_tau(self) -> dict:
        """SASolverScheduler's noise fraction tau_func(timestep) at each step's start as sa_solver's eta on an
        interval of the grid: the end times of the first and last noisy steps (sa_solver tests each step's end)."""
        taus = [float(self._orig.tau_func(t)) for t in self.timesteps]
        noisy = [k for k, tau in enumerate(taus) if tau != 0.0]
        if not noisy:
            return {"eta": 0.0}
        if len({taus[k] for k in noisy}) > 1 or noisy != list(range(noisy[0], noisy[-1] + 1)) or taus[noisy[0]] < 0:
            raise ValueError(f"SASolverScheduler's tau over the steps, {taus}, is not one value >= 0 on consecutive "
                             "steps: sa_solver's eta on an interval cannot express it")
        return {"eta": taus[noisy[0]], "sde_start_percent": self._grid[noisy[0] + 1],
                "sde_end_percent": self._grid[noisy[-1] + 1]}

    def _level(self, t: float) -> float:
        """The noise level at flow time t (VE's sigma, or flow matching's s = 1 - t)."""
        if self._scaling == "discrete":
            return noise_level(self._path, t)
        return 1.0 - t if self._scaling == "flow" else self._path.sigma(t)
