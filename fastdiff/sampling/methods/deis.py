"""DEIS (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator"; ComfyUI's
``deis``, after zju-pi/diff-sampler): a multistep method on k-diffusion's derivative d = (x - D) / sigma
whose weights integrate the Lagrange interpolant of the last ``order`` d's exactly over the step:

    x' / alpha' = x / alpha + Σ_j C_j d_{i-j},    C_j = ∫ (d sigma / d tau) L_j(tau) dtau over [tau_i, tau_{i+1}]

``mode="tab"``: the interpolation variable tau is the time of the VP SDE that EDM's sigma schedule
corresponds to (beta chosen so that sigma(1e-3) = 0.002 and sigma(1) = 80, as ComfyUI fixes them); the
integral is taken by 64-point Gauss-Legendre (ComfyUI sums 10 000 points, within ~1e-4 of it).
``mode="rhoab"``: tau = sigma itself, Adams-Bashforth in sigma (the integrals in closed form).
``mode="logrho"``: tau = log sigma (diffusers' DEISMultistepScheduler, algorithm_type "deis", solver_type
"logrho"; d is its eps), the integrals in closed form: with u = log sigma, ∫ L_j(u) e^u du = e^u Σ_k (-1)^k
L_j^(k)(u). ``lower_order_final``: on grids of fewer than 15 steps the last step is first order and the one
before at most second (diffusers' DEIS rule; off by default, as ComfyUI's modes have none). The first
step is Euler's; the step to sigma' = 0 returns D; a step from sigma = inf is DDIM's and the history starts
after it (fastdiff.sampling.methods.sigma_space.sigma_multistep, the stage table all modes build on).
"""

from __future__ import annotations

import math

from fastdiff import _checks
from fastdiff.sampling.methods.coefficients import Stage
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import sigma_multistep

MODES = ("tab", "rhoab", "logrho")
LOWER_ORDER_FINAL_BELOW = 15  # diffusers' DEIS lowers its last orders only on grids shorter than this
EPS_S, SIGMA_MIN, SIGMA_MAX = 1e-3, 0.002, 80.0  # ComfyUI's fixed VP-SDE fit of EDM's sigma range


def _vp_fit():
    beta_d = 2 * (math.log(SIGMA_MIN ** 2 + 1) / EPS_S - math.log(SIGMA_MAX ** 2 + 1)) / (EPS_S - 1)
    beta_min = math.log(SIGMA_MAX ** 2 + 1) - 0.5 * beta_d
    return beta_min, beta_d


def _tau(sigma: float) -> float:
    """The VP-SDE time of noise level sigma (the inverse of sigma(tau) = sqrt(1 / alpha_bar(tau) - 1))."""
    beta_min, beta_d = _vp_fit()
    return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(sigma ** 2 + 1)) - beta_min) / beta_d


def _dsigma_dtau(tau: float) -> float:
    beta_min, beta_d = _vp_fit()
    log_a = -0.5 * tau * tau * beta_d - tau * beta_min  # log alpha_bar(tau)
    a = math.exp(log_a)
    return -0.5 * (-tau * beta_d - beta_min) / math.sqrt(a * (1.0 - a))


def _gauss_legendre(n: int = 64) -> list[tuple[float, float]]:
    """Nodes and weights on [-1, 1] (Newton on the Legendre polynomial; exact to float64)."""
    out = []
    for k in range(1, n + 1):
        x = math.cos(math.pi * (k - 0.25) / (n + 0.5))
        for _ in range(100):
            p0, p1 = 1.0, x
            for j in range(2, n + 1):
                p0, p1 = p1, ((2 * j - 1) * x * p1 - (j - 1) * p0) / j
            dp = n * (x * p1 - p0) / (x * x - 1.0)
            dx = p1 / dp
            x -= dx
            if abs(dx) < 1e-16:
                break
        out.append((x, 2.0 / ((1.0 - x * x) * dp * dp)))
    return out


_GL = _gauss_legendre()


