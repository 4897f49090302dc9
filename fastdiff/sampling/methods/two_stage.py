"""Second-order single-step samplers of k-diffusion: two model evaluations per step, the second between
the grid points (Karras et al. 2022's DPM-Solver-2 variant; Lu et al. 2022's DPM-Solver++(2S) and its
SDE form).

All are written in k-diffusion's coordinates (fastdiff.sampling.methods.sigma_space): noise level
sigma = beta / alpha, scaled state x / alpha and x0 predictions D, so that on the VE path they are
k-diffusion's steps and on any other path the same steps of the probability-flow ODE / SDE. Per step
from sigma to sigma' (h = log(sigma / sigma'), alpha' = alpha(t')):

- dpm_2: midpoint sigma_m = sqrt(sigma sigma'), x_2 = the Euler step to sigma_m, then
  x' = x + (sigma' - sigma) (x_2 - D_2) / sigma_m (in scaled states); churn as Euler and Heun.
- dpm_2_ancestral: the same step to sigma_down, then sigma_up fresh noise (k-diffusion's ancestral split).
- dpmpp_2s_ancestral: x_2 = (sigma_m / sigma) x - expm1(-h_d / 2) D at sigma_m = sqrt(sigma sigma_down),
  x' = (sigma_down / sigma) x - expm1(-h_d) D_2, then sigma_up noise. CFG++ (guidance="cfg_pp", ComfyUI's
  sample_dpmpp_2s_ancestral_cfg_pp): both stages step on the unconditional x0 (U, U_2) and the first evaluation's
  guidance vector D - U is added at the end, x' = (sigma_down / sigma) x - expm1(-h_d) U_2 + sigma_up xi + (D - U):
  its CFG++ form (Stage.cfg_pp_form) carries (sigma_down / sigma) x + (D - U) from the first stage in a side buffer
  (side blend (-1, 1): g - p_null); single-stage steps (sigma_down = 0, from sigma = inf) take D (share 1).
- dpmpp_sde: a first-order SDE step to sigma_s = sigma^(1-r) sigma'^r with its own noise, then from x
  the step to sigma' on D_d = (1 - 1/(2r)) D + 1/(2r) D_2 with noise correlated to the first draw as
  Brownian increments over [sigma_s, sigma] and [sigma', sigma] are (k-diffusion draws both from one
  Brownian tree in sigma): streams draw_stream(i, 0) and draw_stream(i, 1), the second stage reading both.

A step that ends at sigma' = 0 is Euler's: x' = alpha' D (one evaluation), as in k-diffusion. A step
from sigma = inf (alpha = 0, e.g. t = 0 on CondOT, where k-diffusion's grids never start) takes the
steps' common first-order limit, DDIM's (with the method's eta split into kept and fresh noise).
"""

from __future__ import annotations

import math
from dataclasses import replace

from fastdiff.sampling.methods.coefficients import Stage, _conv, check_s_noise
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import ancestral_step, noise_level, require_finite, time_at
from fastdiff.sampling.core.stage import draw_stream


class _Point:
    """A time of the step with its alpha, sigma and x0 conversion D = a x + b g."""

    def __init__(self, path, t, prediction):
        self.t, self.alpha = t, path.coefficients(t)[0]
        self.sigma = noise_level(path, t)
        self.a, self.b = _conv(path, t, prediction, "x0")


def _denoise(i, p: _Point, end_alpha: float) -> Stage:
    """The last step's Euler update to sigma' = 0: x' = alpha' D."""
    return Stage(i, p.t, "x", "x", end_alpha * p.a, end_alpha * p.b, x0=(p.a, p.b), final=True)


def _from_noise(i, path, t1, p: _Point, eta: float = 0.0, noise_scale: float = 0.0) -> Stage:
    """A step from sigma = inf (alpha = 0: the state is beta eps, pure noise), where the steps in sigma have
    one limit, DDIM's: x' = alpha' D + beta' sqrt(1 - eta^2) x / beta + beta' eta noise_scale xi."""
    al1, be1 = path.coefficients(t1)[:2]
    be = path.coefficients(p.t)[1]
    keep = be1 * math.sqrt(max(0.0, 1.0 - eta * eta)) / be
    return Stage(i, p.t, "x", "x", al1 * p.a + keep, al1 * p.b, c_noise=be1 * eta * noise_scale,
                 stream=draw_stream(i), x0=(p.a, p.b), final=True)


def _midpoint(path, p: _Point, sigma_m: float, prediction) -> _Point:
    return _Point(path, time_at(path, sigma_m, p.t, 1.0), prediction)


