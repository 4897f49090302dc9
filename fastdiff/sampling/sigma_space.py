"""k-diffusion's coordinates on any Gaussian path: the noise level sigma = beta / alpha and the scaled
state x / alpha (docs/design.md §2).

k-diffusion's samplers are written for x = z + sigma eps (fastdiff's VE path). On a path
x_t = alpha_t z + beta_t eps the scaled state x_t / alpha_t = z + sigma_t eps is such a state, so a
k-diffusion step from sigma to sigma' is the same step here with x / alpha in and alpha' times the
result out. Methods that evaluate the model between grid points (churn, midpoints) need the flow time
of a noise level: exact on the VE path, by bisection in float64 elsewhere (sigma decreases in t).
"""

from __future__ import annotations

import math

from fastdiff.paths import VE, GaussianPath


def noise_level(path: GaussianPath, t: float) -> float:
    """k-diffusion's sigma at flow time t: beta / alpha (inf where alpha = 0, e.g. t = 0 on condot)."""
    al, be = path.coefficients(t)[:2]
    return math.inf if al == 0.0 else be / al


def time_at(path: GaussianPath, sigma: float, lo: float, hi: float) -> float:
    """The flow time in [lo, hi] whose noise level is ``sigma`` (noise_level(lo) >= sigma >=
    noise_level(hi)); exact on the VE path, else bisected to float64 resolution."""
    s_lo, s_hi = noise_level(path, lo), noise_level(path, hi)
    if not s_hi <= sigma <= s_lo:
        raise ValueError(f"noise level {sigma!r} lies outside [{s_hi!r}, {s_lo!r}], the levels of t in [{lo}, {hi}]")
    if isinstance(path, VE):
        return min(max(path.time(sigma), lo), hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if noise_level(path, mid) > sigma:
            lo = mid
        else:
            hi = mid
    return lo if abs(noise_level(path, lo) - sigma) <= abs(noise_level(path, hi) - sigma) else hi


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """k-diffusion's (sigma_down, sigma_up): the deterministic step goes to sigma_down, then sigma_up
    fresh noise brings the level to sigma_next (sigma_down^2 + sigma_up^2 = sigma_next^2)."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(max(0.0, sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)))
    return math.sqrt(max(0.0, sigma_next ** 2 - up ** 2)), up


def require_finite(method: str, sigma: float, t: float) -> float:
    """The noise level at a step's start, which these methods divide by: refuse an infinite one."""
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"method={method!r} steps in the noise level sigma = beta / alpha, which is {sigma} at "
                         f"t={t:g}")
    return sigma
