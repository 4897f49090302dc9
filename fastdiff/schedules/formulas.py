"""The schedules' formulas in their peers' own noise coordinates: decreasing float64 lists, most noise first.

Each function returns the levels of ``n`` steps (n + 1 values, ending at 0) unless its peer does otherwise
(said per function). Formulas (written anew; sources named):

* karras: (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0 (Karras et al. 2022;
  k-diffusion sampling.get_sigmas_karras).
* exponential: exp of n values linear from log s_max to log s_min, then 0 (get_sigmas_exponential).
* polyexponential: exp(r_i^rho (log s_max - log s_min) + log s_min), r_i linear from 1 to 0, then 0
  (get_sigmas_polyexponential).
* vp: sqrt(exp(beta_d u^2 / 2 + beta_min u) - 1), u linear from 1 to eps_s, then 0 (get_sigmas_vp).
* laplace: clamp(exp(mu - beta sign(1/2 - x) log(1 - 2|1/2 - x| + 1e-5)), s_min, s_max), x linear on [0, 1];
  no final 0 (Tiankai et al. 2024; ComfyUI comfy/k_diffusion/sampling.py get_sigmas_laplace).
* kl_optimal: tan((1 - i/(n-1)) atan(s_max) + i/(n-1) atan(s_min)), then 0 (ComfyUI samplers.kl_optimal_scheduler).
* linear_quadratic: s_max (1 - c_i), c linear up to threshold_noise over linear_steps then quadratic to 1
  (Mochi; ComfyUI samplers.linear_quadratic_schedule).
* normal / sgm_uniform: levels at timesteps linear from timestep(s_max) to timestep(s_min) (sgm: n + 1 points,
  the last dropped), then 0 (ComfyUI samplers.normal_scheduler).
* simple: the training level of timestep N - 1 - floor(i N / n), then 0 (simple_scheduler).
* ddim_uniform: the training levels of timesteps 1, 1 + N // n, ... reversed, then 0 (ddim_scheduler; may hold
  another number of steps than n, as ComfyUI's does).
* beta: the training levels of timesteps rint(ppf_Beta(alpha, beta)(1 - i/n) (N - 1)), repeats dropped, then 0
  (Lee et al. 2024, arXiv 2407.12173; ComfyUI samplers.beta_scheduler).
* leading / trailing / linspace: diffusers' timestep_spacing (EulerDiscreteScheduler.set_timesteps): timesteps
  (i N // n + steps_offset), round(N - i N / n) - 1, or linear from N - 1 to 0; levels linearly interpolated in
  sigma between the training timesteps, then 0.
* align_your_steps / gits: published tables (fastdiff.schedules.tables), log-linearly interpolated to other
  step counts, the last level set to 0 (ComfyUI comfy_extras/nodes_align_your_steps.py, nodes_gits.py).
* flow_match: diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps: sigmas linear from 1 to the last
  training level, shifted (static shift s / (1 + (shift - 1) s) or dynamic: exponential
  e^mu / (e^mu + (1/s - 1)), linear mu / (mu + (1/s - 1))), optionally stretched to end at shift_terminal,
  then 0.
"""

from __future__ import annotations

import math
from typing import Optional

from fastdiff.schedules.levels import Levels


def linspace(a: float, b: float, n: int) -> list[float]:
    """n values from a to b (torch.linspace's n = 1: [a])."""
    if n == 1:
        return [float(a)]
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in linspace(0.0, 1.0, n)] + [0.0]


