"""Time grids for ``fastdiff.sample(timesteps=...)`` from sigma schedules on the VE path and shifted CondOT grids
(the first helpers; the named schedules of ``sample(schedule=...)`` are in fastdiff.schedules.grid).

fastdiff integrates in flow time t (0 noise, 1 data) over an increasing grid. k-diffusion and EDM
schedule noise levels sigma instead (decreasing, ending at 0), which on the VE path
(:class:`fastdiff.paths.VE`, beta_t = sigma_max (1 - t)) are the times t = 1 - sigma / sigma_max;
Stable Diffusion 3 / Flux-style flow models "shift" the flow-matching grid towards the noise end.

    sigmas = karras_sigmas(30, sigma_min=0.002, sigma_max=80.0)   # k-diffusion's get_sigmas_karras
    path, grid = ve_grid(sigmas)                                 # VE(sigma_max=80), t_i
    x = fastdiff.sample(model, None, path=path, timesteps=grid, prediction="x0", ...)

    grid = shifted_timesteps(28, shift=3.0)                      # CondOT grid of SD3's default shift
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fastdiff.paths import VE

__all__ = ["karras_sigmas", "exponential_sigmas", "ve_timesteps", "ve_grid", "shifted_timesteps", "shift_time"]


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max (finite), got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of steps) must be an int >= 1, got {n!r}")


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022) noise levels: n values from sigma_max down to sigma_min, evenly spaced in
    sigma^(1/rho), then 0 (n + 1 values, n steps), in float64 (k-diffusion's get_sigmas_karras)."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be finite and > 0, got {rho}")
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    ramp = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    return [(hi + r * (lo - hi)) ** rho for r in ramp] + [0.0]


def exponential_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> list[float]:
    """n noise levels evenly spaced in log sigma from sigma_max to sigma_min, then 0 (n + 1 values)."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    a, b = math.log(sigma_max), math.log(sigma_min)
    return [math.exp(a + (b - a) * (i / (n - 1) if n > 1 else 0.0)) for i in range(n)] + [0.0]


def _sigma_list(sigmas) -> list[float]:
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().double().cpu().tolist()
    out = [float(s) for s in sigmas]
    if len(out) < 2:
        raise ValueError(f"sigmas must hold at least 2 noise levels (steps + 1), got {len(out)}")
    if not all(math.isfinite(s) and s >= 0 for s in out):
        raise ValueError(f"sigmas must be finite and >= 0, got {out}")
    if any(b >= a for a, b in zip(out, out[1:])):
        raise ValueError("sigmas must be strictly decreasing (from the most noise to the least)")
    return out


def ve_timesteps(sigmas: Sequence[float] | torch.Tensor, sigma_max: float | None = None) -> list[float]:
    """The flow times t_i = 1 - sigma_i / sigma_max of a decreasing sigma schedule on VE(sigma_max)
    (sigma_max defaults to sigmas[0]); float64, increasing; 1 where sigma = 0."""
    s = _sigma_list(sigmas)
    top = s[0] if sigma_max is None else float(sigma_max)
    if not top >= s[0]:
        raise ValueError(f"sigma_max={sigma_max} is below the first noise level sigmas[0]={s[0]}")
    path = VE(top)
    return [path.time(v) for v in s]


def ve_grid(sigmas: Sequence[float] | torch.Tensor) -> tuple[VE, list[float]]:
    """(VE(sigmas[0]), ve_timesteps(sigmas)): the path and grid that sample a sigma schedule."""
    s = _sigma_list(sigmas)
    return VE(s[0]), ve_timesteps(s)


def shift_time(t: float, shift: float) -> float:
    """Flow time t under a timestep shift: the noise level s = 1 - t becomes shift s / (1 + (shift - 1) s)
    (Stable Diffusion 3; shift > 1 spends more steps at high noise)."""
    s = 1.0 - t
    return 1.0 - shift * s / (1.0 + (shift - 1.0) * s)


def shifted_timesteps(steps: int, shift: float = 3.0, t_min: float = 0.0) -> list[float]:
    """A uniform flow-time grid from t_min to 1 with each time shifted by :func:`shift_time`
    (steps + 1 increasing values; shift = 1 leaves it uniform)."""
    _check_steps(steps)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be finite and > 0, got {shift}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must lie in [0, 1), got {t_min}")
    return [shift_time(t_min + (1.0 - t_min) * i / steps, shift) for i in range(steps + 1)]
