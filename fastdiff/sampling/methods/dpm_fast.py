"""DPM-Solver-fast (Lu et al. 2022, "DPM-Solver", §3.4 and Algorithm 2 of its appendix; k-diffusion's
``sample_dpm_fast``, which ComfyUI's ``dpm_fast`` calls): a fixed budget of model evaluations split into
singlestep DPM-Solver steps of order 3, 2 and 1 on a grid uniform in lambda = -log sigma.

The call's grid gives only the budget and the ends, as in ComfyUI: ``nfe`` = its number of steps, sigma_max = the
noise level (k-diffusion's sigma = beta / alpha) at its first time (at T_MIN_SINGULAR where alpha = 0 there, as on
a flow model's default grid), sigma_min = the level at its last time, or at the one before where that is 0. The
method steps on its own grid (:func:`step_grid`): m = floor(nfe / 3) + 1 steps
uniform in lambda, of orders [3, ..., 3, 2, 1] when 3 divides nfe, else [3, ..., 3, nfe mod 3]; the sample it
returns is the state at sigma_min (like k-diffusion's, not denoised). In the scaled state y = x / alpha, with eps
predictions E, one step from lambda to lambda' (h = lambda' - lambda, sigma' = e^-lambda', expm1 = e^z - 1):

    order 1:  y' = y - sigma' expm1(h) E_0
    order 2:  u_1 = y - sigma_1 expm1(h / 2) E_0 at lambda + h / 2;  y' = y - sigma' expm1(h) (E_0 + (E_1 - E_0))
    order 3:  u_1 = y - sigma_1 expm1(h / 3) E_0 at lambda + h / 3,
              u_2 = y - sigma_2 expm1(2h / 3) E_0 - 2 sigma_2 (expm1(2h / 3) / (2h / 3) - 1) (E_1 - E_0)
                    at lambda + 2h / 3,
              y' = y - sigma' expm1(h) E_0 - (3 / 2) sigma' (expm1(h) / h - 1) (E_2 - E_0)

(order 2 with r_1 = 1/2 is 1 / (2 r_1) = 1 times the difference). With eta > 0 (ancestral) each step goes to
sigma_down (k-diffusion's ancestral split, not below sigma_min) and adds s_noise sqrt(sigma'^2 - sigma_down^2) xi.
The stages of a step: the first writes the model input of the second into "stage" and E_0 into "side0"; the second
(order 3) writes the third's input into "stage2"; the last reads x and E_0 as history and writes x'.
"""

from __future__ import annotations

import math

from fastdiff.paths import affine_coefficients
from fastdiff.sampling.core.stage import Stage, draw_stream
from fastdiff.sampling.methods.coefficients import check_s_noise
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import ancestral_step, noise_level, time_at


def budget_orders(nfe: int) -> list[int]:
    """k-diffusion's split of nfe evaluations into step orders: floor(nfe / 3) + 1 steps."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def _start(path, grid) -> float:
    """The grid's first time, or T_MIN_SINGULAR where alpha = 0 there (sigma = inf: no log sigma to step in; a flow
    model's default grid starts at t = 0), as fastdiff starts a grid whose conversions are singular at 0."""
    from fastdiff.sampling.core.arguments import T_MIN_SINGULAR

    return max(grid[0], T_MIN_SINGULAR) if math.isinf(noise_level(path, grid[0])) else grid[0]


def _ends(path, grid, method="dpm_fast") -> tuple[float, float]:
    """(sigma_max, sigma_min) of the call's grid, as ComfyUI reads them (the last nonzero level)."""
    if len(grid) < 2 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"method={method!r} needs an increasing grid of at least 2 times, got {list(grid)}")
    top = noise_level(path, _start(path, grid))
    bottom = noise_level(path, grid[-1])
    if bottom == 0.0:
        bottom = noise_level(path, grid[-2])
    if not (math.isfinite(top) and top > 0):
        raise ValueError(f"method={method!r} steps in log sigma (sigma = beta / alpha), which is {top} at the "
                         f"grid's first time t={grid[0]:g}: start the grid where alpha > 0")
    if not bottom < top:
        raise ValueError(f"method={method!r} needs a last nonzero noise level below the first one (sigma_min < "
                         f"sigma_max), got sigma_min={bottom:g}, sigma_max={top:g} (a one-step grid to sigma = 0 has "
                         "no sigma_min: give 2 or more steps)")
    return top, bottom


def _plan(path, grid, eta: float):
    """Per step: (lambda, the lambda stepped to, the step's end lambda, order), and the lambdas of the m + 1 times."""
    top, bottom = _ends(path, grid)
    nfe = len(grid) - 1
    orders = budget_orders(nfe)
    l0, l1 = -math.log(top), -math.log(bottom)
    lambdas = [l0 + (l1 - l0) * k / len(orders) for k in range(len(orders) + 1)]
    steps = []
    for k, order in enumerate(orders):
        lam, lam_next = lambdas[k], lambdas[k + 1]
        lam_to = lam_next
        if eta:
            down = ancestral_step(math.exp(-lam), math.exp(-lam_next), eta)[0]
            lam_to = min(l1, -math.log(down)) if down > 0 else l1
        steps.append((lam, lam_to, lam_next, order))
    return steps, lambdas


