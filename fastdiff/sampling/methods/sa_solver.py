"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models", NeurIPS,
arXiv 2309.05019): ComfyUI's sample_sa_solver / sample_sa_solver_pece (comfy/k_diffusion/sampling.py, coefficients
from comfy/k_diffusion/sa_solver.py, options of comfy_extras/nodes_custom_sampler.py SamplerSASolver) and diffusers'
SASolverScheduler (data_prediction).

In lambda = log(alpha / beta) with x0 predictions D_j (at lambda_j) and the noise fraction tau of a step, one stochastic
Adams step from lambda_s to lambda_t (h = lambda_t - lambda_s, c = 1 + tau^2) over the nodes lambda_j is

    x_t = (beta_t / beta_s) e^{-tau^2 h} x_s + alpha_t Σ_j w_j D_j + beta_t sqrt(1 - e^{-2 tau^2 h}) s_noise xi
    w_j = c ∫_{lambda_s}^{lambda_t} e^{c (l - lambda_t)} L_j(l) dl       (L_j: Lagrange basis over the nodes)

taken in closed form: with u = l - lambda_t the monomial moments ∫_{-h}^0 u^p e^{c u} du = (-1)^p p! / c^{p+1}
P(p + 1, c h) (P the regularized lower incomplete gamma function, a series for small c h), against the Lagrange
polynomials' coefficients in u. The predictor of step i (t_i -> t_{i+1}) takes the nodes lambda_i, lambda_{i-1}, ...
(up to ``predictor_order``); the corrector of x_i re-takes step i - 1 with the nodes lambda_i, lambda_{i-1}, ... (up to
``corrector_order``, D_i included), the same tau and the same noise draw as that predictor. ``simple_order_2``
replaces the order-2 weights by the paper's Appendix D forms: predictor w_old = c h^2 / (2 (lambda_{i-1} -
lambda_i)), w_new = 1 - e^{-c h} - w_old; corrector w_new = c h / 2, w_old = 1 - e^{-c h} - w_new (diffusers'
SASolverScheduler always uses them at order 2). These are ComfyUI's formulas on any path: its sigma ratio and
alpha_t = sigma_t e^{lambda_t} are beta_t / beta_s and alpha_t of the path, on EPS (VE) and CONST (CondOT) models.

