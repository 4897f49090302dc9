"""Singlestep DPM-Solver (Lu et al. 2022, "DPM-Solver", and "DPM-Solver++"; diffusers' DPMSolverSinglestepScheduler,
whose formulas these are; k-diffusion's ``sample_dpm_fast`` splits its steps alike but puts the intermediate points
inside each step, not on the grid).

The grid's steps are split into groups of 3, 2 or 1 (diffusers' get_order_list, :func:`group_sizes`); a group of g
steps from grid point k is one DPM-Solver step of order g from x_k to x_{k+g} whose intermediate evaluation points
are the group's inner grid points. Stage j of the group (one model evaluation at t_{k+j}) writes the order-(j + 1)
update from x_k to x_{k+j+1}: the state at the next grid point, where the next stage evaluates the model. In
k-diffusion's coordinates (fastdiff.sampling.methods.sigma_space: y = x / alpha, sigma = beta / alpha,
lambda = -log sigma, h = lambda_{k+j+1} - lambda_k) with M_l the model output at t_{k+l} as x0 (``dpmsolver++``) or
eps (``dpmsolver``), r's the inner lambdas' ratios to h:

    dpmsolver++:  y' = (sigma' / sigma_k) y_k + (1 - e^-h) M_0 + c_1 D_1 + c_2 D_2
    dpmsolver:    y' = y_k - (sigma_k - sigma') M_0 - ...       (the same terms with sigma' e^h's phi functions)

order 2: D_1 = (M_1 - M_0) / r, c_1 = (1 - e^-h) / 2 (midpoint) or 1 - (1 - e^-h) / h (heun); order 3 (r0 at
k + 2, r1 at k + 1): midpoint uses D_1 = (M_2 - M_0) / r0 alone, heun the full first and second differences.

Every stage reads x = x_{k+j} (the previous stage's output) and recovers y_k from it and the stored M's
(x_{k+j} = alpha (P y_k + Σ W M), P = sigma_{k+j} / sigma_k > 0 or 1), so a stage is one kernel pass: out = x_{k+j+1},
side = M_j into side{j} for the group's later stages, the earlier M's as history. A group ending at sigma' = 0
ends with a first-order step (its update's limit: D); a step from sigma = inf (alpha = 0) is DDIM's first-order
limit and the groups start after it.
"""

from __future__ import annotations

import math

from fastdiff import _checks
from fastdiff.paths import affine_coefficients
from fastdiff.sampling.core.stage import Stage
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import noise_level, require_finite

