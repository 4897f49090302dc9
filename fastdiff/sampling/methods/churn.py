"""EDM's stochastic churn (Karras et al. 2022, Algorithm 2; k-diffusion's s_churn, s_tmin, s_tmax, s_noise)
for any method registered with ``churn_options=True`` (fastdiff.sampling.methods).

Before step i, where s_tmin <= sigma_i <= s_tmax (sigma = beta / alpha, k-diffusion's noise level),
the state is taken back to the higher level sigma_hat = (1 + gamma) sigma_i with
gamma = min(s_churn / steps, sqrt(2) - 1), by the path's own forward kernel from t_i to the earlier
time t_hat of that level:

    x_hat = (alpha_hat / alpha_i) x + s_noise sqrt(beta_hat^2 - (alpha_hat beta_i / alpha_i)^2) xi

(on the VE path: x + s_noise sqrt(sigma_hat^2 - sigma_i^2) xi, k-diffusion's step), and the method's
step runs from t_hat to t_{i+1}. The churn adds no kernel call: it rides in the previous step's last
stage (its output row scaled, the draw added), and in the initial state's write at the first step
(Stage.start_churn). Its draw is stream draw_stream(i) of step i. No churn where sigma is infinite
(alpha = 0: the state is pure noise already).
"""

from __future__ import annotations

import math
from dataclasses import replace

from fastdiff.sampling.methods.sigma_space import noise_level, time_at
from fastdiff.sampling.core.stage import Stage, draw_stream

OPTIONS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
GAMMA_MAX = math.sqrt(2.0) - 1.0  # Karras et al.: beyond this the step adds more noise than it removes


def _number(name, value, low=0.0, inf=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
    if not ok or (not inf and not math.isfinite(value)):
        raise ValueError(f"{name} must be a {'' if inf else 'finite '}number >= {low:g}, got {value!r}")
    return float(value)


def plan(path, grid, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0) -> list[tuple[float, float, float]]:
    """Per step i: (t_hat, scale, noise coefficient) with x_hat = scale x + coefficient xi; (t_i, 1, 0)
    where no churn applies."""
    s_churn, s_tmin = _number("s_churn", s_churn), _number("s_tmin", s_tmin)
    s_tmax, s_noise = _number("s_tmax", s_tmax, inf=True), _number("s_noise", s_noise)
    steps = len(grid) - 1
    gamma = min(s_churn / steps, GAMMA_MAX)
    out = []
    for i in range(steps):
        t = grid[i]
        sigma = noise_level(path, t)
        if gamma == 0.0 or not math.isfinite(sigma) or not s_tmin <= sigma <= s_tmax:
            out.append((t, 1.0, 0.0))
            continue
        try:
            t_hat = time_at(path, sigma * (1.0 + gamma), 0.0, t)
        except ValueError:
            raise ValueError(f"s_churn={s_churn}: step {i} raises the noise level from {sigma:.6g} to "
                             f"{sigma * (1 + gamma):.6g}, above the path's at t = 0 ({noise_level(path, 0.0):.6g}); "
                             "lower s_tmax or start the grid later") from None
        al, be = path.coefficients(t)[:2]
        al_hat, be_hat = path.coefficients(t_hat)[:2]
        scale = al_hat / al
        out.append((t_hat, scale, s_noise * math.sqrt(max(0.0, be_hat * be_hat - (scale * be) ** 2))))
    return out


def churned(build, path, grid, prediction, churn: dict, **options) -> list[Stage]:
    """The stage table of the churn-free builder ``build`` with churn: each step built from t_hat to
    t_{i+1}, its churn folded into the stage before it."""
    steps = plan(path, grid, **churn)
    # no churn only where no step starts from a raised level: s_noise = 0 adds no noise, but k-diffusion still
    # evaluates the model at sigma_hat (and on the VE path the scale is 1 too)
    if all(t_hat == t for (t_hat, _, _), t in zip(steps, grid)):
        return build(path, grid, prediction, **options)
    if callable(options.get("sigma")):
        raise ValueError("churn (s_churn > 0) applies to the deterministic steps; sigma > 0 adds noise of its own: "
                         "choose one")
    stages: list[Stage] = []
    for i, (t_hat, scale, noise) in enumerate(steps):
        step = [replace(st, step=i) for st in build(path, [t_hat, grid[i + 1]], prediction, **options)]
        if any(st.c_noise != 0.0 for st in step):
            raise ValueError("churn (s_churn > 0) applies to the deterministic steps; this method draws noise "
                             "of its own (sigma > 0?)")
        if scale != 1.0 or noise != 0.0:
            if i == 0:
                step[0] = replace(step[0], start_churn=(scale, noise))
            else:
                prev = stages[-1]
                stages[-1] = replace(prev, c_x=scale * prev.c_x, c_pred=scale * prev.c_pred,
                                     c_extra=scale * prev.c_extra, c_noise=noise, stream=draw_stream(i),
                                     history=tuple((b, scale * c, s) for b, c, s in prev.history))
        stages.extend(step)
    return stages
