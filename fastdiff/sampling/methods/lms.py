"""Linear multistep (k-diffusion's ``sample_lms``): Adams–Bashforth in sigma = beta / alpha on the Karras ODE
d(x / alpha) / d sigma = eps. Step i integrates the Lagrange interpolant of the last ``order`` eps
predictions over [sigma_i, sigma_{i+1}] (exactly: the interpolant is a polynomial), so on any path

    x' = (alpha' / alpha) x + alpha' sum_j c_j eps_{i-j}

with eps_i = a x + b g from this step's prediction and eps_{i-1}, ... read as history buffers (a ring of
``order`` side buffers). A step from sigma = inf (alpha = 0, e.g. t = 0 on CondOT) is DDIM's, the
first-order limit, and the history starts after it.
"""

from __future__ import annotations

import math

from fastdiff.sampling.methods.coefficients import Stage, _conv
from fastdiff.sampling.methods.registry import register_method


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """The weights of eps_i, eps_{i-1}, ... for the step sigma_i -> sigma_{i+1}: the integrals of the
    Lagrange basis polynomials over the last ``order`` sigmas (k-diffusion's linear_multistep_coeff, whose
    numerical quadrature is exact for these polynomials)."""
    nodes = [sigmas[i - k] for k in range(order)]
    out = []
    for j in range(order):
        poly = [1.0]  # coefficients, constant term first
        for k in range(order):
            if k != j:  # poly *= (s - node_k) / (node_j - node_k)
                scale = 1.0 / (nodes[j] - nodes[k])
                poly = [scale * (lo - nodes[k] * hi) for lo, hi in zip([0.0] + poly, poly + [0.0])]
        integral = [0.0] + [c / (n + 1) for n, c in enumerate(poly)]  # antiderivative, 0 at s = 0

        def at(s, coeffs=integral):
            return sum(c * s**n for n, c in enumerate(coeffs))

        out.append(at(sigmas[i + 1]) - at(sigmas[i]))
    return out


@register_method("lms", options={"order": 4}, evals_per_step=1, conversions=("eps", "x0"),
                 description="linear multistep (Adams-Bashforth in sigma) of order <= 4 on eps predictions")
def _lms(path, grid, prediction, order=4) -> list[Stage]:
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 4:
        raise ValueError(f"order must be an int in [1, 4] (the kernel reads up to 3 previous predictions), got {order!r}")
    alphas = [path.coefficients(t)[0] for t in grid]
    sigmas = [path.coefficients(t)[1] / a if a > 0 else math.inf for t, a in zip(grid, alphas)]
    stages, start = [], 0  # start: the first step of the history (after a step from sigma = inf)
    for i in range(len(grid) - 1):
        if math.isinf(sigmas[i]):  # from alpha = 0: the first-order limit, DDIM's x' = alpha' x0 + beta'/beta x
            a0, b0 = _conv(path, grid[i], prediction, "x0")
            keep = path.coefficients(grid[i + 1])[1] / path.coefficients(grid[i])[1]
            stages.append(Stage(i, grid[i], "x", "x", alphas[i + 1] * a0 + keep, alphas[i + 1] * b0, x0=(a0, b0),
                                final=True))
            start = i + 1
            continue
        a_e, b_e = _conv(path, grid[i], prediction, "eps")
        cur = min(i + 1 - start, order)
        c = lms_coefficients(sigmas, i, cur)
        scale = alphas[i + 1]
        history = [(f"side{(i - j) % order}", scale * c[j], 0.0) for j in range(1, cur)]
        extra, more = (history[0], tuple(history[1:])) if history else ((None, 0.0, 0.0), ())
        stages.append(Stage(i, grid[i], "x", "x", alphas[i + 1] / alphas[i] + scale * c[0] * a_e, scale * c[0] * b_e,
                            c_extra=extra[1], extra=extra[0], history=more, side=f"side{i % order}",
                            s_x=a_e, s_pred=b_e, x0=_conv(path, grid[i], prediction, "x0"), final=True))
    return stages
