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

from fastdiff.paths import VE, GaussianPath, affine_coefficients
from fastdiff.sampling.core.stage import Stage


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


def sigma_multistep(method, path, grid, prediction, order, weights) -> list[Stage]:
    """The stage table of a multistep method on d = (x / alpha - D) / sigma: x' / alpha' = x / alpha +
    Σ_j C_j d_{i-j} with C = weights(sigmas, i, k) in sigma units (k = the order reached at step i), d_i a side
    output in a ring of four buffers; alpha' D on the step to sigma' = 0; DDIM's step from sigma = inf, the
    history starting after it (iPNDM, DEIS)."""
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 4:
        raise ValueError(f"order must be 1, 2, 3 or 4 for method={method!r}, got {order!r}")
    sigmas = [noise_level(path, t) for t in grid]
    stages, start = [], 0  # start: the first step of the history (after a step from sigma = inf)
    for i in range(len(grid) - 1):
        t = grid[i]
        al, al1 = path.coefficients(t)[0], path.coefficients(grid[i + 1])[0]
        a, b = affine_coefficients(path, t, prediction, "x0")
        if sigmas[i + 1] == 0.0:  # the denoising step
            stages.append(Stage(i, t, "x", "x", al1 * a, al1 * b, x0=(a, b), final=True))
            continue
        if math.isinf(sigmas[i]):  # from alpha = 0: the first-order limit, DDIM's x' = alpha' D + beta'/beta x
            be, be1 = path.coefficients(t)[1], path.coefficients(grid[i + 1])[1]
            stages.append(Stage(i, t, "x", "x", al1 * a + be1 / be, al1 * b, x0=(a, b), final=True))
            start = i + 1
            continue
        sigma = require_finite(method, sigmas[i], t)
        k = min(order, i + 1 - start)
        c = [al1 * w for w in weights(sigmas, i, k)]  # x' = alpha' x / alpha + Σ c_j d_{i-j}
        dx, dg = (1.0 / al - a) / sigma, -b / sigma  # d_i = dx x + dg g
        previous = [(f"side{(i - j) % 4}", c[j], 0.0) for j in range(1, k)]
        extra, *more = previous or [(None, 0.0, 0.0)]
        stages.append(Stage(i, t, "x", "x", al1 / al + c[0] * dx, c[0] * dg, c_extra=extra[1], extra=extra[0],
                            history=tuple(more), side=f"side{i % 4}", s_x=dx, s_pred=dg, x0=(a, b), final=True))
    return stages
