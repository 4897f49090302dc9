"""DPM-Solver++ SDE samplers (Lu et al. 2022, "DPM-Solver++"; k-diffusion's SDE variants).

In lambda = log(alpha / beta) (k-diffusion's -log sigma) with x0 predictions D, one step t -> t' of
h = lambda' - lambda and noise fraction eta is, on any Gaussian path (k-diffusion's VE state is x / alpha):

    x' = (beta' / beta) e^{-eta h} x + alpha' (1 - e^{-(1 + eta) h}) D + alpha' c (D - D_prev)
         + beta' sqrt(1 - e^{-2 eta h}) s_noise xi

with the second-order correction c = (1 - e^{-(1 + eta) h}) / (2 r) ("midpoint") or
((1 - e^{-(1 + eta) h}) / (-(1 + eta) h) + 1) / r ("heun"), r = h_prev / h, from the second step on.
eta = 0 is the deterministic DPM-Solver++(2M) (``dpmpp_2m``); the step that ends at beta' = 0 returns
alpha' D, as k-diffusion's denoising step does. ``dpmpp_3m_sde`` adds the third-order term from the two
previous x0 predictions (k-diffusion's sample_dpmpp_3m_sde).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastdiff.sampling.methods.coefficients import Stage, _conv, _lambda, check_s_noise, draw_stream
from fastdiff.sampling.methods.registry import register_method

SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class _Step:
    """The first-order part of one step t -> t': x' = c_x x + w0 D + c_n xi (w0 = alpha' (1 - e^{-(1 + eta) h})),
    with D = a0 x + b0 g; ``multistep``: whether a correction from earlier x0 predictions applies."""

    a0: float
    b0: float
    h: float  # lambda' - lambda (infinite from t = 0 on a path with alpha = 0, or to beta' = 0)
    eh: float  # (1 + eta) h
    alpha1: float
    c_x: float
    w0: float
    c_n: float
    multistep: bool


def _first_order(path, t, t1, prediction, eta, s_noise) -> _Step:
    al, be = path.coefficients(t)[:2]
    al1, be1 = path.coefficients(t1)[:2]
    a0, b0 = _conv(path, t, prediction, "x0")
    h = _lambda(al1, be1) - _lambda(al, be)
    if be1 == 0.0:  # the denoising step: x' = alpha' D
        return _Step(a0, b0, h, math.inf, al1, 0.0, al1, 0.0, False)
    eh = (1.0 + eta) * h
    w0 = al1 * -math.expm1(-eh) if math.isfinite(h) else al1
    decay = 1.0 if eta == 0 else math.exp(-eta * h)  # e^{-eta h} (0 from t = 0, where h is infinite)
    c_x = be1 / be * decay if be > 0 else 0.0
    c_n = be1 * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise if eta > 0 else 0.0
    return _Step(a0, b0, h, eh, al1, c_x, w0, c_n, math.isfinite(h))


def _usable(h_prev) -> bool:
    """Whether an earlier step's h can enter a correction (k-diffusion's steps all have finite h > 0)."""
    return h_prev is not None and math.isfinite(h_prev) and h_prev > 0


def _stage(i, t, st: _Step, w0, history, ring: int) -> Stage:
    """Step i's stage: out = c_x x + w0 D + sum of w_j D_j (history: ((buffer, w_j), ...), the previous x0
    predictions) + c_n xi; side = D into side{i % ring} (a ring of buffers: this D and the ones read)."""
    extra, *more = history or [(None, 0.0)]
    return Stage(i, t, "x", "x", st.c_x + w0 * st.a0, w0 * st.b0, c_extra=extra[1], extra=extra[0],
                 history=tuple((b, w, 0.0) for b, w in more), c_noise=st.c_n, stream=draw_stream(i),
                 side=f"side{i % ring}", s_x=st.a0, s_pred=st.b0, x0=(st.a0, st.b0), final=True)


@register_method("dpmpp_2m_sde", options={"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}, evals_per_step=1,
                 conversions=("x0",),
                 description="DPM-Solver++(2M) SDE: second-order multistep with eta x fresh noise (midpoint or heun)")
def _dpmpp_2m_sde(path, grid, prediction, eta=1.0, s_noise=1.0, solver_type="midpoint") -> list[Stage]:
    s_noise = check_s_noise(s_noise)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    stages, h1 = [], None
    for i in range(len(grid) - 1):
        st = _first_order(path, grid[i], grid[i + 1], prediction, eta, s_noise)
        c = 0.0  # the correction's weight on D - D_1
        if st.multistep and _usable(h1):
            inv_r = st.h / h1
            c = 0.5 * st.w0 * inv_r if solver_type == "midpoint" else st.alpha1 * (math.expm1(-st.eh) / st.eh + 1.0) * inv_r
        stages.append(_stage(i, grid[i], st, st.w0 + c, [(f"side{(i - 1) % 2}", -c)] if c != 0.0 else [], ring=2))
        h1 = st.h
    return stages


@register_method("dpmpp_3m_sde", options={"eta": 1.0, "s_noise": 1.0}, evals_per_step=1, conversions=("x0",),
                 description="DPM-Solver++(3M) SDE: third-order multistep (two previous x0) with eta x fresh noise")
def _dpmpp_3m_sde(path, grid, prediction, eta=1.0, s_noise=1.0) -> list[Stage]:
    # The correction phi_2 d1 - phi_3 d2 (k-diffusion's divided differences of D, D_1, D_2 with
    # r0 = h_1 / h, r1 = h_2 / h) is linear in the three x0 predictions: its weights are computed here,
    # and the kernel reads D_1 and D_2 as two history buffers (three side buffers in rotation).
    s_noise = check_s_noise(s_noise)
    stages, h1, h2 = [], None, None
    for i in range(len(grid) - 1):
        st = _first_order(path, grid[i], grid[i + 1], prediction, eta, s_noise)
        w0, al1, history = st.w0, st.alpha1, []
        if st.multistep and _usable(h1):
            phi2 = math.expm1(-st.eh) / st.eh + 1.0
            if _usable(h2):
                r0, r1 = h1 / st.h, h2 / st.h
                phi3 = phi2 / st.eh - 0.5
                k = r0 / (r0 + r1)
                a = phi2 * (1.0 + k) - phi3 / (r0 + r1)  # weight of d1_0 = (D - D_1) / r0
                b = phi2 * k - phi3 / (r0 + r1)  # weight of -d1_1 = -(D_1 - D_2) / r1
                w0 += al1 * a / r0
                history = [(f"side{(i - 1) % 3}", -al1 * (a / r0 + b / r1)), (f"side{(i - 2) % 3}", al1 * b / r1)]
            else:
                w0 += al1 * phi2 * st.h / h1
                history = [(f"side{(i - 1) % 3}", -al1 * phi2 * st.h / h1)]
        stages.append(_stage(i, grid[i], st, w0, history, ring=3))
        h1, h2 = st.h, h1
    return stages
