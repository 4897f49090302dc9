"""ER-SDE-Solver (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDEs for diffusion
models", arXiv 2309.06169): ComfyUI's VP ER-SDE-Solver-3 (comfy/k_diffusion/sampling.py sample_er_sde, with the
noise scalers of its SamplerER_SDE node, comfy_extras/nodes_custom_sampler.py).

In lambda = beta / alpha (ComfyUI's er_lambda = exp(-half log-SNR): sigma / alpha on EPS models, sigma / (1 - sigma)
on flow (CONST) models, both beta / alpha here) with x0 predictions D and a noise scaler phi, one step from lambda to
lambda' (r = phi(lambda') / phi(lambda), h = lambda' - lambda) is

    x' = (alpha' / alpha) r x + alpha' (1 - r) D                                       (stage 1)
         + alpha' (h + phi(lambda') S) D_d                                             (stage 2, from step 1)
         + alpha' (h^2 / 2 + phi(lambda') S_u) D_u                                     (stage 3, from step 2)
         + alpha' s_noise sqrt(lambda'^2 - lambda^2 r^2) xi

with the divided differences D_d = (D - D_1) / (lambda - lambda_1), D_u = (D_d - D_d,1) / ((lambda - lambda_2) / 2)
and the integrals S = ∫ 1 / phi, S_u = ∫ (l - lambda) / phi over [lambda', lambda], taken as ComfyUI takes them:
the same 200-point left Riemann sums from lambda', here in float64 on the host. ``max_stage`` caps the stage.
Noise scalers (``solver_type``, the node's choices, with its eta: psi = x^(1 - eta) phi^eta):
"ER-SDE" x (e^{x^0.3} + 10)^eta (at eta = 1 sample_er_sde's default scaler), "Reverse-time SDE" x^{1 + eta},
"ODE" x with no noise (DDIM-like); eta = 0 makes every type "ODE", as the node does. (An earlier SamplerER_SDE
applied eta to "Reverse-time SDE" only; the two agree at the default eta = 1.)

This is ComfyUI's formula on any path: its alpha_s = sigma / er_lambda is the path's alpha (1 on the VE path,
1 - sigma on CONST). The step to beta' = 0 returns alpha' D. From lambda = inf (alpha = 0, e.g. t = 0 on CondOT,
which ComfyUI avoids by offsetting the first sigma to 0.9999) the step takes its limit: x' = alpha' D + beta' s_noise xi
for the SDE scalers (phi / x grows without bound), x' = alpha' D + (beta' / beta) x for "ODE"; the divided differences
through lambda = inf vanish, so the stages restart after it.
"""

from __future__ import annotations

import math

from fastdiff.sampling.methods.coefficients import Stage, _conv, check_s_noise
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import noise_level
from fastdiff.sampling.core.stage import draw_stream

SOLVER_TYPES = ("ER-SDE", "Reverse-time SDE", "ODE")
POINTS = 200  # ComfyUI's num_integration_points


def noise_scaler(solver_type: str, eta: float):
    """The SamplerER_SDE node's noise scaler of a solver type (float64; inf where it overflows, lambda = inf)."""
    if solver_type == "ER-SDE":
        def scaler(x):
            try:
                return x * (math.exp(x ** 0.3) + 10.0) ** eta
            except OverflowError:
                return math.inf
        return scaler
    power = 1.0 + (eta if solver_type == "Reverse-time SDE" else 0.0)
    return lambda x: x ** power


def integrals(phi, lam: float, lam1: float) -> tuple[float, float]:
    """(S, S_u): ComfyUI's 200-point sums of 1 / phi and (l - lambda) / phi from lambda' towards lambda."""
    step = (lam - lam1) / POINTS
    s = s_u = 0.0
    for k in range(POINTS):
        pos = lam1 + k * step
        f = phi(pos)
        s += 1.0 / f
        s_u += (pos - lam) / f
    return s * step, s_u * step


