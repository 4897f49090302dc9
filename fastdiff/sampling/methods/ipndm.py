"""iPNDM (Zhang & Chen 2023, DEIS paper's improved PNDM; ComfyUI's ``ipndm`` / ``ipndm_v``): linear
multistep (Adams-Bashforth) on k-diffusion's derivative d = (x - D) / sigma in sigma, order <= 4.

In k-diffusion's coordinates (fastdiff.sampling.methods.sigma_space: scaled state x / alpha, sigma = beta / alpha)
a step is x' / alpha' = x / alpha + (sigma' - sigma) Σ_k w_k d_{i-k}: ``ipndm`` with the fixed
Adams-Bashforth weights of a uniform step (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24),
``ipndm_v`` with the weights of the actual, variable steps in sigma. The order warms up from 1; the step
to sigma' = 0 returns alpha' D; a step from sigma = inf (alpha = 0) is DDIM's, and the history restarts
after it. d_i = (x / alpha - D) / sigma is this stage's side output, kept in a ring
of four buffers; the previous ones are history.
"""

from __future__ import annotations

from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import sigma_multistep
from fastdiff.sampling.core.stage import Stage

FIXED = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _variable(order: int, h: list[float]) -> list[float]:
    """Adams-Bashforth weights over variable steps: h[0] = this step (sigma' - sigma), h[k] = the step k
    before it (ComfyUI's ipndm_v, after zju-pi/diff-sampler)."""
    if order == 1:
        return [1.0]
    h0, h1 = h[0], h[1]
    if order == 2:
        return [(2 + h0 / h1) / 2, -(h0 / h1) / 2]
    h2 = h[2]
    t1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [(2 + h0 / h1) / 2 + t1, -(h0 / h1) / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = (((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2)))
          * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [(2 + h0 / h1) / 2 + t1 + t2,
            -(h0 / h1) / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
            -t2 * q * h1 / h2]


def _ipndm(method, path, grid, prediction, order, variable) -> list[Stage]:
    def weights(sigmas, i, k):
        h = sigmas[i + 1] - sigmas[i]
        steps = [sigmas[i + 1 - j] - sigmas[i - j] for j in range(k)]  # this step and the k - 1 before it
        return [h * w for w in (_variable(k, steps) if variable else FIXED[k])]

    return sigma_multistep(method, path, grid, prediction, order, weights)


@register_method("ipndm", options={"order": 4}, evals_per_step=1, conversions=("x0",),
                 inverts=True,
                 description="iPNDM: Adams-Bashforth of order <= 4 in sigma with fixed weights (ComfyUI's ipndm)")
def _ipndm_fixed(path, grid, prediction, order=4) -> list[Stage]:
    return _ipndm("ipndm", path, grid, prediction, order, variable=False)


@register_method("ipndm_v", options={"order": 4}, evals_per_step=1, conversions=("x0",),
                 description="iPNDM with variable-step Adams-Bashforth weights in sigma (ComfyUI's ipndm_v)")
def _ipndm_variable(path, grid, prediction, order=4) -> list[Stage]:
    return _ipndm("ipndm_v", path, grid, prediction, order, variable=True)
