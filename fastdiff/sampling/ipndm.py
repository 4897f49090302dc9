"""iPNDM (Zhang & Chen 2023, DEIS paper's improved PNDM; ComfyUI's ``ipndm`` / ``ipndm_v``): linear
multistep (Adams-Bashforth) on k-diffusion's derivative d = (x - D) / sigma in sigma, order <= 4.

In k-diffusion's coordinates (fastdiff.sampling.sigma_space: scaled state x / alpha, sigma = beta / alpha)
a step is x' / alpha' = x / alpha + (sigma' - sigma) Σ_k w_k d_{i-k}: ``ipndm`` with the fixed
Adams-Bashforth weights of a uniform step (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24),
``ipndm_v`` with the weights of the actual, variable steps in sigma. The order warms up from 1; the step
to sigma' = 0 returns alpha' D; a step from sigma = inf (alpha = 0) is DDIM's, and the history restarts
after it. d_i = (x / alpha - D) / sigma is this stage's side output, kept in a ring
of four buffers; the previous ones are history.
"""

from __future__ import annotations

import math

from fastdiff.sampling.coefficients import Stage, _conv
from fastdiff.sampling.methods import register_method
from fastdiff.sampling.sigma_space import noise_level, require_finite

FIXED = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _variable(order: int, h: list[float]) -> list[float]:
    """Adams-Bashforth weights over variable steps: h[0] = this step (sigma' - sigma), h[k] = the step k
    before it (ComfyUI's ipndm_v, after zju-pi/diff-sampler)."""
    if order == 1:
        return [1.0]
    h0, h1 = h[0], h[1]
    if order == 2:
        return [(2 + h0 / h1) / 2, -(h0 / h1) / 2]
    h2 = h[2]
    t1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [(2 + h0 / h1) / 2 + t1, -(h0 / h1) / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = (((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2)))
          * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [(2 + h0 / h1) / 2 + t1 + t2,
            -(h0 / h1) / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
            -t2 * q * h1 / h2]


def _ipndm(method, path, grid, prediction, order, variable) -> list[Stage]:
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 4:
        raise ValueError(f"order must be 1, 2, 3 or 4 for method={method!r}, got {order!r}")
    sigmas = [noise_level(path, t) for t in grid]
    stages, start = [], 0  # start: the first step of the history (after a step from sigma = inf)
    for i in range(len(grid) - 1):
        t = grid[i]
        al, al1 = path.coefficients(t)[0], path.coefficients(grid[i + 1])[0]
        a, b = _conv(path, t, prediction, "x0")
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
        steps = [sigmas[i + 1 - j] - sigmas[i - j] for j in range(k)]  # this step and the k - 1 before it
        w = _variable(k, steps) if variable else FIXED[k]
        dx, dg = (1.0 / al - a) / sigma, -b / sigma  # d_i = dx x + dg g
        c = al1 * (sigmas[i + 1] - sigma)  # x' = alpha' x / alpha + c Σ w_j d_{i-j}
        previous = [(f"side{(i - j) % 4}", c * w[j], 0.0) for j in range(1, k)]
        extra, *more = previous or [(None, 0.0, 0.0)]
        stages.append(Stage(i, t, "x", "x", al1 / al + c * w[0] * dx, c * w[0] * dg, c_extra=extra[1], extra=extra[0],
                            history=tuple(more), side=f"side{i % 4}", s_x=dx, s_pred=dg, x0=(a, b), final=True))
    return stages


@register_method("ipndm", options={"order": 4}, evals_per_step=1, conversions=("x0",),
                 description="iPNDM: Adams-Bashforth of order <= 4 in sigma with fixed weights (ComfyUI's ipndm)")
def _ipndm_fixed(path, grid, prediction, order=4) -> list[Stage]:
    return _ipndm("ipndm", path, grid, prediction, order, variable=False)


@register_method("ipndm_v", options={"order": 4}, evals_per_step=1, conversions=("x0",),
                 description="iPNDM with variable-step Adams-Bashforth weights in sigma (ComfyUI's ipndm_v)")
def _ipndm_variable(path, grid, prediction, order=4) -> list[Stage]:
    return _ipndm("ipndm_v", path, grid, prediction, order, variable=True)
