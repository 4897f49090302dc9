"""UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework"; diffusers'
UniPCMultistepScheduler with x0 predictions), solver types bh1 / bh2, order 1-3, on any Gaussian path.

At step i the model output at the predicted state X_i gives m_i = a X_i + b g (the x0 prediction). The
corrector (UniC) turns the previous step's corrected state L = x^c_{i-1} into x^c_i from m_i and the
earlier m's; the predictor (UniP) steps x^c_i to X_{i+1}. Everything is linear in (X_i, g, m_{i-1},
m_{i-2}, m_{i-3}): L itself is recovered from X_i and the previous predictor's m terms (X_i = P L + Σ p_j
m_j, P = beta_i / beta_{i-1} > 0), so a step is one kernel pass — out = X_{i+1}, side = m_i into a ring
of four buffers, the three previous m's as history — and needs no stored corrected state. In
lambda = log(alpha / beta), h = lambda' - lambda, with hh = -h (x0 form):

    UniP: X' = (beta' / beta) x - alpha' (e^hh - 1) m0 - alpha' B(h) Σ_k rho_k (m_k - m0) / r_k
    UniC: x^c = (beta / beta_prev) L - alpha (e^hh - 1) m_prev - alpha B(h) (Σ_k rho_k D_k + rho_t (m_i - m_prev))

with B(h) = hh (bh1) or e^hh - 1 (bh2), r_k = (lambda_k - lambda_s0) / h and the rho's solving UniPC's
small Vandermonde system (order 2's predictor and order 1's corrector use rho = 1/2), as diffusers does.
Orders warm up from 1; with ``lower_order_final`` the last steps use at most as many as remain. A step
whose h is infinite (from alpha = 0, or to beta = 0) is first order and is not corrected after.
"""

from __future__ import annotations

import math
from collections import defaultdict

from fastdiff import _checks
from fastdiff.sampling.methods.coefficients import Stage, _conv, _lambda
from fastdiff.sampling.methods.registry import register_method

SOLVER_TYPES = ("bh1", "bh2")


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the systems here are at most 3 x 3)."""
    n = len(rhs)
    a = [row[:] + [v] for row, v in zip(matrix, rhs)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p] = a[p], a[c]
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            for k in range(c, n + 1):
                a[r][k] -= f * a[c][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][k] * x[k] for k in range(r + 1, n))) / a[r][r]
    return x


def _rhos(rks: list[float], hh: float, order: int, b_h: float, corrector: bool) -> list[float]:
    """UniPC's rho coefficients: R rho = b with R[i] = rks^i, b[i] = i! phi_{i+1}(hh) / B(h)."""
    if order == 1 and not corrector:
        return []
    h_phi_k, factorial = math.expm1(hh) / hh - 1.0, 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    if corrector:
        return [0.5] if order == 1 else _solve(rows, b)
    return [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])


def _combine(*terms) -> dict:
    out = defaultdict(float)
    for weight, expr in terms:
        for key, value in expr.items():
            out[key] += weight * value
    return out


@register_method("unipc", options={"order": 2, "solver_type": "bh2", "lower_order_final": True}, evals_per_step=1,
                 conversions=("x0",),
                 inverts=True,
                 description="UniPC (bh1 / bh2, order <= 3): multistep predictor with a free corrector, on x0")
def _unipc(path, grid, prediction, order=2, solver_type="bh2", lower_order_final=True) -> list[Stage]:
    coefficients = [path.coefficients(t)[:2] for t in grid]
    for t, (_, be) in zip(grid[:-1], coefficients):
        if be == 0.0:  # a step from the data (inversion to t = 1): no noise level to step in
            raise ValueError(f"method='unipc' steps in the noise level sigma = beta / alpha, which is 0 at t={t:g}")
    conv = [_conv(path, t, prediction, "x0") for t in grid[:-1]]
    plan = unipc_plan([_lambda(a, b) for a, b in coefficients], [a for a, _ in coefficients],
                      [b for _, b in coefficients], conv, order, solver_type, lower_order_final)
    return [_stage(i, grid[i], out, conv[i]) for i, out in enumerate(plan)]


