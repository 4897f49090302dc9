"""Named schedules as objects: ``sample(model, steps, schedule="karras")`` or ``schedule=Karras(rho=5.0)``.

A schedule makes its noise levels (fastdiff.schedules.formulas) and maps them to a flow-time grid on the call's
path (fastdiff.schedules.levels): steps + 1 increasing times ending where the level is 0 (t = 1), or at the
peer's last level where the peer does not end at 0 (laplace). A repeated level (a step of length 0, which the
peers' loops pass through unchanged) is dropped, so such a grid has fewer steps.

Coordinates. Schedules of the model's own range (ComfyUI's schedulers, k-diffusion's karras / exponential /
polyexponential / laplace, diffusers' spacings) are computed in the path's coordinate: sigma = beta / alpha on
VP / VE-type paths, the noise fraction beta on CondOT (ComfyUI's CONST sigma). Their default sigma_min /
sigma_max are the path's training levels at timesteps 0 and N - 1 (ComfyUI's model_sampling.sigma_min /
sigma_max; on CondOT 1/N and 1). Schedules of absolute levels (Align Your Steps, GITS and k-diffusion's vp:
sigma = beta / alpha; Shifted: diffusers' FlowMatch noise fraction s) are carried to another coordinate at the
same signal-to-noise ratio, s = sigma / (1 + sigma). A first level above the path's largest starts at t = 0.
"""

from __future__ import annotations

from typing import Optional, Sequence

from fastdiff.gaussian_paths import get_path
from fastdiff.schedules import formulas as S
from fastdiff.schedules.base import Schedule, _count, _number
from fastdiff.schedules.levels import Levels
from fastdiff.schedules.tables import AYS, AYS_ALIASES, AYS_SOURCES


class _Range(Schedule):
    def __init__(self, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
        self.sigma_min = _number(self.name, "sigma_min", sigma_min, 0.0, True, optional=True)
        self.sigma_max = _number(self.name, "sigma_max", sigma_max, 0.0, True, optional=True)
        if self.sigma_min is not None and self.sigma_max is not None and not self.sigma_min < self.sigma_max:
            raise ValueError(f"schedule {self.name!r} needs sigma_min < sigma_max, got {sigma_min} and {sigma_max}")

    def _range(self, lv: Levels) -> tuple[float, float]:
        lo = lv.sigma_min if self.sigma_min is None else self.sigma_min
        hi = lv.sigma_max if self.sigma_max is None else self.sigma_max
        if not lo < hi:
            raise ValueError(f"schedule {self.name!r}: sigma_min = {lo} is not below sigma_max = {hi}")
        return lo, hi


class Karras(_Range):
    """k-diffusion's get_sigmas_karras (ComfyUI "karras")."""
    name = "karras"

    def __init__(self, rho: float = 7.0, sigma_min=None, sigma_max=None):
        self.rho = _number(self.name, "rho", rho, 0.0, True)
        super().__init__(sigma_min, sigma_max)

    def sigmas(self, steps, lv):
        return S.karras(steps, *self._range(lv), rho=self.rho)


class Exponential(_Range):
    """k-diffusion's get_sigmas_exponential (ComfyUI "exponential")."""
    name = "exponential"

    def sigmas(self, steps, lv):
        return S.exponential(steps, *self._range(lv))


class PolyExponential(_Range):
    """k-diffusion's get_sigmas_polyexponential."""
    name = "polyexponential"

    def __init__(self, rho: float = 1.0, sigma_min=None, sigma_max=None):
        self.rho = _number(self.name, "rho", rho, 0.0, True)
        super().__init__(sigma_min, sigma_max)

    def sigmas(self, steps, lv):
        return S.polyexponential(steps, *self._range(lv), rho=self.rho)


class Laplace(_Range):
    """ComfyUI's get_sigmas_laplace (steps + 1 levels, ending at sigma_min: no final 0)."""
    name = "laplace"

    def __init__(self, mu: float = 0.0, beta: float = 0.5, sigma_min=None, sigma_max=None):
        self.mu = _number(self.name, "mu", mu)
        self.beta = _number(self.name, "beta", beta, 0.0, True)
        super().__init__(sigma_min, sigma_max)

    def sigmas(self, steps, lv):
        return S.laplace(steps + 1, *self._range(lv), mu=self.mu, beta=self.beta)


class KLOptimal(_Range):
    """ComfyUI's kl_optimal_scheduler."""
    name = "kl_optimal"

    def sigmas(self, steps, lv):
        return S.kl_optimal(steps, *self._range(lv))


class LinearQuadratic(Schedule):
    """ComfyUI's linear_quadratic_schedule (Mochi)."""
    name = "linear_quadratic"

    def __init__(self, threshold_noise: float = 0.025, linear_steps: Optional[int] = None,
                 sigma_max: Optional[float] = None):
        self.threshold_noise = _number(self.name, "threshold_noise", threshold_noise, 0.0, True)
        self.linear_steps = _count(self.name, "linear_steps", linear_steps, 1, optional=True)
        self.sigma_max = _number(self.name, "sigma_max", sigma_max, 0.0, True, optional=True)

    def sigmas(self, steps, lv):
        lin = steps // 2 if self.linear_steps is None else self.linear_steps
        if steps > 1 and not 1 <= lin < steps:
            raise ValueError(f"linear_steps of schedule {self.name!r} must lie in [1, steps - 1], got {lin}")
        return S.linear_quadratic(steps, lv.sigma_max if self.sigma_max is None else self.sigma_max,
                                  self.threshold_noise, self.linear_steps)


class VPSchedule(Schedule):
    """k-diffusion's get_sigmas_vp (absolute levels sigma = beta / alpha)."""
    name = "vp"
    native = "sigma"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3):
        self.beta_d = _number(self.name, "beta_d", beta_d, 0.0, True)
        self.beta_min = _number(self.name, "beta_min", beta_min, 0.0)
        self.eps_s = _number(self.name, "eps_s", eps_s, 0.0, True)
        if not self.eps_s < 1.0:
            raise ValueError(f"eps_s of schedule 'vp' must lie in (0, 1), got {eps_s}")

    def sigmas(self, steps, lv):
        return S.vp(steps, self.beta_d, self.beta_min, self.eps_s)


