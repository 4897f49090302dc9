"""Score-matching objectives of the seed lectures (docs/score_based.md), for the Trainer.

- :func:`ncsn_objective`: NCSN's multi-level denoising score matching (Song & Ermon 2019): geometric noise
  levels σ_1 > … > σ_L on the VE path, λ(σ) = σ², i.e. E_i ‖σ_i s(z + σ_i ε, σ_i) + ε‖² — the fused loss of
  :class:`DiffusionObjective` with time_sampling="levels" and weighting="ncsn".
- :class:`ScoreMatchingObjective`: score matching without a ground-truth score. Hyvärinen's implicit score
  matching, E[½ ‖s(x)‖² + tr ∂s/∂x] (the trace by d backward passes: small d), or sliced score matching
  (Song et al. 2019), E_v[vᵀ (∂s/∂x) v + ½ (vᵀ s)²], with the variance-reduced form ½ ‖s‖² for the second
  term (E[v vᵀ] = I). Both equal E ½ ‖s − ∇ log p‖² up to a constant. Projections v are Rademacher or
  Gaussian, the normals of stream STREAM_PROJECTION of each training sample's seed (projection k: elements
  k d … (k + 1) d − 1), so a step is reproducible from (seed, step) like the diffusion loss's.

Losses are per sample divided by the sample's size d (like the diffusion loss's mean over elements).
"""

from __future__ import annotations

import math
import numbers

import torch

from fastdiff import _checks
from fastdiff.ops.randn import randn
from fastdiff.paths import VE
from fastdiff.training.objective import STREAM_EPS, DiffusionObjective

STREAM_PROJECTION = 3  # sliced score matching's projections (docs/training.md)
KINDS = ("sliced", "implicit")


def ncsn_sigmas(sigma_min: float = 0.01, sigma_max: float = 1.0, num_levels: int = 10) -> list[float]:
    """NCSN's noise levels: ``num_levels`` values from sigma_max down to sigma_min, evenly spaced in log σ."""
    if not (isinstance(num_levels, numbers.Integral) and num_levels >= 2):
        raise ValueError(f"num_levels must be an int >= 2, got {num_levels!r}")
    sigma_min, sigma_max = _checks.real("sigma_min", sigma_min), _checks.real("sigma_max", sigma_max)  # not '0.1'
    if not 0.0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    a, b = math.log(sigma_max), math.log(sigma_min)
    return [math.exp(a + (b - a) * i / (num_levels - 1)) for i in range(num_levels)]


def ncsn_objective(sigma_min: float = 0.01, sigma_max: float = 1.0, num_levels: int = 10,
                   prediction: str = "score", **kwargs) -> DiffusionObjective:
    """NCSN's training objective (defaults: NCSNv1's σ 1 → 0.01 over 10 levels): the model is trained at the flow
    times t_i = 1 − σ_i / sigma_max' of the VE path with sigma_max' slightly above σ_1 (so that t_1 > 0), with
    λ(σ) = σ². Sample with method="annealed_langevin" on the same path and levels (ncsn_grid)."""
    path, times = ncsn_grid(sigma_min, sigma_max, num_levels)
    return DiffusionObjective(path, prediction, time_sampling="levels", levels=times[:-1], weighting="ncsn", **kwargs)


def ncsn_grid(sigma_min: float = 0.01, sigma_max: float = 1.0, num_levels: int = 10) -> tuple[VE, list[float]]:
    """(path, timesteps) of NCSN's levels: VE(σ_max · (1 + 1e-6)) and the levels' flow times, then t = 1 (the
    grid of fastdiff.sample(method="annealed_langevin"): its levels are the grid's first num_levels times)."""
    sigmas = ncsn_sigmas(sigma_min, sigma_max, num_levels)
    path = VE(sigmas[0] * (1 + 1e-6))
    return path, [float(path.time(s)) for s in sigmas] + [1.0]


def _projections(seeds: torch.Tensor, k: int, d: int, kind: str, device) -> torch.Tensor:
    v = randn(seeds, STREAM_PROJECTION, (k * d,), device=device).view(-1, k, d)
    return torch.where(v >= 0, 1.0, -1.0) if kind == "rademacher" else v


