"""Few-step samplers of distilled / consistency models: denoise, then re-noise to the next level with fresh noise.

Each step evaluates the model once at t, forms a clean estimate D and puts it back on the path at the next level;
on x_t = alpha_t z + beta_t eps (sigma = beta / alpha, k-diffusion's noise level, the scaled state x / alpha):

- lcm (Luo et al. 2023, "Latent Consistency Models"; diffusers' LCMScheduler; ComfyUI comfy/k_diffusion/sampling.py
  sample_lcm):  x' = alpha' D + beta' s_i xi,  xi fresh N(0, I), none where beta' = 0.
  D = x0(g), the model's clean estimate (a consistency model's output already is the consistency function); with
  ``timestep_scaling`` (diffusers' LCMScheduler) D = c_skip x + c_out x0(g) with LCM's boundary condition at the
  training timestep tau of a fastdiff.paths.DiscreteVP path: c_skip = s^2 / ((k tau)^2 + s^2),
  c_out = k tau / sqrt((k tau)^2 + s^2), s = sigma_data = 0.5, k = timestep_scaling (diffusers multiplies the
  path's state itself, the VP sample, by c_skip). s_i: ComfyUI's s_noise, linearly to s_noise_end over the steps
  (s_i = s_noise + (s_noise_end - s_noise) i / (n - 1)). On the VE path this is ComfyUI's x = D + sigma' xi
  (EPS models' noise_scaling), on CondOT its CONST x = (1 - sigma') D + sigma' xi, i.e. diffusers'
  FlowMatchLCMScheduler (no separate method: the same table). ComfyUI's noise_clip_std clamps the draw at a
  multiple of its standard deviation over the whole tensor, which is not linear: not offered.
- tcd (Zheng et al. 2024, "Trajectory Consistency Distillation"; diffusers' TCDScheduler, eta = its gamma, 0.3):
  the DDIM step to an intermediate level s, x_s = alpha_s x0(g) + beta_s eps(g), then the forward process from s to
  the next level: x' = (alpha' / alpha_s) x_s + sqrt(beta'^2 - (alpha' beta_s / alpha_s)^2) xi. The intermediate
  time: 1 - t_s = (1 - eta)(1 - t') (the paper's s = (1 - gamma) t' in diffusion time); on a DiscreteVP path
  diffusers' integer rule tau_s = floor((1 - eta) tau') at the training timestep. eta = 0: deterministic DDIM.
  diffusers' last step (to tau = 0) returns x_s, which is this formula there (s = t').
- cm_multistep (Song et al. 2023, "Consistency Models", Algorithm 1; diffusers' CMStochasticIterativeScheduler):
  x' / alpha' = D + s_noise sqrt(max(sigma'^2 - sigma_min^2, 0)) xi, D treated as a sample at the data level
  sigma_min. D = x0(g), or with ``sigma_data`` the boundary-condition parameterization of the model's raw output
  g: D = c_skip x / alpha + c_out g, c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd
  / sqrt(sigma^2 + sd^2) (diffusers' get_scalings_for_boundary_condition; written in alpha and beta so that the
  step from alpha = 0 is finite). Named for the scheduler's multistep consistency sampling; "cm" alone would also
  name the consistency *training* objective.

diffusers' FlowMapEulerDiscreteScheduler is Euler (x' = x - (sigma - sigma') u) on a flow map model u(x, t, r)
whose second time r is the step's end: its drop-in is method "euler" (fastdiff.adapters.diffusers; the pipeline
passes r to its model itself), and fastdiff.sample runs it as method "euler" on CondOT with the model wrapped in
:class:`FlowMapModel`, which hands the model the grid's next time as r.
"""

from __future__ import annotations

import math

import torch

from fastdiff.paths import DiscreteVP, affine_coefficients, check_prediction
from fastdiff.sampling.core.stage import Stage, draw_stream
from fastdiff.sampling.methods.coefficients import check_s_noise
from fastdiff.sampling.methods.registry import register_method

LCM_SIGMA_DATA = 0.5  # diffusers' LCMScheduler fixes it