def exponential(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    return [math.exp(v) for v in linspace(math.log(sigma_max), math.log(sigma_min), n)] + [0.0]


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> list[float]:
    a, b = math.log(sigma_max), math.log(sigma_min)
    return [math.exp(r ** rho * (a - b) + b) for r in linspace(1.0, 0.0, n)] + [0.0]


def vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> list[float]:
    return [math.sqrt(math.expm1(beta_d * u * u / 2 + beta_min * u)) for u in linspace(1.0, eps_s, n)] + [0.0]


def laplace(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> list[float]:
    """n levels, no final 0 (ComfyUI's get_sigmas_laplace)."""
    out = []
    for x in linspace(0.0, 1.0, n):
        sign = (0.5 - x > 0) - (0.5 - x < 0)
        lam = mu - beta * sign * math.log(1.0 - 2.0 * abs(0.5 - x) + 1e-5)
        out.append(min(max(math.exp(lam), sigma_min), sigma_max))
    return out


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    lo, hi = math.atan(sigma_min), math.atan(sigma_max)
    return [math.tan(i * lo + (1.0 - i) * hi) for i in linspace(0.0, 1.0, n)] + [0.0]


def linear_quadratic(n: int, sigma_max: float, threshold_noise: float = 0.025,
                     linear_steps: Optional[int] = None) -> list[float]:
    if n == 1:
        return [sigma_max, 0.0]
    lin = n // 2 if linear_steps is None else linear_steps
    quad = n - lin
    diff = lin - threshold_noise * n
    qc = diff / (lin * quad ** 2)
    lc = threshold_noise / lin - 2.0 * diff / quad ** 2
    const = qc * lin ** 2
    c = [i * threshold_noise / lin for i in range(lin)] + [qc * i * i + lc * i + const for i in range(lin, n)] + [1.0]
    return [(1.0 - v) * sigma_max for v in c]


def normal(levels: Levels, n: int, sgm: bool = False) -> list[float]:
    start, end = levels.timestep(levels.sigma_max), levels.timestep(levels.sigma_min)
    zero = True
    if sgm:
        ts = linspace(start, end, n + 1)[:-1]
    else:
        if math.isclose(levels.sigma(end), 0.0, abs_tol=1e-5):
            n, zero = n + 1, False
        ts = linspace(start, end, n)
    return [levels.sigma(t) for t in ts] + ([0.0] if zero else [])


def simple(levels: Levels, n: int) -> list[float]:
    stride = levels.n / n
    return [levels.sigmas[-(1 + int(i * stride))] for i in range(n)] + [0.0]


def ddim_uniform(levels: Levels, n: int) -> list[float]:
    table = levels.sigmas
    if math.isclose(table[1], 0.0, abs_tol=1e-5):
        n, out = n + 1, []
    else:
        out = [0.0]
    out += table[1::max(len(table) // n, 1)]
    return out[::-1]


def beta(levels: Levels, n: int, alpha: float = 0.6, beta: float = 0.6) -> list[float]:
    total = levels.n - 1
    out, last = [], None
    for i in range(n):
        k = round(beta_ppf(1.0 - i / n, alpha, beta) * total)  # numpy.rint: half to even, as round
        if k != last:
            out.append(levels.sigmas[int(k)])
        last = k
    return out + [0.0]


def spacing(levels: Levels, n: int, timestep_spacing: str = "leading", steps_offset: int = 0) -> list[float]:
    """diffusers' EulerDiscreteScheduler levels for ``timestep_spacing``; ``spacing_timesteps`` gives the
    (float) timesteps."""
    return [_interp(levels.sigmas, t) for t in spacing_timesteps(levels.n, n, timestep_spacing, steps_offset)] + [0.0]


def spacing_timesteps(num_train: int, n: int, timestep_spacing: str, steps_offset: int = 0) -> list[float]:
    if timestep_spacing == "linspace":
        return linspace(num_train - 1.0, 0.0, n)
    if timestep_spacing == "leading":
        ratio = num_train // n
        return [float(i * ratio + steps_offset) for i in range(n)][::-1]
    ratio = num_train / n  # trailing: numpy.arange(N, 0, -ratio).round() - 1
    count = math.ceil(num_train / ratio)
    return [float(round(num_train - i * ratio)) - 1.0 for i in range(count)]


def _interp(table: list, t: float) -> float:
    """numpy.interp over the integers 0 .. len - 1 (linear in the level)."""
    t = min(max(t, 0.0), len(table) - 1.0)
    lo = int(math.floor(t))
    hi = min(lo + 1, len(table) - 1)
    return table[lo] + (t - lo) * (table[hi] - table[lo])


def loglinear_interp(levels: list, num: int) -> list[float]:
    """A decreasing table resampled to ``num`` values, log level linear in a uniform position (the AYS recipe)."""
    ys = [math.log(v) for v in levels[::-1]]
    xs = linspace(0.0, 1.0, len(ys))
    out = []
    for x in linspace(0.0, 1.0, num):
        k = min(max(next((j for j in range(1, len(xs)) if xs[j] >= x), len(xs) - 1), 1), len(xs) - 1)
        w = (x - xs[k - 1]) / (xs[k] - xs[k - 1])
        out.append(math.exp(ys[k - 1] + w * (ys[k] - ys[k - 1])))
    return out[::-1]


def tabled(table: list, n: int) -> list[float]:
    """A published table for n steps: as is when it has n + 1 levels, else log-linearly interpolated; the last
    level set to 0 (ComfyUI's AlignYourStepsScheduler / GITSScheduler)."""
    out = list(table) if len(table) == n + 1 else loglinear_interp(table, n + 1)
    return out[:-1] + [0.0]


def time_shift(mu: float, s: float, time_shift_type: str = "exponential") -> float:
    """diffusers' dynamic time shift of a noise fraction s (sigma exponent 1)."""
    if s <= 0.0:
        return 0.0
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    return mu / (mu + (1.0 / s - 1.0))


def static_shift(shift: float, s: float) -> float:
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_match(n: int, shift: float = 1.0, mu: Optional[float] = None, time_shift_type: str = "exponential",
               shift_terminal: Optional[float] = None, num_train_timesteps: int = 1000,
               pipeline_sigmas: bool = False) -> list[float]:
    """diffusers' FlowMatchEulerDiscreteScheduler sigmas of n steps (n + 1 values). ``mu`` given: dynamic
    shifting (use_dynamic_shifting), else the static ``shift`` (whose scheduler's sigma_min is itself shifted
    before the linspace is shifted again, as diffusers does). ``pipeline_sigmas``: start from the Flux / SD3.5
    pipelines' np.linspace(1, 1 / n, n) instead of the scheduler's own linspace."""
    big_n = num_train_timesteps
    if pipeline_sigmas:
        base = linspace(1.0, 1.0 / n, n)
    else:
        top, bottom = (1.0, 1.0 / big_n) if mu is not None else \
            (static_shift(shift, 1.0), static_shift(shift, 1.0 / big_n))
        base = [v / big_n for v in linspace(top * big_n, bottom * big_n, n)]
    if mu is not None:
        out = [time_shift(mu, s, time_shift_type) for s in base]
    else:
        out = [static_shift(shift, s) for s in base]
    if shift_terminal:
        if out[-1] >= 1.0:  # one step: nothing to stretch (diffusers divides by 0 there)
            raise ValueError("shift_terminal of schedule 'shifted' needs a grid whose last shifted level is below 1 "
                             "(steps >= 2)")
        scale = (1.0 - out[-1]) / (1.0 - shift_terminal)
        out = [1.0 - (1.0 - s) / scale for s in out]
    return out + [0.0]


def dynamic_shift_mu(image_seq_len: float, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The dynamic shift mu of a sequence length: linear through (base_seq_len, base_shift) and
    (max_seq_len, max_shift) (diffusers' calculate_shift in the Flux / SD3 pipelines)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


# ---- the Beta distribution's quantile (scipy.stats.beta.ppf without scipy) ------------------------------------
def _betainc(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b): its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below the mean
        return 1.0 - _betainc(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b), by bisection on I_x(a, b) to float64 resolution."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