class _Table(Schedule):
    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = _count(self.name, "num_train_timesteps", num_train_timesteps, 2)


class Normal(_Table):
    """ComfyUI's normal_scheduler."""
    name = "normal"

    def sigmas(self, steps, lv):
        return S.normal(lv, steps)


class SGMUniform(_Table):
    """ComfyUI's normal_scheduler(sgm=True)."""
    name = "sgm_uniform"

    def sigmas(self, steps, lv):
        return S.normal(lv, steps, sgm=True)


class Simple(_Table):
    """ComfyUI's simple_scheduler."""
    name = "simple"

    def sigmas(self, steps, lv):
        return S.simple(lv, steps)


class DDIMUniform(_Table):
    """ComfyUI's ddim_scheduler (its step count may differ from steps, as ComfyUI's does)."""
    name = "ddim_uniform"

    def sigmas(self, steps, lv):
        return S.ddim_uniform(lv, steps)


class Beta(_Table):
    """ComfyUI's beta_scheduler (repeated timesteps dropped: fewer steps where they collide)."""
    name = "beta"

    def __init__(self, alpha: float = 0.6, beta: float = 0.6, num_train_timesteps: int = 1000):
        self.alpha = _number(self.name, "alpha", alpha, 0.0, True)
        self.beta = _number(self.name, "beta", beta, 0.0, True)
        super().__init__(num_train_timesteps)

    def sigmas(self, steps, lv):
        return S.beta(lv, steps, self.alpha, self.beta)


SPACINGS = ("leading", "trailing", "linspace")


class TimestepSpacing(_Table):
    """diffusers' timestep_spacing (EulerDiscreteScheduler.set_timesteps, interpolation_type="linear")."""
    name = "timestep_spacing"

    def __init__(self, timestep_spacing: str = "leading", steps_offset: int = 0, num_train_timesteps: int = 1000):
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {', '.join(SPACINGS)}, got {timestep_spacing!r}")
        self.timestep_spacing = timestep_spacing
        self.steps_offset = _count(self.name, "steps_offset", steps_offset, 0)
        super().__init__(num_train_timesteps)

    def sigmas(self, steps, lv):
        return S.spacing(lv, steps, self.timestep_spacing, self.steps_offset)