def _number(method: str, name: str, value, lo: float = 0.0, hi: float = math.inf, open_lo=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > lo if open_lo else value >= lo) and value <= hi
    if not ok:
        where = f"{'>' if open_lo else '>='} {lo:g}" + (f" and <= {hi:g}" if math.isfinite(hi) else "")
        raise ValueError(f"{name} must be a finite number {where} for method={method!r}, got {value!r}")
    return float(value)


def training_timestep(path, t: float) -> float:
    """The training timestep tau of flow time t on a DiscreteVP path, snapped to the integer it is within 1e-6 of
    (a grid made of path.time(tau) recovers diffusers' integer timesteps)."""
    tau = path.tau(t)
    return float(round(tau)) if abs(tau - round(tau)) < 1e-6 else tau


def _noise_scales(method: str, steps: int, s_noise, s_noise_end) -> list[float]:
    start = check_s_noise(s_noise)
    end = start if s_noise_end is None else _number(method, "s_noise_end", s_noise_end)
    return [start + (end - start) * (i / (steps - 1) if steps > 1 else 0.0) for i in range(steps)]


@register_method("lcm", options={"s_noise": 1.0, "s_noise_end": None, "timestep_scaling": None}, evals_per_step=1,
                 conversions=("x0",),
                 description="latent consistency model sampling: the clean estimate, re-noised to the next level "
                             "with fresh noise (ComfyUI's lcm; diffusers' LCMScheduler with timestep_scaling)")
def _lcm(path, grid, prediction, s_noise=1.0, s_noise_end=None, timestep_scaling=None) -> list[Stage]:
    scales = _noise_scales("lcm", len(grid) - 1, s_noise, s_noise_end)
    if timestep_scaling is not None:
        timestep_scaling = _number("lcm", "timestep_scaling", timestep_scaling)
        if not isinstance(path, DiscreteVP):
            raise ValueError("timestep_scaling applies LCM's boundary condition at the training timestep, which "
                             f"method='lcm' reads from a DiscreteVP path (fastdiff.paths.DiscreteVP), not {path!r}")
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        al1, be1 = path.coefficients(t1)[:2]
        a, b = affine_coefficients(path, t, prediction, "x0")
        if timestep_scaling is not None:
            k = training_timestep(path, t) * timestep_scaling
            d2 = k * k + LCM_SIGMA_DATA ** 2
            c_skip, c_out = LCM_SIGMA_DATA ** 2 / d2, k / math.sqrt(d2)
            a, b = c_skip + c_out * a, c_out * b
        noise = be1 * scales[i] if be1 > 0 else 0.0
        stages.append(Stage(i, t, "x", "x", al1 * a, al1 * b, c_noise=noise, stream=draw_stream(i), x0=(a, b),
                            final=True))
    return stages


def intermediate_time(path, t1: float, eta: float) -> float:
    """TCD's intermediate time s for a step ending at t1: 1 - s = (1 - eta)(1 - t1); diffusers' floor((1 - eta) tau')
    on a DiscreteVP path; never noisier than t1."""
    if eta == 0.0:  # DDIM to t1 itself (1 - (1 - t1) need not round to t1)
        return t1
    if isinstance(path, DiscreteVP):
        s = path.time(float(math.floor((1.0 - eta) * training_timestep(path, t1))))
    else:
        s = 1.0 - (1.0 - eta) * (1.0 - t1)
    return min(max(s, t1), 1.0)


@register_method("tcd", options={"eta": 0.3}, evals_per_step=1, conversions=("x0", "eps"),
                 description="trajectory consistency distillation's strategic stochastic sampling: DDIM to "
                             "(1 - eta) of the next level, forward noise back to it (diffusers' TCDScheduler)")
def _tcd(path, grid, prediction, eta=0.3) -> list[Stage]:
    eta = _number("tcd", "eta", eta, hi=1.0)
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        al1, be1 = path.coefficients(t1)[:2]
        s = intermediate_time(path, t1, eta)
        al_s, be_s = path.coefficients(s)[:2]
        a0, b0 = affine_coefficients(path, t, prediction, "x0")
        ae, be = affine_coefficients(path, t, prediction, "eps") if be_s > 0 else (0.0, 0.0)
        r = al1 / al_s  # the forward process from s to t1: x' = r x_s + sqrt(beta'^2 - r^2 beta_s^2) xi
        noise = math.sqrt(max(0.0, be1 * be1 - (r * be_s) ** 2)) if s > t1 else 0.0
        stages.append(Stage(i, t, "x", "x", r * (al_s * a0 + be_s * ae), r * (al_s * b0 + be_s * be), c_noise=noise,
                            stream=draw_stream(i), x0=(a0, b0), final=True))
    return stages