ALGORITHMS = ("dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


def group_sizes(steps: int, order: int, lower_order_final: bool = True, ends_at_zero: bool = True) -> list[int]:
    """The sizes of the groups (each one DPM-Solver step of that order) of ``steps`` grid steps: diffusers'
    get_order_list as runs of 1, .., g. Like diffusers, lower_order_final is on where the steps do not divide
    into groups of ``order`` or the grid ends at sigma = 0 (whose step must be first order)."""
    if order == 1 or steps == 0:
        return [1] * steps
    full, rest = divmod(steps, order)
    if not (lower_order_final or rest or ends_at_zero):
        return [order] * full
    if order == 3:
        sizes = [3] * (full - 1) + [2, 1] if rest == 0 else [3] * full + [rest]
    else:
        sizes = [2] * (full - 1) + [1, 1] if rest == 0 else [2] * full + [1]
    if ends_at_zero and sizes[-1] > 1:  # the step to sigma = 0 alone: first order
        sizes[-1:] = [sizes[-1] - 1, 1]
    return sizes


def _expm1_ratio(h: float) -> float:
    """(1 - e^-h) / h, continuous at h = inf (0)."""
    return -math.expm1(-h) / h if math.isfinite(h) else 0.0


def _update(sig: list[float], lam: list[float], k: int, j: int, algorithm: str, solver: str):
    """(P, W) of the order-(j + 1) update from grid point k to k + j + 1: y' = P y_k + Σ_l W_l M_l (M_l at k + l).
    c0, c1, c2: the weights of M_0 and of the first and second differences (diffusers' x_t / alpha_t)."""
    s, t = sig[k], sig[k + j + 1]
    h = lam[k + j + 1] - lam[k]
    if algorithm == "dpmsolver++":  # phi functions of -h
        p, c0 = t / s, -math.expm1(-h)
        heun = 1.0 - _expm1_ratio(h)
        c2 = -((math.expm1(-h) + h) / (h * h) - 0.5) if j == 2 else 0.0
    else:  # dpmsolver: sigma' e^h = sigma_k, so sigma' (e^h - 1) = sigma_k - sigma'
        p, c0 = 1.0, -(s - t)
        heun = -((s - t) / h - t)
        c2 = -((s - t - t * h) / (h * h) - 0.5 * t) if j == 2 else 0.0
    if j == 0:
        return p, [c0]
    if j == 1:  # D1 = (M1 - M0) / r0
        c1 = 0.5 * c0 if solver == "midpoint" else heun
        r0 = (lam[k + 1] - lam[k]) / h
        return p, [c0 - c1 / r0, c1 / r0]
    r0, r1 = (lam[k + 2] - lam[k]) / h, (lam[k + 1] - lam[k]) / h
    d1_1 = [-1.0 / r0, 0.0, 1.0 / r0]  # (M2 - M0) / r0
    if solver == "midpoint":  # the third-order midpoint update uses D1_1 alone, with the heun weight
        return p, [c0 + heun * d1_1[0], 0.0, heun * d1_1[2]]
    d1_0 = [-1.0 / r1, 1.0 / r1, 0.0]  # (M1 - M0) / r1
    d1 = [(r0 * a - r1 * b) / (r0 - r1) for a, b in zip(d1_0, d1_1)]
    d2 = [2.0 * (b - a) / (r0 - r1) for a, b in zip(d1_0, d1_1)]
    return p, [(c0 if n == 0 else 0.0) + heun * a + c2 * b for n, (a, b) in enumerate(zip(d1, d2))]


def _conversions(algorithm_type="dpmsolver++", **_):
    return ("eps", "x0") if algorithm_type == "dpmsolver" else ("x0",)


@register_method("dpm_singlestep", options={"order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                            "lower_order_final": True},
                 evals_per_step=1, conversions=_conversions,
                 description="singlestep DPM-Solver(++) of order <= 3 over groups of grid steps, the inner grid points "
                             "its intermediate points (diffusers' DPMSolverSinglestepScheduler)")
def _dpm_singlestep(path, grid, prediction, order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                    lower_order_final=True) -> list[Stage]:
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3 for method='dpm_singlestep', got {order!r}")
    if algorithm_type not in ALGORITHMS:
        raise ValueError(f"algorithm_type must be 'dpmsolver++' or 'dpmsolver' for method='dpm_singlestep', got "
                         f"{algorithm_type!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be 'midpoint' or 'heun' for method='dpm_singlestep', got {solver_type!r}")
    lower_order_final = _checks.flag("lower_order_final", lower_order_final)
    target = "x0" if algorithm_type == "dpmsolver++" else "eps"
    sig = [noise_level(path, t) for t in grid]
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    stages, start = [], 0
    if len(grid) > 1 and math.isinf(sig[0]):  # from alpha = 0: DDIM's first-order limit x' = alpha' D + beta'/beta x
        a, b = affine_coefficients(path, grid[0], prediction, "x0")
        al1, be, be1 = path.coefficients(grid[1])[0], path.coefficients(grid[0])[1], path.coefficients(grid[1])[1]
        stages.append(Stage(0, grid[0], "x", "x", al1 * a + be1 / be, al1 * b, x0=(a, b), final=True))
        start = 1
    k = start
    for size in group_sizes(len(grid) - 1 - start, order, lower_order_final, sig[-1] == 0.0):
        for j in range(size):
            i = k + j
            t = grid[i]
            require_finite("dpm_singlestep", sig[i], t)
            al, al1 = path.coefficients(t)[0], path.coefficients(grid[i + 1])[0]
            a, b = affine_coefficients(path, t, prediction, target)
            p, w = _update(sig, lam, k, j, algorithm_type, solver_type)
            c_x, hist = p / al, [al1 * v for v in w[:-1]]
            if j > 0:  # y_k = (x / alpha - Σ W_prev M) / P_prev: this stage's input stands for x_k
                p_prev, w_prev = _update(sig, lam, k, j - 1, algorithm_type, solver_type)
                c_x = p / (p_prev * al)
                hist = [al1 * (v - p / p_prev * u) for v, u in zip(w, w_prev)]
            terms = [(f"side{n}", c, 0.0) for n, c in enumerate(hist)]
            extra, *more = terms or [(None, 0.0, 0.0)]
            side = f"side{j}" if j < size - 1 else None  # M_j for the group's later stages
            stages.append(Stage(i, t, "x", "x", al1 * (c_x + w[-1] * a), al1 * w[-1] * b, c_extra=extra[1],
                                extra=extra[0], history=tuple(more), side=side, s_x=a if side else 0.0,
                                s_pred=b if side else 0.0, x0=affine_coefficients(path, t, prediction, "x0"),
                                final=True))
        k += size
    return stages