class AlignYourSteps(Schedule):
    """Align Your Steps: the published 10-step table of ``model`` ("sd15", "sdxl", "svd") from ``source``
    ("timesteps": SD's levels at the published timesteps, ComfyUI's digits; "sigmas": the published 3-decimal
    sigmas, diffusers' AysSchedules), log-linearly interpolated to other step counts, the last level 0 (absolute
    levels sigma = beta / alpha)."""
    name = "align_your_steps"
    native = "sigma"

    def __init__(self, model: str = "sd15", source: str = "timesteps"):
        key = AYS_ALIASES.get(str(model).lower()) if isinstance(model, str) else None
        if key is None:
            raise ValueError(f"model of schedule 'align_your_steps' must be one of {', '.join(AYS)}, got {model!r}")
        if source not in AYS_SOURCES:
            raise ValueError(f"source of schedule 'align_your_steps' must be one of {', '.join(AYS_SOURCES)}, "
                             f"got {source!r}")
        self.model, self.source = key, source

    def sigmas(self, steps, lv):
        return S.tabled(AYS_SOURCES[self.source][self.model], steps)


class GITS(Schedule):
    """GITS (Chen et al. 2024): the searched SD 1.5 schedules of ``coeff`` (0.80 .. 1.50 by 0.05) for 2 .. 20
    steps; more steps log-linearly interpolate the 20-step one; the last level 0 (absolute levels)."""
    name = "gits"
    native = "sigma"

    def __init__(self, coeff: float = 1.20):
        from fastdiff.schedules.gits_table import GITS_LEVELS

        value = _number(self.name, "coeff", coeff)
        key = round(value, 2)
        if key not in GITS_LEVELS or abs(key - value) > 1e-9:
            raise ValueError(f"coeff of schedule 'gits' must be one of {', '.join(f'{k:.2f}' for k in GITS_LEVELS)}, "
                             f"got {coeff!r}")
        self.coeff = key

    def sigmas(self, steps, lv):
        from fastdiff.schedules.gits_table import GITS_LEVELS

        rows = GITS_LEVELS[self.coeff]
        if steps == 1:
            raise ValueError("schedule 'gits' has tables for 2 steps or more, got steps=1")
        if steps - 2 < len(rows):
            return rows[steps - 2][:-1] + [0.0]
        return S.tabled(rows[-1], steps)


class Shifted(Schedule):
    """diffusers' FlowMatchEulerDiscreteScheduler grid (noise fractions s of CondOT): the static ``shift``
    (SD3: 3.0), or dynamic shifting with ``mu`` (or ``image_seq_len``: mu = dynamic_shift_mu(image_seq_len,
    base_seq_len, max_seq_len, base_shift, max_shift), Flux / SD3.5) and ``time_shift_type``, stretched to end
    at ``shift_terminal``; ``pipeline_sigmas``: the pipelines' linspace(1, 1/steps) before the shift."""
    name = "shifted"
    native = "flow"

    def __init__(self, shift: float = 1.0, mu: Optional[float] = None, time_shift_type: str = "exponential",
                 shift_terminal: Optional[float] = None, image_seq_len: Optional[int] = None,
                 base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15,
                 num_train_timesteps: int = 1000, pipeline_sigmas: bool = False):
        self.shift = _number(self.name, "shift", shift, 0.0, True)
        if mu is not None and image_seq_len is not None:
            raise ValueError("schedule 'shifted' takes mu or image_seq_len, not both")
        if image_seq_len is not None:
            _number(self.name, "image_seq_len", image_seq_len, 0.0, True)
            if not max_seq_len != base_seq_len:
                raise ValueError("schedule 'shifted' needs max_seq_len != base_seq_len")
            mu = S.dynamic_shift_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        self.mu = _number(self.name, "mu", mu, optional=True)
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type of schedule 'shifted' must be one of exponential, linear, "
                             f"got {time_shift_type!r}")
        if time_shift_type == "linear" and self.mu is not None and self.mu <= 0:
            raise ValueError(f"mu of schedule 'shifted' must be > 0 with time_shift_type='linear', got {mu}")
        self.time_shift_type = time_shift_type
        self.shift_terminal = _number(self.name, "shift_terminal", shift_terminal, 0.0, True, optional=True)
        if self.shift_terminal is not None and not self.shift_terminal < 1.0:
            raise ValueError(f"shift_terminal of schedule 'shifted' must lie in (0, 1), got {shift_terminal}")
        self.num_train_timesteps = _count(self.name, "num_train_timesteps", num_train_timesteps, 2)
        if not isinstance(pipeline_sigmas, bool):
            raise ValueError(f"pipeline_sigmas of schedule 'shifted' must be True or False, got {pipeline_sigmas!r}")
        self.pipeline_sigmas = pipeline_sigmas

    def sigmas(self, steps, lv):
        return S.flow_match(steps, self.shift, self.mu, self.time_shift_type, self.shift_terminal,
                            self.num_train_timesteps, self.pipeline_sigmas)


