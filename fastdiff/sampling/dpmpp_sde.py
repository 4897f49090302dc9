"""DPM-Solver++ SDE samplers (Lu et al. 2022, "DPM-Solver++"; k-diffusion's SDE variants).

In lambda = log(alpha / beta) (k-diffusion's -log sigma) with x0 predictions D, one step t -> t' of
h = lambda' - lambda and noise fraction eta is, on any Gaussian path (k-diffusion's VE state is x / alpha):

    x' = (beta' / beta) e^{-eta h} x + alpha' (1 - e^{-(1 + eta) h}) D + alpha' c (D - D_prev)
         + beta' sqrt(1 - e^{-2 eta h}) s_noise xi

with the second-order correction c = (1 - e^{-(1 + eta) h}) / (2 r) ("midpoint") or
((1 - e^{-(1 + eta) h}) / (-(1 + eta) h) + 1) / r ("heun"), r = h_prev / h, from the second step on.
eta = 0 is the deterministic DPM-Solver++(2M) (``dpmpp_2m``); the step that ends at beta' = 0 returns
alpha' D, as k-diffusion's denoising step does.
"""

from __future__ import annotations

import math

from fastdiff.sampling.coefficients import Stage, _conv, _lambda, check_s_noise, draw_stream
from fastdiff.sampling.methods import register_method

SOLVER_TYPES = ("midpoint", "heun")


@register_method("dpmpp_2m_sde", options={"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}, evals_per_step=1,
                 conversions=("x0",),
                 description="DPM-Solver++(2M) SDE: second-order multistep with eta x fresh noise (midpoint or heun)")
def _dpmpp_2m_sde(path, grid, prediction, eta=1.0, s_noise=1.0, solver_type="midpoint") -> list[Stage]:
    s_noise = check_s_noise(s_noise)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    stages = []
    h_prev = None
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        al, be = path.coefficients(t)[:2]
        al1, be1 = path.coefficients(t1)[:2]
        a0, b0 = _conv(path, t, prediction, "x0")
        h = _lambda(al1, be1) - _lambda(al, be)
        if be1 == 0.0:  # the denoising step: x' = alpha' D
            c_d, c_x, c_n, c = al1, 0.0, 0.0, 0.0
        else:
            eh = (1.0 + eta) * h
            c_d = al1 * -math.expm1(-eh) if math.isfinite(h) else al1  # alpha' (1 - e^{-(1 + eta) h})
            decay = 1.0 if eta == 0 else math.exp(-eta * h)  # e^{-eta h} (0 from t = 0, where h is infinite)
            c_x = be1 / be * decay if be > 0 else 0.0
            c_n = be1 * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise if eta > 0 else 0.0
            c = 0.0
            if h_prev is not None and math.isfinite(h_prev) and math.isfinite(h) and h_prev > 0:
                inv_r = h / h_prev
                c = (0.5 * c_d * inv_r if solver_type == "midpoint"
                     else al1 * (-math.expm1(-eh) / -eh + 1.0) * inv_r)
        side, prev = f"side{i % 2}", f"side{(i - 1) % 2}"
        stages.append(Stage(i, t, "x", "x", c_x + (c_d + c) * a0, (c_d + c) * b0,
                            c_extra=-c, extra=prev if c != 0.0 else None, c_noise=c_n, stream=draw_stream(i),
                            side=side, s_x=a0, s_pred=b0, x0=(a0, b0), final=True))
        h_prev = h
    return stages