One evaluation per step. The corrected state x_i^c = (the predictor of step i - 1 with the corrector's weights) and
the predicted x_i^p (with the predictor's) share the decay and the noise, so x_i^c = x_i^p + alpha_i (Σ w^C_j D_{i-j}
- Σ w^P_j D_{i-1-j}): linear in the state the model saw (x_i^p), its D_i and the stored D's. Step i's stage evaluates
the model at x_i^p and writes x_{i+1}^p = e_i (x_i^p + correction) + alpha_{i+1} Σ w^P D + noise, and D_i into a ring
of four side buffers (the kernel's four history terms suffice for orders up to 4; ComfyUI's node allows 6: refused).
As in ComfyUI and diffusers, the last state is the predictor's (uncorrected); the step to beta' = 0 returns alpha' D.
``sa_solver_pece`` (ComfyUI's use_pece) evaluates the model again at the corrected x_i^c, and that D replaces D_i in the
predictor and the history: two stages per step (one on the first step, which has no correction).

tau: ``eta`` on the steps whose end lies in the interval [sde_start_percent, sde_end_percent] of flow time (ComfyUI
evaluates tau_func at sigmas[i + 1], an interval of percent_to_sigma on the model's own schedule; here the percent is
fastdiff's flow time t: ComfyUI's percent on CondOT (shift 1), within one training timestep of it on the DiscreteVP
path; on the VE path t = 1 - sigma / sigma_max, a different interval from an EPS model's), 0 elsewhere. (diffusers
evaluates its tau_func at the step's start timestep: FastDiffScheduler sets the interval on those steps' ends.)
Orders warm up from 1; ``lower_order_final``: True = ComfyUI's lower_order_to_end (where the grid ends at beta = 0:
predictor order <= n - 1 - i, corrector of x_i <= n - i), "diffusers" = SASolverScheduler's lower_order_final
(predictor <= n - i, corrector <= n - i + 2), False = none (n steps, i from 0).

From alpha = 0 (lambda = -inf, t = 0 on CondOT, which ComfyUI avoids by offsetting the first sigma to 1 - 1e-4) the
step takes its first-order limit (x' = alpha' D + beta' s_noise xi with tau > 0, alpha' D + (beta' / beta) x at
tau = 0), the corrector of the next state its order-1 limit, and the Lagrange nodes start after it.
"""

from __future__ import annotations

import math

from fastdiff.sampling.methods.coefficients import Stage, _conv, _lambda, check_s_noise, draw_stream
from fastdiff.sampling.methods.registry import register_method

MAX_ORDER = 4  # the fused kernel's history terms (fastdiff.ops.sampler_step: H <= 4)
RING = 4  # side buffers holding the x0 predictions D_i (side{i % 4}); a stage may read the buffer it writes
DEFAULTS = {"eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8, "s_noise": 1.0, "predictor_order": 3,
           "corrector_order": 4, "simple_order_2": False, "lower_order_final": True}


def _gamma_p(k: int, z: float) -> float:
    """The regularized lower incomplete gamma function P(k, z) for an integer k >= 1 and z >= 0 (inf allowed)."""
    if z == 0.0:
        return 0.0
    if math.isinf(z):
        return 1.0
    if z < k + 1.0:  # series e^{-z} Σ_{m >= k} z^m / m!: no cancellation for small z
        term = math.exp(k * math.log(z) - math.lgamma(k + 1) - z)
        total, m = 0.0, k
        while term > 1e-18 * total or total == 0.0:
            total += term
            m += 1
            term *= z / m
            if term == 0.0:
                break
        return total
    return 1.0 - math.exp(-z) * sum(z ** m / math.factorial(m) for m in range(k))  # P >= 1/2 here


def _poly_mul(p: list[float], root: float) -> list[float]:
    """Coefficients (increasing powers) of p(u) (u - root)."""
    out = [0.0] * (len(p) + 1)
    for k, c in enumerate(p):
        out[k + 1] += c
        out[k] -= root * c
    return out


def adams_weights(nodes, lam_s: float, lam_t: float, tau: float) -> list[float]:
    """w_j = c ∫_{lam_s}^{lam_t} e^{c (l - lam_t)} L_j(l) dl (c = 1 + tau^2) for the Lagrange basis over ``nodes``
    (finite, distinct); lam_s may be -inf (then only one node)."""
    c = 1.0 + tau * tau
    h = lam_t - lam_s
    n = len(nodes)
    # moments ∫_{-h}^0 u^p e^{c u} du, u = l - lam_t
    moments = [(-1.0) ** p * math.factorial(p) / c ** (p + 1) * _gamma_p(p + 1, c * h) for p in range(n)]
    if n == 1:
        return [c * moments[0]]
    us = [lam - lam_t for lam in nodes]
    weights = []
    for j, uj in enumerate(us):
        poly, denom = [1.0], 1.0
        for k, uk in enumerate(us):
            if k != j:
                poly = _poly_mul(poly, uk)
                denom *= uj - uk
        weights.append(c * sum(pk * mk for pk, mk in zip(poly, moments)) / denom)
    return weights


def simple_weights(lam_new: float, lam_old: float, lam_s: float, lam_t: float, tau: float,
                   corrector: bool) -> list[float]:
    """The paper's order-2 weights (Appendix D; ComfyUI's simple_order_2) on (D_new, D_old)."""
    c, h = 1.0 + tau * tau, lam_t - lam_s
    whole = -math.expm1(-c * h)
    if corrector:
        w_new = 0.5 * c * h
        return [w_new, whole - w_new]
    w_old = 0.5 * c * h * h / (lam_old - lam_new)
    return [whole - w_old, w_old]


def _check(method, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order, corrector_order,
           simple_order_2, lower_order_final):
    def number(name, value, lo, hi):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"{name} must be a number in [{lo}, {hi}] for method={method!r}, got {value!r}")
        return float(value)

    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 for method={method!r}, got {eta!r}")
    start = number("sde_start_percent", sde_start_percent, 0.0, 1.0)
    end = number("sde_end_percent", sde_end_percent, 0.0, 1.0)  # (end < start: no noise, as ComfyUI's interval)
    for name, value, lo in (("predictor_order", predictor_order, 1), ("corrector_order", corrector_order, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= MAX_ORDER:
            raise ValueError(f"{name} must be an int in [{lo}, {MAX_ORDER}] for method={method!r} (the fused kernel "
                             f"reads at most {MAX_ORDER} earlier x0 predictions), got {value!r}")
    if not isinstance(simple_order_2, bool):
        raise ValueError(f"simple_order_2 must be True or False for method={method!r}, got {simple_order_2!r}")
    if not (isinstance(lower_order_final, bool) or lower_order_final == "diffusers"):
        raise ValueError(f"lower_order_final must be True (ComfyUI's), 'diffusers' or False for method={method!r}, "
                         f"got {lower_order_final!r}")
    try:
        s_noise = check_s_noise(s_noise)
    except ValueError as exc:
        raise ValueError(f"{exc} (method={method!r})") from None
    return float(eta), start, end, s_noise


def _build(method, path, grid, prediction, pece, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order,
           corrector_order, simple_order_2, lower_order_final) -> list[Stage]:
    eta, lo, hi, s_noise = _check(method, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order,
                                  corrector_order, simple_order_2, lower_order_final)
    n = len(grid) - 1
    ab = [path.coefficients(t)[:2] for t in grid]
    lam = [_lambda(al, be) for al, be in ab]
    start = 1 if n > 0 and math.isinf(lam[0]) else 0  # the first Lagrange node (after a step from alpha = 0)
    tau = [eta if eta > 0 and lo <= grid[i + 1] <= hi else 0.0 for i in range(n)]
    comfy_end = lower_order_final is True and ab[-1][1] == 0.0

    def weights(nodes_at, lam_s, lam_t, tau_s, corrector):
        nodes = [lam[k] for k in nodes_at]
        if len(nodes) == 2 and simple_order_2:
            return simple_weights(nodes[0], nodes[1], lam_s, lam_t, tau_s, corrector)
        return adams_weights(nodes, lam_s, lam_t, tau_s)

    def available(i):  # x0 predictions usable as nodes at step i (D_i included)
        return max(1, i + 1 - start)

    def predictor(i):  # (weights on D_i, D_{i-1}, ...) without alpha_{i+1}, decay, noise coefficient
        order = min(predictor_order, available(i))
        if comfy_end:
            order = min(order, n - 1 - i)
        elif lower_order_final == "diffusers":
            order = min(order, n - i)
        order = max(1, order)
        h, t2 = lam[i + 1] - lam[i], tau[i] * tau[i]
        w = weights(range(i, i - order, -1), lam[i], lam[i + 1], tau[i], False)
        decay = ab[i + 1][1] / ab[i][1] * (math.exp(-t2 * h) if t2 > 0 else 1.0)
        noise = ab[i + 1][1] * math.sqrt(-math.expm1(-2.0 * t2 * h)) * s_noise if t2 > 0 and s_noise > 0 else 0.0
        return w, decay, noise

    def correction(i):  # weights on D_i, D_{i-1}, ... of x_i^c - x_i^p ([] where x_i is not corrected)
        order = min(corrector_order, available(i))
        if comfy_end:
            order = min(order, n - i)
        elif lower_order_final == "diffusers":
            order = min(order, n - i + 2)
        if i == 0 or order <= 0 or (ab[i + 1][1] == 0.0 and not pece):
            return []
        al = ab[i][0]
        wc = weights(range(i, i - order, -1), lam[i - 1], lam[i], tau[i - 1], True)
        wp = predictor(i - 1)[0]
        delta = [0.0] * max(len(wc), len(wp) + 1)
        for j, w in enumerate(wc):
            delta[j] += al * w
        for j, w in enumerate(wp):
            delta[j + 1] -= al * w
        return delta

    def history(i, coefs):  # the terms on D_{i-1}, D_{i-2}, ... as the kernel's history
        terms = [(f"side{(i - j) % RING}", c) for j, c in enumerate(coefs) if j > 0 and c != 0.0]
        extra, *more = terms or [(None, 0.0)]
        return dict(c_extra=extra[1], extra=extra[0], history=tuple((b, c, 0.0) for b, c in more))

    stages = []
    for i in range(n):
        t = grid[i]
        a, b = _conv(path, t, prediction, "x0")
        delta = correction(i)
        src = "x"
        if pece and delta:  # correct, then evaluate the model again at x_i^c (buffer "stage")
            stages.append(Stage(i, t, "x", "stage", 1.0 + delta[0] * a, delta[0] * b, x0=(a, b), **history(i, delta)))
            src, delta = "stage", []
        al1, be1 = ab[i + 1]
        if be1 == 0.0:  # the denoising step: alpha' D
            stages.append(Stage(i, t, src, "x", al1 * a, al1 * b, x0=(a, b), final=True))
            continue
        wp, decay, noise = predictor(i)
        coefs = [decay * d for d in delta] + [0.0] * (len(wp) - len(delta))
        for j, w in enumerate(wp):
            coefs[j] += al1 * w
        stages.append(Stage(i, t, src, "x", decay + coefs[0] * a, coefs[0] * b, c_noise=noise, stream=draw_stream(i),
                            side=f"side{i % RING}", s_x=a, s_pred=b, x0=(a, b), final=True, **history(i, coefs)))
    return stages


@register_method("sa_solver", options=dict(DEFAULTS), evals_per_step=1, conversions=("x0",),
                 description="SA-Solver: stochastic Adams predictor (order <= 4) and corrector (order <= 4) on x0 "
                             "with eta noise on an interval of t (ComfyUI's sa_solver)")
def _sa_solver(path, grid, prediction, eta=1.0, sde_start_percent=0.2, sde_end_percent=0.8, s_noise=1.0,
               predictor_order=3, corrector_order=4, simple_order_2=False, lower_order_final=True) -> list[Stage]:
    return _build("sa_solver", path, grid, prediction, False, eta, sde_start_percent, sde_end_percent, s_noise,
                  predictor_order, corrector_order, simple_order_2, lower_order_final)


@register_method("sa_solver_pece", options=dict(DEFAULTS), evals_per_step=2, conversions=("x0",),
                 description="SA-Solver in PECE mode: the model evaluated again at the corrected state "
                             "(ComfyUI's sa_solver_pece)")
def _sa_solver_pece(path, grid, prediction, eta=1.0, sde_start_percent=0.2, sde_end_percent=0.8, s_noise=1.0,
                    predictor_order=3, corrector_order=4, simple_order_2=False, lower_order_final=True) -> list[Stage]:
    return _build("sa_solver_pece", path, grid, prediction, True, eta, sde_start_percent, sde_end_percent, s_noise,
                  predictor_order, corrector_order, simple_order_2, lower_order_final)
