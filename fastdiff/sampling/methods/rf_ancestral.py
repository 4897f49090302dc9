"""ComfyUI's rectified-flow ancestral samplers (comfy/k_diffusion/sampling.py sample_euler_ancestral_RF,
sample_dpm_2_ancestral_RF, sample_dpmpp_2s_ancestral_RF: what euler_ancestral, dpm_2_ancestral and dpmpp_2s_ancestral
run for flow (CONST) models).

They step in the noise fraction s = beta / (alpha + beta) with the scaled state y = x / (alpha + beta): on any
Gaussian path y = (1 - s) x0 + s eps is a CondOT state (the CondOT reparametrization), and on CondOT (alpha + beta = 1)
s is ComfyUI's CONST sigma and y the state itself. Per step s -> s' with x0 predictions D (eta, s_noise):

    s_down = s' (1 + (s' / s - 1) eta),  a' = 1 - s',  a_down = 1 - s_down,
    renoise = sqrt(s'^2 - s_down^2 a'^2 / a_down^2)

- euler_ancestral_RF: y_d = (s_down / s) y + (1 - s_down / s) D
- dpm_2_ancestral_RF: s_m = sqrt(s s_down); y_2 = (s_m / s) y + (1 - s_m / s) D, then
  y_d = y + (s_down - s) (y_2 - D_2) / s_m with D_2 at s_m
- dpmpp_2s_ancestral_RF: s_m = 1 / (1 + e^{(l + l_down) / 2}), l = log((1 - s) / s) (the midpoint in half log-SNR);
  u = (s_m / s) y + (1 - s_m / s) D, y_d = (s_down / s) y + (1 - s_down / s) D_2 with D_2 at s_m

then y' = (a' / a_down) y_d + s_noise renoise xi (no noise where eta = 0) and x' = (alpha' + beta') y'. The step to
s' = 0 returns alpha' D (ComfyUI's x = denoised); eta <= 1 keeps s_down > 0 before it. The sample starts fine from
s = 1 (alpha = 0): the formulas are finite there, except dpmpp_2s_ancestral_RF's midpoint (l = -inf), which ComfyUI
patches to s_m = 0.9999; here its limit s_m = 1 makes that step euler_ancestral_RF's (one evaluation).
"""

from __future__ import annotations

import math

from fastdiff.sampling.methods.coefficients import Stage, _conv, check_s_noise
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import time_at
from fastdiff.sampling.core.stage import draw_stream


class _Point:
    """A time with its k = alpha + beta, noise fraction s and x0 conversion D = a x + b g."""

    def __init__(self, path, t, prediction):
        al, be = path.coefficients(t)[:2]
        self.t, self.k, self.s = t, al + be, be / (al + be)
        self.a, self.b = _conv(path, t, prediction, "x0")


def _at_fraction(path, p: _Point, s_m: float, prediction) -> _Point:
    """The point after p whose noise fraction is s_m (sigma = s / (1 - s) in sigma_space's terms; beyond t' where
    eta > 1 puts s_down below s'^2 / s)."""
    return _Point(path, time_at(path, s_m / (1.0 - s_m), p.t, 1.0), prediction)


def _check(method, eta, s_noise):
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 for method={method!r}, got {eta!r}")
    return float(eta), check_s_noise(s_noise)


def _rf(method, path, grid, prediction, eta, s_noise, deterministic) -> list[Stage]:
    """The table: per step, deterministic(i, p, s_down) -> the stages to y_d (the last one's output rows in y
    units: c_x, c_pred, c_extra), then the rescaling and renoising folded into the last stage."""
    eta, s_noise = _check(method, eta, s_noise)
    stages = []
    for i in range(len(grid) - 1):
        p = _Point(path, grid[i], prediction)
        al1, be1 = path.coefficients(grid[i + 1])[:2]
        s1 = be1 / (al1 + be1)
        down = s1 * (1.0 + (s1 / p.s - 1.0) * eta)
        if s1 > 0.0 and down <= 0.0:  # eta > 1 only (ComfyUI's node allows it, sample() does not)
            raise ValueError(f"eta={eta} is too large for method={method!r} on this grid: step {i} would step to "
                             f"the noise fraction {down:.6g} <= 0")
        if s1 == 0.0:  # ComfyUI: x = denoised (alpha' D on any path)
            stages.append(Stage(i, p.t, "x", "x", al1 * p.a, al1 * p.b, x0=(p.a, p.b), final=True))
            continue
        k1 = al1 + be1
        scale = (1.0 - s1) / (1.0 - down) if eta > 0 else 1.0
        v = s1 * s1 - (down * (1.0 - s1) / (1.0 - down)) ** 2
        noise = k1 * s_noise * math.sqrt(v) if eta > 0 and v > 0.0 else 0.0
        out = deterministic(i, p, down)
        last = out[-1]
        c = k1 * scale  # x' = k' (a' / a_down) y_d + noise
        out[-1] = Stage(i, last.t, last.input, "x", c * last.c_x, c * last.c_pred, c_extra=c * last.c_extra,
                        extra=last.extra, c_noise=noise, stream=draw_stream(i), x0=last.x0, final=True)
        stages += out
    return stages