# name -> (class, fixed options): the defaults of the peer's own scheduler of that name
SCHEDULES = {
    "normal": (Normal, {}), "karras": (Karras, {}), "exponential": (Exponential, {}),
    "sgm_uniform": (SGMUniform, {}), "simple": (Simple, {}), "ddim_uniform": (DDIMUniform, {}), "beta": (Beta, {}),
    "linear_quadratic": (LinearQuadratic, {}), "kl_optimal": (KLOptimal, {}),
    "leading": (TimestepSpacing, {"timestep_spacing": "leading"}),
    "trailing": (TimestepSpacing, {"timestep_spacing": "trailing"}),
    "linspace": (TimestepSpacing, {"timestep_spacing": "linspace"}),
    "align_your_steps": (AlignYourSteps, {}), "ays_sd15": (AlignYourSteps, {"model": "sd15"}),
    "ays_sdxl": (AlignYourSteps, {"model": "sdxl"}), "ays_svd": (AlignYourSteps, {"model": "svd"}),
    "gits": (GITS, {}), "polyexponential": (PolyExponential, {}), "vp": (VPSchedule, {}), "laplace": (Laplace, {}),
    "shifted": (Shifted, {}),
}
SCHEDULE_NAMES = tuple(SCHEDULES)


def get_schedule(schedule, arg: str = "schedule", **options) -> Schedule:
    """A Schedule from a name (with ``options`` as its constructor's arguments) or a Schedule as is."""
    if isinstance(schedule, Schedule):
        if options:
            raise ValueError(f"{arg}: options {sorted(options)} go to the schedule's constructor, not with an object")
        return schedule
    if isinstance(schedule, str) and schedule.strip().lower() in SCHEDULES:
        cls, fixed = SCHEDULES[schedule.strip().lower()]
        try:
            return cls(**{**fixed, **options})
        except TypeError as exc:
            raise ValueError(f"{arg}={schedule!r}: {exc}") from None
    raise ValueError(f"unknown {arg}={schedule!r}; valid schedules: {', '.join(SCHEDULE_NAMES)} "
                     "(or a fastdiff.schedules.Schedule)")


def schedule_grid(schedule, steps: int, path="condot", t_start: float = 0.0,
                  levels: Optional[Sequence[float]] = None, **options) -> list[float]:
    """The flow-time grid of a named schedule (or Schedule) with ``steps`` steps on ``path``."""
    return get_schedule(schedule, **options).grid(steps, path, t_start, levels)


def sigmas(schedule, steps: int, path="condot", levels: Optional[Sequence[float]] = None, **options) -> list[float]:
    """The schedule's levels in its coordinate (the path's, or its own absolute one) before they become times:
    what the peer's own scheduler returns."""
    s = get_schedule(schedule, **options)
    return s.sigmas(steps, s.levels(get_path(path), levels))