def _dpm_2_step(i, path, prediction, p: _Point, sigma_to: float, alpha_end: float, noise: float):
    """DPM-Solver-2 from p to sigma_to (> 0), the result times alpha_end plus noise xi: two stages."""
    m = _midpoint(path, p, math.sqrt(p.sigma * sigma_to), prediction)
    q = m.sigma / p.sigma  # x_2 = alpha_m [q x / alpha + (1 - q) D]
    first = Stage(i, p.t, "x", "stage", m.alpha * (q / p.alpha + (1 - q) * p.a), m.alpha * (1 - q) * p.b,
                  x0=(p.a, p.b))
    k = alpha_end * (sigma_to - p.sigma) / m.sigma  # x' = alpha_end [x / alpha + k' (x_2 / alpha_m - D_2)]
    second = Stage(i, m.t, "stage", "x", k * (1 / m.alpha - m.a), -k * m.b, c_extra=alpha_end / p.alpha, extra="x",
                   c_noise=noise, stream=draw_stream(i), final=True)
    return [first, second]


@register_method("dpm_2", evals_per_step=2, conversions=("x0",), churn_options=True,
                 description="k-diffusion's DPM-Solver-2: a midpoint step in log sigma (Karras et al.'s churn options)")
def _dpm_2(path, grid, prediction) -> list[Stage]:
    stages = []
    for i in range(len(grid) - 1):
        p = _Point(path, grid[i], prediction)
        al1, be1 = path.coefficients(grid[i + 1])[:2]
        if math.isinf(p.sigma):
            stages.append(_from_noise(i, path, grid[i + 1], p))
        elif be1 == 0.0:
            stages.append(_denoise(i, p, al1))
        else:
            stages += _dpm_2_step(i, path, prediction, p, be1 / al1, al1, 0.0)
    return stages


def _ancestral(method, path, grid, prediction, eta, s_noise, two_stages) -> list[Stage]:
    """An ancestral method's table: per step, two_stages(i, p, sigma_down, alpha', noise coefficient) to
    sigma_down plus sigma_up noise; Euler's x' = alpha' D where sigma_down = 0 (the step to sigma' = 0)."""
    s_noise = check_s_noise(s_noise)
    stages = []
    for i in range(len(grid) - 1):
        p = _Point(path, grid[i], prediction)
        if math.isinf(p.sigma):
            stages.append(_from_noise(i, path, grid[i + 1], p, eta, s_noise))
            continue
        require_finite(method, p.sigma, p.t)
        al1, be1 = path.coefficients(grid[i + 1])[:2]
        down, up = ancestral_step(p.sigma, be1 / al1 if be1 else 0.0, eta)
        stages += [_denoise(i, p, al1)] if down == 0.0 else two_stages(i, p, down, al1, al1 * up * s_noise)
    return stages


@register_method("dpm_2_ancestral", options={"eta": 1.0, "s_noise": 1.0}, evals_per_step=2, conversions=("x0",),
                 description="DPM-Solver-2 steps to sigma_down plus s_noise x sigma_up fresh noise (k-diffusion)")
def _dpm_2_ancestral(path, grid, prediction, eta=1.0, s_noise=1.0) -> list[Stage]:
    return _ancestral("dpm_2_ancestral", path, grid, prediction, eta, s_noise,
                      lambda i, p, down, al1, noise: _dpm_2_step(i, path, prediction, p, down, al1, noise))


@register_method("dpmpp_2s_ancestral", options={"eta": 1.0, "s_noise": 1.0}, evals_per_step=2, conversions=("x0",),
                 cfg_pp=True,
                 description="DPM-Solver++(2S): two-stage second order on x0, to sigma_down plus sigma_up noise")