def _check(solver_type, max_stage, eta, s_noise):
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {', '.join(map(repr, SOLVER_TYPES))} for method='er_sde', "
                         f"got {solver_type!r}")
    if not isinstance(max_stage, int) or isinstance(max_stage, bool) or not 1 <= max_stage <= 3:
        raise ValueError(f"max_stage must be 1, 2 or 3 for method='er_sde', got {max_stage!r}")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 for method='er_sde', got {eta!r}")
    s_noise = check_s_noise(s_noise)
    if solver_type == "ODE" or eta == 0:  # the node's rule
        return "ODE", 0.0, 0.0
    return solver_type, float(eta), s_noise


@register_method("er_sde", options={"solver_type": "ER-SDE", "max_stage": 3, "eta": 1.0, "s_noise": 1.0},
                 evals_per_step=1, conversions=("x0",),
                 description="ComfyUI's ER-SDE-Solver-3: extended reverse-time SDE, up to 3 stages from earlier x0 "
                             "(solver_type ER-SDE, Reverse-time SDE or ODE)")
def _er_sde(path, grid, prediction, solver_type="ER-SDE", max_stage=3, eta=1.0, s_noise=1.0) -> list[Stage]:
    solver_type, eta, s_noise = _check(solver_type, max_stage, eta, s_noise)
    phi = noise_scaler(solver_type, eta)
    lams = [noise_level(path, t) for t in grid]
    stages, start, dd1 = [], 0, None  # start: the first step of the history; dd1: D_d,1 as weights on (D_1, D_2)
    for i in range(len(grid) - 1):
        t = grid[i]
        al, be = path.coefficients(t)[:2]
        al1, be1 = path.coefficients(grid[i + 1])[:2]
        a, b = _conv(path, t, prediction, "x0")
        lam, lam1 = lams[i], lams[i + 1]
        if be1 == 0.0:  # the denoising step
            stages.append(Stage(i, t, "x", "x", al1 * a, al1 * b, x0=(a, b), final=True))
            continue
        if math.isinf(lam):  # from alpha = 0: the limit of the step, the history restarting after it
            keep = be1 / be if solver_type == "ODE" else 0.0
            stages.append(Stage(i, t, "x", "x", al1 * a + keep, al1 * b, c_noise=be1 * s_noise,
                                stream=draw_stream(i), side=f"side{i % 3}", s_x=a, s_pred=b, x0=(a, b), final=True))
            start = i + 1
            continue
        r = phi(lam1) / phi(lam)
        w = [al1 * (1.0 - r), 0.0, 0.0]  # weights of D, D_1, D_2
        used = min(max_stage, i + 1 - start)
        if used >= 2:
            h = lam1 - lam
            s, s_u = integrals(phi, lam, lam1)
            c2 = al1 * (h + s * phi(lam1))
            g1 = 1.0 / (lam - lams[i - 1])  # D_d = g1 (D - D_1)
            w[0] += c2 * g1
            w[1] -= c2 * g1
            if used >= 3:
                c3 = al1 * (h * h / 2.0 + s_u * phi(lam1)) * 2.0 / (lam - lams[i - 2])  # times (D_d - D_d,1)
                w[0] += c3 * g1
                w[1] += -c3 * g1 - c3 * dd1[0]
                w[2] -= c3 * dd1[1]
            dd1 = (g1, -g1)
        v = lam1 * lam1 - (lam * r) ** 2
        c_n = al1 * s_noise * math.sqrt(v) if v > 0.0 and s_noise else 0.0
        history = [(f"side{(i - j) % 3}", w[j]) for j in (1, 2) if w[j] != 0.0]
        extra, *more = history or [(None, 0.0)]
        stages.append(Stage(i, t, "x", "x", al1 / al * r + w[0] * a, w[0] * b, c_extra=extra[1], extra=extra[0],
                            history=tuple((buf, c, 0.0) for buf, c in more), c_noise=c_n, stream=draw_stream(i),
                            side=f"side{i % 3}", s_x=a, s_pred=b, x0=(a, b), final=True))
    return stages
