"""DEIS (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator"; ComfyUI's
``deis``, after zju-pi/diff-sampler): a multistep method on k-diffusion's derivative d = (x - D) / sigma
whose weights integrate the Lagrange interpolant of the last ``order`` d's exactly over the step:

    x' / alpha' = x / alpha + Σ_j C_j d_{i-j},    C_j = ∫ (d sigma / d tau) L_j(tau) dtau over [tau_i, tau_{i+1}]

``mode="tab"``: the interpolation variable tau is the time of the VP SDE that EDM's sigma schedule
corresponds to (beta chosen so that sigma(1e-3) = 0.002 and sigma(1) = 80, as ComfyUI fixes them); the
integral is taken by 64-point Gauss-Legendre (ComfyUI sums 10 000 points, within ~1e-4 of it).
``mode="rhoab"``: tau = sigma itself, Adams-Bashforth in sigma (the integrals in closed form). The first
step is Euler's; the step to sigma' = 0 returns D; a step from sigma = inf is DDIM's and the history starts
after it (fastdiff.sampling.methods.sigma_space.sigma_multistep, the stage table both build on).
"""

from __future__ import annotations

import math

from fastdiff.sampling.methods.coefficients import Stage
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import sigma_multistep

MODES = ("tab", "rhoab")
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


def deis_weights(sigmas: list[float], i: int, order: int, mode: str) -> list[float]:
    """C_j (j = 0 .. order - 1: this step's d, then earlier ones) of the step sigma_i -> sigma_{i+1}."""
    if mode == "rhoab":
        nodes, a, b = [sigmas[i - k] for k in range(order)], sigmas[i], sigmas[i + 1]
        weight = lambda tau: 1.0  # noqa: E731 - d sigma / d sigma
    else:
        nodes, a, b = [_tau(sigmas[i - k]) for k in range(order)], _tau(sigmas[i]), _tau(sigmas[i + 1])
        weight = _dsigma_dtau
    half, mid = 0.5 * (b - a), 0.5 * (a + b)
    return [sum(w * weight(mid + half * x) * _lagrange(nodes, j, mid + half * x) for x, w in _GL) * half
            for j in range(order)]


@register_method("deis", options={"order": 3, "mode": "tab"}, evals_per_step=1, conversions=("x0",),
                 inverts=True,
                 description="DEIS: multistep with exactly integrated Lagrange weights (tab: in VP time; rhoab: in sigma)")
def _deis(path, grid, prediction, order=3, mode="tab") -> list[Stage]:
    if mode not in MODES:
        raise ValueError(f"mode must be 'tab' or 'rhoab' for method='deis', got {mode!r}")
    return sigma_multistep("deis", path, grid, prediction, order,
                           lambda sigmas, i, k: [sigmas[i + 1] - sigmas[i]] if k == 1 else deis_weights(sigmas, i, k, mode))
