"""Gradient estimation sampler (Permenter & Yuan 2024, "Interpreting and improving diffusion models from an
optimization perspective"; ComfyUI comfy/k_diffusion/sampling.py sample_gradient_estimation, ge_gamma = 2).

In k-diffusion's noise level sigma = beta / alpha with the scaled state y = x / alpha and the slope
d = (y - D) / sigma (= the eps estimate (x - alpha D) / beta, finite at alpha = 0 too), step i from sigma to sigma':

    y' = y + d (sigma' - sigma) + (ge_gamma - 1) (d - d_prev) (sigma' - sigma)      (the correction from step 1 on)

i.e. Euler in sigma on the extrapolated slope ge_gamma d - (ge_gamma - 1) d_prev, with d_prev the previous step's
slope (a side buffer, one history term). The Euler part is x' = alpha' D + beta' d, which is also its limit from
sigma = inf (alpha = 0: DDIM's x' = alpha' D + (beta' / beta) x). The step to sigma' = 0 returns alpha' D. ge_gamma = 1
is Euler (DDIM); ge_gamma = 2 extrapolates linearly. At the default it is a first-order method (the
extrapolation 2 d - d_prev is not Adams–Bashforth's 3/2 d - 1/2 d_prev); ge_gamma = 1.5 is Adams–Bashforth 2 in
sigma on evenly spaced levels, second order (tests/test_heunpp2_gradient_estimation.py measures both).

On CondOT this is k-diffusion's sigma-space form; ComfyUI's CONST models run the same loop in their own sigma, the
noise fraction beta, with the unscaled state: the Euler part agrees (both are DDIM), the correction term differs.

CFG++ (guidance="cfg_pp": ComfyUI's sample_gradient_estimation_cfg_pp): y' = D + sigma' d_u + (ge_gamma - 1)
(sigma' - sigma) (d_u - d_u,prev) with d_u = (y - U) / sigma from the unconditional prediction U and D the guided
one; the step to sigma' = 0 returns D. The out row above on the blend U + rho (D - U) (Stage.cfg_pp = rho): D's share
rho = 1 / (1 - c), c = (ge_gamma sigma' - (ge_gamma - 1) sigma) / sigma from step 1 on (sigma' / sigma at step 0),
in flow coordinates alpha' / (alpha' - (beta' + k) alpha / beta) (1 at alpha = 0); the history keeps d_u, the side row
on the unconditional prediction alone (Stage.side_blend = (1, 0)).
"""

from __future__ import annotations

import math

from fastdiff.sampling.methods.coefficients import Stage, _conv
from fastdiff.sampling.methods.registry import register_method


def _check_gamma(ge_gamma) -> float:
    if not isinstance(ge_gamma, (int, float)) or isinstance(ge_gamma, bool) or not math.isfinite(ge_gamma):
        raise ValueError(f"ge_gamma must be a finite number for method='gradient_estimation', got {ge_gamma!r}")
    return float(ge_gamma)


@register_method("gradient_estimation", options={"ge_gamma": 2.0}, evals_per_step=1, conversions=("x0",), cfg_pp=True,
                 description="ComfyUI's gradient estimation (Permenter & Yuan): Euler in sigma on ge_gamma d - "
                             "(ge_gamma - 1) d_prev")
def _gradient_estimation(path, grid, prediction, ge_gamma=2.0) -> list[Stage]:
    ge_gamma = _check_gamma(ge_gamma)
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        al, be = path.coefficients(t)[:2]
        al1, be1 = path.coefficients(t1)[:2]
        a, b = _conv(path, t, prediction, "x0")
        dx, dg = (1.0 - al * a) / be, -al * b / be  # d = (x - alpha D) / beta
        side = dict(side=f"side{i % 2}", s_x=dx, s_pred=dg, side_blend=(1.0, 0.0))  # CFG++: the history is d_u
        if be1 == 0.0:  # the denoising step
            stages.append(Stage(i, t, "x", "x", al1 * a, al1 * b, x0=(a, b), final=True, cfg_pp=1.0))
            continue
        c_x, c_pred = al1 * a + be1 * dx, al1 * b + be1 * dg  # alpha' D + beta' d
        extra, c_extra = None, 0.0
        if i >= 1 and ge_gamma != 1.0:  # + alpha' (ge_gamma - 1) (sigma' - sigma) (d - d_prev)
            k = al1 * (ge_gamma - 1.0) * (be1 / al1 - be / al)
            c_x, c_pred, extra, c_extra = c_x + k * dx, c_pred + k * dg, f"side{(i - 1) % 2}", -k
        # CFG++: alpha' D of c_pred's alpha' D + (beta' + k) d (D's share; c_pred = 0 only at ge_gamma = 0, where the
        # step alpha' (D - U) + ... has no blend to scale: refused there)
        clean = al1 * b / c_pred if c_pred != 0.0 else None
        stages.append(Stage(i, t, "x", "x", c_x, c_pred, c_extra=c_extra, extra=extra, x0=(a, b), final=True,
                            cfg_pp=clean, **side))
    return stages