def _euler_to(i, p: _Point, down: float) -> Stage:
    """y_d = (s_down / s) y + (1 - s_down / s) D, in y units."""
    q = down / p.s
    return Stage(i, p.t, "x", "x", q / p.k + (1.0 - q) * p.a, (1.0 - q) * p.b, x0=(p.a, p.b))


@register_method("euler_ancestral_RF", options={"eta": 1.0, "s_noise": 1.0}, evals_per_step=1, conversions=("x0",),
                 description="ComfyUI's rectified-flow Euler ancestral: to s' (1 + (s'/s - 1) eta) in the noise "
                             "fraction, rescaled and renoised to s'")
def _euler_ancestral_rf(path, grid, prediction, eta=1.0, s_noise=1.0) -> list[Stage]:
    return _rf("euler_ancestral_RF", path, grid, prediction, eta, s_noise,
               lambda i, p, down: [_euler_to(i, p, down)])


@register_method("dpm_2_ancestral_RF", options={"eta": 1.0, "s_noise": 1.0}, evals_per_step=2, conversions=("x0",),
                 description="ComfyUI's rectified-flow DPM-Solver-2 ancestral: a midpoint step in log s to s_down, "
                             "rescaled and renoised")
def _dpm_2_ancestral_rf(path, grid, prediction, eta=1.0, s_noise=1.0) -> list[Stage]:
    def deterministic(i, p, down):
        m = _at_fraction(path, p, math.sqrt(p.s * down), prediction)
        q = m.s / p.s  # x_2 = k_m [q y + (1 - q) D]
        first = Stage(i, p.t, "x", "stage", m.k * (q / p.k + (1 - q) * p.a), m.k * (1 - q) * p.b, x0=(p.a, p.b))
        c = (down - p.s) / m.s  # y_d = y + c (x_2 / k_m - D_2)
        return [first, Stage(i, m.t, "stage", "x", c * (1.0 / m.k - m.a), -c * m.b, c_extra=1.0 / p.k, extra="x")]

    return _rf("dpm_2_ancestral_RF", path, grid, prediction, eta, s_noise, deterministic)


@register_method("dpmpp_2s_ancestral_RF", options={"eta": 1.0, "s_noise": 1.0}, evals_per_step=2,
                 conversions=("x0",),
                 description="ComfyUI's rectified-flow DPM-Solver++(2S) ancestral: a half log-SNR midpoint to "
                             "s_down, rescaled and renoised")
def _dpmpp_2s_ancestral_rf(path, grid, prediction, eta=1.0, s_noise=1.0) -> list[Stage]:
    def deterministic(i, p, down):
        if p.s == 1.0:  # alpha = 0: the midpoint's limit is s_m = 1, the evaluation already made
            return [_euler_to(i, p, down)]
        lam = 0.5 * (math.log((1.0 - p.s) / p.s) + math.log((1.0 - down) / down))
        m = _at_fraction(path, p, 1.0 / (math.exp(lam) + 1.0), prediction)
        q = m.s / p.s  # u = k_m [q y + (1 - q) D]
        first = Stage(i, p.t, "x", "stage", m.k * (q / p.k + (1 - q) * p.a), m.k * (1 - q) * p.b, x0=(p.a, p.b))
        q = down / p.s  # y_d = q y + (1 - q) D_2
        return [first, Stage(i, m.t, "stage", "x", (1.0 - q) * m.a, (1.0 - q) * m.b, c_extra=q / p.k, extra="x")]

    return _rf("dpmpp_2s_ancestral_RF", path, grid, prediction, eta, s_noise, deterministic)