def step_grid(path, grid, eta: float = 0.0, **_) -> list[float]:
    """The flow times the method steps between: m + 1 times uniform in lambda from the grid's first noise level to
    its last nonzero one (the plan's grid: callbacks, step noise and editing see these steps)."""
    _, lambdas = _plan(path, grid, eta)
    lo, hi = _start(path, grid), grid[-1]
    times = [lo] + [time_at(path, math.exp(-lam), lo, hi) for lam in lambdas[1:-1]]
    last = grid[-1] if noise_level(path, grid[-1]) > 0 else grid[-2]
    return times + [last]


class _At:
    """A time with alpha and the eps conversion E = a x + b g there (x the unscaled state)."""

    def __init__(self, path, t, prediction):
        self.t, self.alpha = t, path.coefficients(t)[0]
        self.a, self.b = affine_coefficients(path, t, prediction, "eps")


def _step_stages(i, path, prediction, t0, lam, lam_to, t_end, order, noise) -> list[Stage]:
    """One DPM-Solver step of ``order`` from flow time t0 (lambda) to lambda_to (sigma_down), the state written at the
    step's end time t_end (times its alpha) plus noise xi."""
    h = lam_to - lam
    p = _At(path, t0, prediction)
    x0 = affine_coefficients(path, t0, prediction, "x0")
    al_end = path.coefficients(t_end)[0]
    s_to = math.exp(-lam_to)
    E = math.expm1(h)
    if order == 1:  # x' = alpha_end (x / alpha - sigma_to E E_0)
        k = -al_end * s_to * E
        return [Stage(i, t0, "x", "x", al_end / p.alpha + k * p.a, k * p.b, c_noise=noise, stream=draw_stream(i),
                      x0=x0, final=True)]
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    lo, hi = t0, 1.0
    m1 = _At(path, time_at(path, math.exp(-(lam + r1 * h)), lo, hi), prediction)
    s1 = math.exp(-(lam + r1 * h))
    c1 = -s1 * math.expm1(r1 * h)  # u_1 = y + c1 E_0
    first = Stage(i, t0, "x", "stage", m1.alpha * (1 / p.alpha + c1 * p.a), m1.alpha * c1 * p.b, side="side0",
                  s_x=p.a, s_pred=p.b, x0=x0)
    if order == 2:  # y' = y - sigma_to E E_1 (the E_0 terms cancel at r_1 = 1/2)
        k = -al_end * s_to * E
        second = Stage(i, m1.t, "stage", "x", k * m1.a, k * m1.b, c_extra=al_end / p.alpha, extra="x",
                       c_noise=noise, stream=draw_stream(i), final=True)
        return [first, second]
    r2 = 2.0 / 3.0
    s2 = math.exp(-(lam + r2 * h))
    m2 = _At(path, time_at(path, s2, lo, hi), prediction)
    e2 = math.expm1(r2 * h)
    d2 = (r2 / r1) * s2 * (e2 / (r2 * h) - 1.0)  # u_2 = y - s2 e2 E_0 - d2 (E_1 - E_0)
    # second: reads u_1 (its input, for E_1), x and E_0 (history); writes alpha_2 u_2 into "stage2"
    second = Stage(i, m1.t, "stage", "stage2", -m2.alpha * d2 * m1.a, -m2.alpha * d2 * m1.b,
                   c_extra=m2.alpha / p.alpha, extra="x", history=(("side0", m2.alpha * (d2 - s2 * e2), 0.0),))
    d3 = s_to * (E / h - 1.0) / r2  # y' = y - s_to E E_0 - d3 (E_2 - E_0)
    third = Stage(i, m2.t, "stage2", "x", -al_end * d3 * m2.a, -al_end * d3 * m2.b, c_extra=al_end / p.alpha,
                  extra="x", history=(("side0", al_end * (d3 - s_to * E), 0.0),), c_noise=noise,
                  stream=draw_stream(i), final=True)
    return [first, second, third]


@register_method("dpm_fast", options={"eta": 0.0, "s_noise": 1.0}, evals_per_step=3, conversions=("x0", "eps"),
                 step_grid=step_grid,
                 description="k-diffusion's DPM-Solver-fast: the grid's steps as a budget of evaluations in "
                             "3/2/1-stage steps uniform in log sigma, ending at the last nonzero level")
def _dpm_fast(path, grid, prediction, eta=0.0, s_noise=1.0) -> list[Stage]:
    s_noise = check_s_noise(s_noise)
    if not 0.0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 for method='dpm_fast', got {eta!r}")
    steps, _ = _plan(path, grid, eta)
    times = step_grid(path, grid, eta)
    stages = []
    for i, (lam, lam_to, lam_next, order) in enumerate(steps):
        up = math.sqrt(max(0.0, math.exp(-2 * lam_next) - math.exp(-2 * lam_to))) if eta else 0.0
        al_end = path.coefficients(times[i + 1])[0]
        stages += _step_stages(i, path, prediction, times[i], lam, lam_to, times[i + 1], order, al_end * up * s_noise)
    return stages