def _dpmpp_2s_ancestral(path, grid, prediction, eta=1.0, s_noise=1.0) -> list[Stage]:
    def two_stages(i, p, down, al1, noise):
        h = math.log(p.sigma / down)
        m = _midpoint(path, p, math.sqrt(p.sigma * down), prediction)
        e = -math.expm1(-0.5 * h)  # x_2 = alpha_m [(sigma_m / sigma) x / alpha + e D]
        first = Stage(i, p.t, "x", "stage", m.alpha * (m.sigma / (p.sigma * p.alpha) + e * p.a), m.alpha * e * p.b,
                      x0=(p.a, p.b))
        e = -math.expm1(-h)  # x' = alpha' [(sigma_down / sigma) x / alpha + e D_2]
        second = Stage(i, m.t, "stage", "x", al1 * e * m.a, al1 * e * m.b, c_extra=al1 * down / (p.sigma * p.alpha),
                       extra="x", c_noise=noise, stream=draw_stream(i), final=True)
        # CFG++: x_2 from U (share 0); side0 = alpha' (sigma_down / sigma) x / alpha + alpha' (D - U), with
        # D - U = b (g - p_null); x' = alpha' e U_2 + side0 + noise
        first.cfg_pp_form = replace(first, cfg_pp=0.0, side="side0", s_x=second.c_extra, s_pred=al1 * p.b,
                                    side_blend=(-1.0, 1.0))
        second.cfg_pp_form = replace(second, cfg_pp=0.0, extra="side0", c_extra=1.0)
        return [first, second]

    stages = _ancestral("dpmpp_2s_ancestral", path, grid, prediction, eta, s_noise, two_stages)
    # CFG++ on the single-stage steps (x' = alpha' D, or from sigma = inf the first-order limit): all through D
    return [replace(st, cfg_pp=1.0) if st.final and st.cfg_pp_form is None else st for st in stages]


@register_method("dpmpp_sde", options={"eta": 1.0, "s_noise": 1.0, "r": 0.5}, evals_per_step=2, conversions=("x0",),
                 description="DPM-Solver++ SDE (k-diffusion's dpmpp_sde): two stages at ratio r, Brownian-consistent noise")
def _dpmpp_sde(path, grid, prediction, eta=1.0, s_noise=1.0, r=0.5) -> list[Stage]:
    s_noise = check_s_noise(s_noise)
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 < r <= 1.0:
        raise ValueError(f"r must be in (0, 1], got {r!r}")
    fac = 1.0 / (2.0 * r)
    stages = []
    for i in range(len(grid) - 1):
        p = _Point(path, grid[i], prediction)
        if math.isinf(p.sigma):
            stages.append(_from_noise(i, path, grid[i + 1], p, eta, s_noise))
            continue
        require_finite("dpmpp_sde", p.sigma, p.t)
        al1, be1 = path.coefficients(grid[i + 1])[:2]
        if be1 == 0.0:
            stages.append(_denoise(i, p, al1))
            continue
        sigma1 = be1 / al1
        s = _midpoint(path, p, p.sigma ** (1.0 - r) * sigma1 ** r, prediction)
        down, up = ancestral_step(p.sigma, s.sigma, eta)
        q = down / p.sigma  # x_2 = alpha_s [q x / alpha + (1 - q) D] + alpha_s up s_noise xi_0
        keep_d = fac != 1.0  # D enters the second stage (side buffer) unless r = 1/2
        stages.append(Stage(i, p.t, "x", "stage", s.alpha * (q / p.alpha + (1 - q) * p.a), s.alpha * (1 - q) * p.b,
                            c_noise=s.alpha * up * s_noise, stream=draw_stream(i, 0), x0=(p.a, p.b),
                            brownian_terms=((s.alpha * up * s_noise, p.t, s.t),),
                            side="side0" if keep_d else None, s_x=p.a if keep_d else 0.0,
                            s_pred=p.b if keep_d else 0.0))
        down, up = ancestral_step(p.sigma, sigma1, eta)
        q = down / p.sigma  # x' = alpha' [q x / alpha + (1 - q) ((1 - fac) D + fac D_2)] + alpha' up s_noise xi
        w, c = al1 * (1 - q), al1 * up * s_noise
        # xi = rho xi_0 + sqrt(1 - rho^2) xi_1: the Brownian increment over [sigma', sigma], of which the first
        # draw's is the part over [sigma_s, sigma] (rho^2 = (sigma - sigma_s) / (sigma - sigma')), as k-diffusion's
        # Brownian tree gives; with independent draws the sampler is biased (mixture covariances off by 5-13
        # standard errors at 30-100 steps, against 2-3 with the tree)
        rho = math.sqrt((p.sigma - s.sigma) / (p.sigma - sigma1))
        stages.append(Stage(i, s.t, "stage", "x", w * fac * s.a, w * fac * s.b, c_extra=al1 * q / p.alpha, extra="x",
                            history=(("side0", w * (1 - fac), 0.0),) if keep_d else (),
                            c_noise=c * rho, stream=draw_stream(i, 0),
                            more_draws=((draw_stream(i, 1), c * math.sqrt(1.0 - rho * rho)),) if c else (),
                            # step_noise="brownian": the path's increment over [t, t'] (k-diffusion's second draw)
                            brownian_terms=((c, p.t, grid[i + 1]),) if c else (), final=True))
    return stages
