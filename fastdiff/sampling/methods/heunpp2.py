"""Heun++ (ComfyUI comfy/k_diffusion/sampling.py sample_heunpp2, from Carzit's sd-webui-samplers-scheduler): Heun's
predictor carried one grid point further, the slopes weighted by their noise levels relative to the first one.

In k-diffusion's noise level sigma = beta / alpha with the scaled state y = x / alpha (fastdiff.sampling.methods.
sigma_space) and d = (y - D) / sigma (D: the x0 prediction), step i from sigma (sigma_hat under churn) to sigma_1,
with the next level sigma_2 and the grid's first level sigma_0, dt = sigma_1 - sigma:

- the last step (sigma_1 the grid's last level): Euler, y' = y + d dt (alpha' D where sigma_1 = 0)
- the step before it: Heun, y_2 = y + d dt, d_2 at (y_2, sigma_1), y' = y + (w_1 d + w_2 d_2) dt with
  w_2 = sigma_1 / (2 sigma_0), w_1 = 1 - w_2
- otherwise Heun++: also y_3 = y_2 + d_2 (sigma_2 - sigma_1) and d_3 at (y_3, sigma_2), a model evaluation at the
  next step's end; y' = y + (w_1 d + w_2 d_2 + w_3 d_3) dt with w_2 = sigma_1 / (3 sigma_0),
  w_3 = sigma_2 / (3 sigma_0), w_1 = 1 - w_2 - w_3

so 3 evaluations per step but 2 and 1 on the last two steps. The weights sum to 1 but miss Heun's (1/2, 1/2): the
method is first order (its correction vanishes as sigma_1 / sigma_0 does). From sigma_0 = inf (alpha = 0, CondOT's
t = 0) every weight but w_1 is 0: each step is Euler's, one evaluation (the first one DDIM's limit,
x' = alpha' D + (beta' / beta) x). Churn (s_churn, s_tmin, s_tmax, s_noise: fastdiff.sampling.methods.churn's
step to sigma_hat) as ComfyUI's: the step starts at sigma_hat and the weights keep sigma_0.

On CondOT this is k-diffusion's sigma-space form; ComfyUI's CONST models run the same loop in their own sigma, the
noise fraction beta, with the unscaled state: the Euler steps agree (both are DDIM), the Heun / Heun++ combinations of
slopes differ (slopes in another coordinate, weights from another sigma_0).
"""

from __future__ import annotations

import math
from dataclasses import replace

from fastdiff.sampling.methods import churn
from fastdiff.sampling.methods.coefficients import Stage, _conv
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import noise_level
from fastdiff.sampling.core.stage import draw_stream


class _Point:
    def __init__(self, path, t, prediction):
        self.t, (self.alpha, self.beta) = t, path.coefficients(t)[:2]
        self.sigma = noise_level(path, t)
        self._conv = (path, t, prediction)

    @property
    def a(self):  # the x0 conversion D = a x + b g, where the model is evaluated (not at a singular end)
        return _conv(*self._conv, "x0")[0]

    @property
    def b(self):
        return _conv(*self._conv, "x0")[1]

    def d(self):
        """d = (x / alpha - D) / sigma as (coefficient of x, of g)."""
        return (1.0 / self.alpha - self.a) / self.sigma, -self.b / self.sigma


def _euler(i, p: _Point, q: _Point) -> Stage:
    """x' = alpha' [(sigma' / sigma) y + (1 - sigma' / sigma) D] (alpha' D at sigma' = 0, DDIM's limit from
    sigma = inf)."""
    if math.isinf(p.sigma):
        return Stage(i, p.t, "x", "x", q.alpha * p.a + q.beta / p.beta, q.alpha * p.b, x0=(p.a, p.b), final=True)
    r = q.sigma / p.sigma
    return Stage(i, p.t, "x", "x", q.alpha * (r / p.alpha + (1 - r) * p.a), q.alpha * (1 - r) * p.b, x0=(p.a, p.b),
                 final=True)


def _step(i, p: _Point, q: _Point, nxt: _Point | None, sigma0: float) -> list[Stage]:
    """Heun (nxt None) or Heun++ from p to q, the third evaluation at nxt."""
    dt = q.sigma - p.sigma
    w2 = q.sigma / ((2.0 if nxt is None else 3.0) * sigma0)
    w3 = 0.0 if nxt is None else nxt.sigma / (3.0 * sigma0)
    w1 = 1.0 - w2 - w3
    dx, dg = p.d()
    first = replace(_euler(i, p, q), out="stage", final=False,  # x_2 = alpha_1 (y + d dt); side: y + w1 dt d
                    side="side0", s_x=1.0 / p.alpha + w1 * dt * dx, s_pred=w1 * dt * dg)
    ex, eg = q.d()
    if nxt is None:  # x' = alpha_1 (side0 + w2 dt d_2)
        return [first, Stage(i, q.t, "stage", "x", q.alpha * w2 * dt * ex, q.alpha * w2 * dt * eg, c_extra=q.alpha,
                             extra="side0", final=True)]
    r = nxt.sigma / q.sigma  # x_3 = alpha_2 [(sigma_2 / sigma_1) y_2 + (1 - sigma_2 / sigma_1) D_2]; side1 += w2 dt d_2
    second = Stage(i, q.t, "stage", "stage", nxt.alpha * (r / q.alpha + (1 - r) * q.a), nxt.alpha * (1 - r) * q.b,
                   extra="side0", side="side1", s_x=w2 * dt * ex, s_pred=w2 * dt * eg, s_extra=1.0)
    fx, fg = nxt.d()  # x' = alpha_1 (side1 + w3 dt d_3)
    third = Stage(i, nxt.t, "stage", "x", q.alpha * w3 * dt * fx, q.alpha * w3 * dt * fg, c_extra=q.alpha,
                  extra="side1", final=True)
    return [first, second, third]


@register_method("heunpp2", options=dict(churn.OPTIONS), evals_per_step=3, conversions=("x0",),
                 description="ComfyUI's Heun++: Heun with a third slope one grid point ahead, weighted by sigma / "
                             "sigma_0 (3 evaluations, 2 and 1 on the last steps; EDM churn)")
def _heunpp2(path, grid, prediction, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0) -> list[Stage]:
    try:
        plan = churn.plan(path, grid, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    except ValueError as exc:
        raise ValueError(f"{exc} (method='heunpp2')") from None
    n = len(grid) - 1
    sigma0 = noise_level(path, grid[0])
    points = [_Point(path, t, prediction) for t in grid]
    stages: list[Stage] = []
    for i, (t_hat, scale, noise) in enumerate(plan):
        p = points[i] if t_hat == grid[i] else _Point(path, t_hat, prediction)
        q = points[i + 1]
        if i + 1 == n or math.isinf(sigma0) or q.sigma == 0.0:
            step = [_euler(i, p, q)]
        else:
            step = _step(i, p, q, points[i + 2] if i + 2 < n else None, sigma0)
        if scale != 1.0 or noise != 0.0:  # the churn to t_hat: folded into the previous step's output (churn.churned)
            if i == 0:
                step[0] = replace(step[0], start_churn=(scale, noise))
            else:
                prev = stages[-1]
                stages[-1] = replace(prev, c_x=scale * prev.c_x, c_pred=scale * prev.c_pred,
                                     c_extra=scale * prev.c_extra, c_noise=noise, stream=draw_stream(i))
        stages += step
    return stages