def _lagrange(nodes: list[float], j: int, tau: float) -> float:
    out = 1.0
    for k, node in enumerate(nodes):
        if k != j:
            out *= (tau - node) / (nodes[j] - node)
    return out


def _poly_lagrange(nodes: list[float], j: int) -> list[float]:
    """The coefficients (constant term first) of the Lagrange basis polynomial of node j."""
    poly = [1.0]
    for k, node in enumerate(nodes):
        if k != j:  # poly *= (u - node) / (nodes[j] - node)
            scale = 1.0 / (nodes[j] - node)
            poly = [scale * (lo - node * hi) for lo, hi in zip([0.0] + poly, poly + [0.0])]
    return poly


def _logrho_weights(sigmas: list[float], i: int, order: int) -> list[float]:
    """∫ L_j(log sigma) d sigma over [sigma_i, sigma_{i+1}] in closed form. In v = log sigma - log sigma_i
    (small values: the polynomials stay well conditioned) the integral is sigma_i [e^v Q_j(v)] from 0 to
    h = log(sigma_{i+1} / sigma_i), with Q_j = L_j - L_j' + L_j'' - ... (the antiderivative of e^v L_j)."""
    base = math.log(sigmas[i])
    nodes = [math.log(sigmas[i - k]) - base for k in range(order)]
    h = math.log(sigmas[i + 1]) - base
    out = []
    for j in range(order):
        q, term = [0.0] * order, _poly_lagrange(nodes, j)
        for sign in range(order):  # Q = Σ_k (-1)^k P^(k)
            q = [a + (-1) ** sign * b for a, b in zip(q, term + [0.0] * (order - len(term)))]
            term = [n * c for n, c in enumerate(term)][1:]
        at = lambda v: sum(c * v ** n for n, c in enumerate(q))  # noqa: E731
        out.append(sigmas[i] * (math.exp(h) * at(h) - at(0.0)))
    return out


def deis_weights(sigmas: list[float], i: int, order: int, mode: str) -> list[float]:
    """C_j (j = 0 .. order - 1: this step's d, then earlier ones) of the step sigma_i -> sigma_{i+1}."""
    if mode == "logrho":
        return _logrho_weights(sigmas, i, order)
    if mode == "rhoab":
        nodes, a, b = [sigmas[i - k] for k in range(order)], sigmas[i], sigmas[i + 1]
        weight = lambda tau: 1.0  # noqa: E731 - d sigma / d sigma
    else:
        nodes, a, b = [_tau(sigmas[i - k]) for k in range(order)], _tau(sigmas[i]), _tau(sigmas[i + 1])
        weight = _dsigma_dtau
    half, mid = 0.5 * (b - a), 0.5 * (a + b)
    return [sum(w * weight(mid + half * x) * _lagrange(nodes, j, mid + half * x) for x, w in _GL) * half
            for j in range(order)]


@register_method("deis", options={"order": 3, "mode": "tab", "lower_order_final": False}, evals_per_step=1,
                 conversions=("x0",), inverts=True,
                 description="DEIS: multistep with exactly integrated Lagrange weights (tab: in VP time; rhoab: in "
                             "sigma; logrho: in log sigma, diffusers' DEISMultistepScheduler)")
def _deis(path, grid, prediction, order=3, mode="tab", lower_order_final=False) -> list[Stage]:
    if mode not in MODES:
        raise ValueError(f"mode must be 'tab', 'rhoab' or 'logrho' for method='deis', got {mode!r}")
    lower = _checks.flag("lower_order_final", lower_order_final) and len(grid) - 1 < LOWER_ORDER_FINAL_BELOW

    def weights(sigmas, i, k):
        if k == 1:
            return [sigmas[i + 1] - sigmas[i]]
        used = min(k, len(sigmas) - 1 - i) if lower else k  # the last steps: at most the steps left
        if used == 1:
            return [sigmas[i + 1] - sigmas[i]] + [0.0] * (k - 1)
        # sigma_multistep reads k buffers: zero weights drop the older ones
        return deis_weights(sigmas, i, used, mode) + [0.0] * (k - used)

    return sigma_multistep("deis", path, grid, prediction, order, weights)