def boundary_scalings(al: float, be: float, sigma_min: float, sigma_data: float) -> tuple[float, float]:
    """(c_skip / alpha, c_out) of the consistency models' parameterization at sigma = beta / alpha, finite at
    alpha = 0 (c_skip / alpha -> 0, c_out -> sigma_data)."""
    d = be - sigma_min * al  # alpha (sigma - sigma_min)
    c_skip_over_alpha = sigma_data ** 2 * al / (d * d + (sigma_data * al) ** 2)
    return c_skip_over_alpha, d * sigma_data / math.sqrt(be * be + (sigma_data * al) ** 2)


@register_method("cm_multistep", options={"sigma_min": 0.002, "s_noise": 1.0, "sigma_data": None},
                 evals_per_step=1, conversions=lambda sigma_data=None, **_: () if sigma_data is not None else ("x0",),
                 description="consistency models' multistep sampling: the clean estimate, re-noised to the next level "
                             "by sqrt(sigma'^2 - sigma_min^2) (diffusers' CMStochasticIterativeScheduler)")
def _cm_multistep(path, grid, prediction, sigma_min=0.002, s_noise=1.0, sigma_data=None) -> list[Stage]:
    sigma_min = _number("cm_multistep", "sigma_min", sigma_min)
    s_noise = check_s_noise(s_noise)
    if sigma_data is not None:
        sigma_data = _number("cm_multistep", "sigma_data", sigma_data, open_lo=True)
        if check_prediction(prediction) != "x0":
            raise ValueError("sigma_data makes method='cm_multistep' apply the boundary condition to the network's raw "
                             f"output F: pass prediction='x0' (the model returns F), not {prediction!r}")
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        al, be = path.coefficients(t)[:2]
        al1, be1 = path.coefficients(t1)[:2]
        if sigma_data is None:
            a, b = affine_coefficients(path, t, prediction, "x0")
        else:  # g is the network's raw output F: D = c_skip x / alpha + c_out F
            c_skip_over_alpha, b = boundary_scalings(al, be, sigma_min, sigma_data)
            a = c_skip_over_alpha
        # alpha' sqrt(sigma'^2 - sigma_min^2) = sqrt(beta'^2 - (alpha' sigma_min)^2)
        noise = s_noise * math.sqrt(max(0.0, be1 * be1 - (al1 * sigma_min) ** 2))
        stages.append(Stage(i, t, "x", "x", al1 * a, al1 * b, c_noise=noise, stream=draw_stream(i), x0=(a, b),
                            final=True))
    return stages


class FlowMapModel:
    """``model(x, t, y)`` from a flow map model ``flow_map(x, t, r, y)`` of two flow times (the average velocity
    over [t, r], diffusers' FlowMapEulerDiscreteScheduler's model, which its pipeline calls with r = the next grid
    level): r is the grid time after t, found on the device (torch.searchsorted; no host sync, CUDA graphs keep
    working). For one-evaluation-per-step methods on that grid (euler: x' = x + (r - t) u(x, t, r), FlowMapEuler's
    step); at the grid's last time r is that time itself."""

    def __init__(self, flow_map, grid):
        if not callable(flow_map):
            raise TypeError(f"flow_map must be callable flow_map(x, t, r, y), got {type(flow_map).__name__}")
        times = [float(t) for t in grid]
        if len(times) < 2 or any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"FlowMapModel needs the sampler's increasing grid of flow times, got {times}")
        self.flow_map, self.grid = flow_map, times
        self._on = {}  # (device, dtype) -> the grid there

    def next_time(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.device, t.dtype)
        if key not in self._on:
            self._on[key] = torch.tensor(self.grid, device=t.device, dtype=t.dtype)
        grid = self._on[key]
        return grid[torch.searchsorted(grid, t, right=True).clamp(max=len(self.grid) - 1)]

    def __call__(self, x, t, y=None):
        return self.flow_map(x, t, self.next_time(t), y)