def unipc_plan(lam, alpha, beta, conv, order=2, solver_type="bh2", lower_order_final=True,
               no_corrector=frozenset()) -> list[dict]:
    """Per step i, X_{i+1} as {"X": c, "g": c, ("m", j): c} over the step's input X_i, its model output g
    and the stored x0 predictions m_j (j < i), given lambda, alpha, beta at the grid's times and the
    x0 conversion (a_i, b_i) of each step; no_corrector: steps i whose state is not corrected after them
    (diffusers' disable_corrector)."""
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3 for method='unipc', got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be 'bh1' or 'bh2' for method='unipc', got {solver_type!r}")
    lower_order_final = _checks.flag("lower_order_final", lower_order_final)
    n = len(lam) - 1

    def phis(i: int):  # hh = -h of step i -> i + 1, and B(h)
        hh = -(lam[i + 1] - lam[i])
        return hh, (hh if solver_type == "bh1" else math.expm1(hh))

    def finite(i: int) -> bool:
        return math.isfinite(lam[i + 1] - lam[i])

    plan, warm, prev_order = [], 0, 0
    recover = None  # the previous predictor: (P, {("m", j): coefficient}) with X_i = P L + m terms
    for i in range(n):
        a, b = conv[i]
        m_i = {"X": a, "g": b}

        def m(j):  # the x0 prediction of step j as an expression of this step's inputs
            return m_i if j == i else {("m", j): 1.0}

        # the corrector: x^c_i from L = x^c_{i-1} (recovered from X_i) with the previous step's order
        state = {"X": 1.0}
        if recover is not None and finite(i - 1) and i - 1 not in no_corrector:
            p_scale, p_terms = recover
            last = _combine((1.0 / p_scale, {"X": 1.0}), (-1.0 / p_scale, p_terms))
            hh, b_h = phis(i - 1)
            h = -hh
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, prev_order)] + [1.0]
            rho = _rhos(rks, hh, prev_order, b_h, corrector=True)
            al, k0 = alpha[i], -alpha[i] * math.expm1(hh)
            terms = [(beta[i] / beta[i - 1], last), (k0, m(i - 1))]
            for k, r in enumerate(rks[:-1]):  # D_k = (m_{i-1-k-1} - m_{i-1}) / r_k
                w = -al * b_h * rho[k] / r
                terms += [(w, m(i - 2 - k)), (-w, m(i - 1))]
            w = -al * b_h * rho[-1]
            terms += [(w, m(i)), (-w, m(i - 1))]
            state = _combine(*terms)
        # the predictor from x^c_i
        this = min(order, n - i) if lower_order_final else order
        back = next((k for k in range(i + 1) if not math.isfinite(lam[i - k])), i + 1)  # finite lambdas back from i
        this = min(this, warm + 1, back) if finite(i) and lam[i + 1] != lam[i] else 1  # a zero step: identity
        terms = [(beta[i + 1] / beta[i], state)]
        p_terms = []
        if finite(i):
            hh, b_h = phis(i)
            h = -hh
            k0 = -alpha[i + 1] * math.expm1(hh)
            p_terms.append((k0, m(i)))
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, this)] + [1.0]
            rho = _rhos(rks, hh, this, b_h, corrector=False)
            for k, r in enumerate(rks[:-1]):  # D1_k = (m_{i-k-1} - m_i) / r_k
                w = -alpha[i + 1] * b_h * rho[k] / r
                p_terms += [(w, m(i - 1 - k)), (-w, m(i))]
        else:  # from alpha = 0 (lambda = -inf) or to beta' = 0 (lambda' = inf): x' = beta'/beta x + alpha' m0
            p_terms.append((alpha[i + 1], m(i)))
        plan.append(_combine(*terms, *p_terms))
        # X_{i+1} = P x^c_i + (predictor's m terms), the m_i part kept as m_i (a stored buffer next step)
        recover = (beta[i + 1] / beta[i], _m_terms(p_terms, i)) if beta[i] > 0 and beta[i + 1] > 0 else None
        warm, prev_order = warm + 1, this
    return plan


def _m_terms(p_terms, i) -> dict:
    """The predictor's m terms with m_i as the stored buffer ("m", i) (it was an expression of X and g)."""
    out = defaultdict(float)
    for w, expr in p_terms:
        if "X" in expr or "g" in expr:
            out[("m", i)] += w
        else:
            for key, v in expr.items():
                out[key] += w * v
    return out


def _stage(i, t, out: dict, x0) -> Stage:
    """Step i's kernel call: out = c_x X + c_g g + Σ c_j m_j (m_j in side{j % 4}); side = m_i."""
    history = sorted(((key[1], c) for key, c in out.items() if isinstance(key, tuple) and c != 0.0), reverse=True)
    buffers = [(f"side{j % 4}", c) for j, c in history]
    extra, *more = buffers or [(None, 0.0)]
    return Stage(i, t, "x", "x", out.get("X", 0.0), out.get("g", 0.0), c_extra=extra[1], extra=extra[0],
                 history=tuple((name, c, 0.0) for name, c in more), side=f"side{i % 4}", s_x=x0[0], s_pred=x0[1],
                 x0=x0, final=True)
