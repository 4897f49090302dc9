"""PLMS (Liu et al. 2022, "Pseudo numerical methods for diffusion models"; diffusers' PNDMScheduler with
skip_prk_steps=True, Stable Diffusion 1.5's default scheduler).

In k-diffusion's coordinates (fastdiff.sampling.methods.sigma_space: scaled state x / alpha, sigma = beta / alpha,
d = (x / alpha - D) / sigma, the eps prediction) PNDM's transfer step is DDIM's, the Euler step in sigma, so PLMS is

    step 0:  Heun in sigma: x_e = Euler step on d_0, then x' / alpha' = x / alpha + h (d_0 + d(x_e, t')) / 2
    step i:  x' / alpha' = x / alpha + h Σ_j w_j d_{i-j}, Adams-Bashforth weights of a uniform step (order <= 4)

with h = sigma' - sigma. The history holds the d of each step's first evaluation (d_0 at t_0, not the corrector's),
so from step 1 on it is iPNDM's table; the weights stay fixed whatever the step sizes, as in PLMS. Unlike
iPNDM, a last step to sigma' = 0 is the same multistep update (PLMS does not special-case it). Two stages on
step 0 (the second at t_1), one afterwards. A step from sigma = inf (alpha = 0, e.g. t = 0 on CondOT, where
diffusers' grids never start) is DDIM's first-order limit, and PLMS starts after it (its Heun step the next).
"""

from __future__ import annotations

import math

from fastdiff.paths import affine_coefficients
from fastdiff.sampling.core.stage import Stage
from fastdiff.sampling.methods.ipndm import FIXED
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import noise_level, require_finite


def _derivative(path, t: float, prediction: str) -> tuple[float, float, float]:
    """(alpha, dx, dg) with d = dx x + dg g at t."""
    al = path.coefficients(t)[0]
    sigma = require_finite("pndm", noise_level(path, t), t)
    a, b = affine_coefficients(path, t, prediction, "x0")
    return al, (1.0 / al - a) / sigma, -b / sigma


@register_method("pndm", evals_per_step=1, conversions=("x0",),
                 description="PLMS (diffusers' PNDM, skip_prk_steps): a Heun first step, then fixed-weight "
                             "Adams-Bashforth of order <= 4 in sigma")
def _pndm(path, grid, prediction) -> list[Stage]:
    sigmas = [noise_level(path, t) for t in grid]
    stages, start = [], 0  # start: PLMS's first step (after a step from sigma = inf)
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        x0 = affine_coefficients(path, t, prediction, "x0")
        if math.isinf(sigmas[i]):  # from alpha = 0: DDIM's x' = alpha' D + beta'/beta x
            al1, be, be1 = path.coefficients(t1)[0], path.coefficients(t)[1], path.coefficients(t1)[1]
            stages.append(Stage(i, t, "x", "x", al1 * x0[0] + be1 / be, al1 * x0[1], x0=x0, final=True))
            start = i + 1
            continue
        al, dx, dg = _derivative(path, t, prediction)
        al1, h = path.coefficients(t1)[0], sigmas[i + 1] - sigmas[i]
        if i == start and sigmas[i + 1] > 0.0:  # Heun: the predictor into "stage", d_0 into the ring for both steps
            ring = f"side{i % 4}"
            stages.append(Stage(i, t, "x", "stage", al1 / al + al1 * h * dx, al1 * h * dg, side=ring, s_x=dx,
                                s_pred=dg, x0=x0))
            _, dx1, dg1 = _derivative(path, t1, prediction)
            half = 0.5 * al1 * h
            stages.append(Stage(i, t1, "stage", "x", half * dx1, half * dg1, c_extra=al1 / al, extra="x",
                                history=((ring, half, 0.0),), final=True))
            continue
        w = [al1 * h * v for v in FIXED[min(4, i + 1 - start)]]  # the weights of d_i, d_{i-1}, ...
        previous = [(f"side{(i - j) % 4}", w[j], 0.0) for j in range(1, len(w))]
        extra, *more = previous or [(None, 0.0, 0.0)]
        stages.append(Stage(i, t, "x", "x", al1 / al + w[0] * dx, w[0] * dg, c_extra=extra[1], extra=extra[0],
                            history=tuple(more), side=f"side{i % 4}", s_x=dx, s_pred=dg, x0=x0, final=True))
    return stages