class ScoreMatchingObjective:
    """Trains ``model(x, t, y)`` as the score of the data (at the fixed flow time ``t``, 1 by default) without a
    ground-truth score: ``kind`` "sliced" (``projections`` per sample, ``projection_kind`` "rademacher" or
    "gaussian", ``variance_reduced``) or "implicit" (exact trace). ``noise_std`` > 0 perturbs the data first
    (x + noise_std ε, ε from the training noise stream), which keeps the score finite for data on a manifold."""

    def __init__(self, kind: str = "sliced", *, projections: int = 1, projection_kind: str = "rademacher",
                 variance_reduced: bool = True, t: float = 1.0, noise_std: float = 0.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(projections, numbers.Integral) or isinstance(projections, bool) or projections < 1:
            raise ValueError(f"projections must be an int >= 1, got {projections!r}")
        if projection_kind not in ("rademacher", "gaussian"):
            raise ValueError(f"projection_kind must be 'rademacher' or 'gaussian', got {projection_kind!r}")
        t = _checks.real("t", t, lo=0.0, hi=1.0)  # a flow time
        noise_std = _checks.real("noise_std", noise_std, lo=0.0)
        self.kind, self.projections, self.projection_kind = kind, int(projections), projection_kind
        self.variance_reduced = _checks.flag("variance_reduced", variance_reduced)
        self.t, self.noise_std = t, noise_std

    def config(self) -> dict:
        return {"objective": "score_matching", "kind": self.kind, "projections": self.projections,
                "projection_kind": self.projection_kind, "variance_reduced": self.variance_reduced, "t": self.t,
                "noise_std": self.noise_std}

    def __repr__(self) -> str:
        return "ScoreMatchingObjective(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    def __call__(self, model, z: torch.Tensor, y, seeds: torch.Tensor, *, reduction: str = "mean",
                 autocast_dtype=None) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() < 1 or not z.is_floating_point():
            raise TypeError("z must be a floating-point tensor [B, ...] (the data batch)")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        seeds = _checks.seeds_tensor(seeds, z.device)
        B, d = z.shape[0], math.prod(z.shape[1:])
        x = z.detach().to(torch.float32)
        if self.noise_std > 0:
            x = x + self.noise_std * randn(seeds, STREAM_EPS, tuple(z.shape[1:]), device=z.device)
        x = x.requires_grad_(True)
        t = torch.full((B,), self.t, dtype=torch.float32, device=z.device)
        with torch.autocast(z.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            s = model(x, t, y)
        if s.shape != z.shape:
            raise ValueError(f"the model returned shape {tuple(s.shape)} for inputs of shape {tuple(z.shape)}")
        if not s.requires_grad:  # else autograd's own error, naming neither the model nor the cause
            raise ValueError("the model's output has no gradient path to x (computed under torch.no_grad, "
                             "detached, or constant in x): score matching differentiates the model in x")
        s = s.float().reshape(B, d)
        if self.kind == "implicit":  # tr ∂s/∂x: one backward pass per coordinate, kept in the graph
            trace = sum(torch.autograd.grad(s[:, i].sum(), x, create_graph=True)[0].reshape(B, d)[:, i]
                        for i in range(d))
            loss = 0.5 * s.square().sum(1) + trace
        else:
            v = _projections(seeds, self.projections, d, self.projection_kind, z.device)  # [B, K, d]
            loss = torch.zeros(B, device=z.device)
            for k in range(self.projections):
                sv = (s * v[:, k]).sum(1)
                (g,) = torch.autograd.grad(sv.sum(), x, create_graph=True)  # ∇_x (vᵀ s) = Jᵀ v
                loss = loss + (g.reshape(B, d) * v[:, k]).sum(1) + \
                    (0.5 * s.square().sum(1) if self.variance_reduced else 0.5 * sv.square())
            loss = loss / self.projections
        loss = loss / d
        return loss.mean() if reduction == "mean" else loss
