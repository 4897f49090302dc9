"""A path's noise coordinate, its levels at the training timesteps, and the map from a level back to flow time.

A schedule is computed in its peer's own noise coordinate and mapped to flow time on the call's path:

* ``"sigma"``: k-diffusion's / ComfyUI's model sigma = beta / alpha (EPS / V models: VP, VP-cosine, VE,
  DiscreteVP and user paths);
* ``"flow"``: the noise fraction beta of CondOT (alpha + beta = 1): ComfyUI's CONST sigma, diffusers' FlowMatch
  sigmas.

The training levels (ComfyUI's ``model_sampling.sigmas``): the level of training timestep k = 0 .. N - 1 sits at
flow time t_k = 1 - (k + 1) / N on every path (DiscreteVP's own map, so on the path of diffusers' alphas_cumprod
the table is sqrt((1 - alpha_bar_k) / alpha_bar_k) exactly; on CondOT it is (k + 1) / N, ComfyUI's
ModelSamplingDiscreteFlow). A fractional timestep follows ComfyUI: log sigma interpolated linearly between
the integers on the "sigma" coordinate (ModelSamplingDiscrete.sigma), sigma = tau / N on the flow one
(comfy/model_sampling.py).
"""

from __future__ import annotations

import bisect
import math
from typing import Optional, Sequence

from fastdiff.gaussian_paths import VE, VP, CondOT, DiscreteVP, GaussianPath, VPCosine


def coordinate(path: GaussianPath) -> str:
    """"flow" on CondOT (its noise fraction beta), "sigma" (beta / alpha) on every other path."""
    return "flow" if isinstance(path, CondOT) else "sigma"


def level(path: GaussianPath, t: float, coord: Optional[str] = None) -> float:
    """The noise level of flow time t in the path's coordinate (inf where alpha = 0 in "sigma")."""
    al, be = path.coefficients(float(t))[:2]
    if (coord or coordinate(path)) == "flow":
        return be
    return math.inf if al == 0.0 else be / al


def time_of(path: GaussianPath, sigma: float, coord: Optional[str] = None) -> float:
    """The flow time whose level is ``sigma`` (closed form on the built-in paths, else bisection in float64).
    ValueError when sigma lies above the path's level at t = 0."""
    coord = coord or coordinate(path)
    s = float(sigma)
    top = level(path, 0.0, coord)
    if s == math.inf and top == math.inf:  # alpha = 0 at t = 0 (VP-cosine, CondOT in "sigma")
        return 0.0
    if not (math.isfinite(s) and s >= 0.0):
        raise ValueError(f"noise level {sigma!r} is not finite and >= 0")
    if s == 0.0:
        return 1.0
    if s > top * (1.0 + 1e-12):
        raise ValueError(f"noise level {s!r} ({coord}) lies above the path's largest, {top!r} at t = 0 on {path!r}")
    if s >= top:
        return 0.0
    if coord == "flow" and type(path) is CondOT:
        return 1.0 - s
    if coord == "sigma":
        if type(path) is VE:
            return 1.0 - s / path.sigma_max
        if type(path) is VP:  # B(s_d) = log(1 + sigma^2) = beta_min s_d + (beta_max - beta_min) s_d^2 / 2
            big_b, a2, b1 = math.log1p(s * s), 0.5 * (path.beta_max - path.beta_min), path.beta_min
            s_d = big_b / b1 if a2 == 0.0 else 2.0 * big_b / (b1 + math.sqrt(b1 * b1 + 4.0 * a2 * big_b))
            return min(max(1.0 - s_d, 0.0), 1.0)
        if type(path) is VPCosine:  # alpha = sin(w t) / sin(w) = 1 / sqrt(1 + sigma^2)
            w = 0.5 * math.pi / (1.0 + path.s)
            return min(max(math.asin(math.sin(w) / math.sqrt(1.0 + s * s)) / w, 0.0), 1.0)
        if type(path) is DiscreteVP:  # log alpha_bar = -log(1 + sigma^2), linear in tau between the knots
            return _discrete_time(path, -math.log1p(s * s))
    return _bisect(path, s, coord)


def _discrete_time(path: DiscreteVP, log_a: float) -> float:
    knots = path._log_a_list  # decreasing: tau = -1, 0, ..., T - 1
    neg = [-v for v in knots]
    k = min(max(bisect.bisect_left(neg, -log_a) - 1, 0), len(knots) - 2)
    lo, hi = knots[k], knots[k + 1]
    pos = k + (0.0 if hi == lo else (log_a - lo) / (hi - lo))
    return min(max(path.time(pos - 1.0), 0.0), 1.0)


def _bisect(path: GaussianPath, s: float, coord: str) -> float:
    lo, hi = 0.0, 1.0  # level(lo) >= s >= level(hi); the level decreases in t
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if level(path, mid, coord) > s:
            lo = mid
        else:
            hi = mid
    return lo if abs(level(path, lo, coord) - s) <= abs(level(path, hi, coord) - s) else hi


class Levels:
    """ComfyUI's model_sampling on a path: ``sigmas`` (the N training levels, increasing with the timestep),
    ``sigma_min`` / ``sigma_max``, ``sigma(tau)`` and ``timestep(sigma)``. ``table``: the N training levels
    given directly (e.g. a diffusers scheduler's sigmas; "sigma" coordinate)."""

    def __init__(self, path: GaussianPath, num_train_timesteps: int = 1000, table: Optional[Sequence[float]] = None):
        if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or \
                num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        self.path = path
        if table is not None:
            self.coord, self.sigmas = "sigma", [float(v) for v in table]
            if len(self.sigmas) < 2 or any(not (0 < a < b) for a, b in zip(self.sigmas, self.sigmas[1:])):
                raise ValueError("levels must hold >= 2 positive training levels, increasing with the timestep")
        else:
            if isinstance(path, DiscreteVP):
                num_train_timesteps = path.num_train_timesteps  # its own table
            self.coord = coordinate(path)
            n = num_train_timesteps
            self.sigmas = [level(path, 1.0 - (k + 1) / n, self.coord) for k in range(n)]
            if not math.isfinite(self.sigmas[-1]):  # alpha = 0 at t = 0: the last level one timestep in
                self.sigmas[-1] = level(path, 0.5 / n, self.coord)
        self.n = len(self.sigmas)
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]
        self._log = [math.log(v) for v in self.sigmas] if self.coord == "sigma" else None

    def sigma(self, tau: float) -> float:
        """The level of (fractional) timestep tau: ComfyUI's ModelSamplingDiscrete.sigma (log-linear between the
        integers, tau clamped to [0, N - 1]) or ModelSamplingDiscreteFlow.sigma (tau / N)."""
        if self.coord == "flow":
            return tau / self.n
        tau = min(max(tau, 0.0), self.n - 1.0)
        lo = int(math.floor(tau))
        hi = min(lo + 1, self.n - 1)
        w = tau - lo
        return math.exp((1.0 - w) * self._log[lo] + w * self._log[hi])

    def timestep(self, sigma: float) -> float:
        """ComfyUI's timestep(sigma): the nearest training timestep in log sigma, or sigma N on the flow one."""
        if self.coord == "flow":
            return sigma * self.n
        ls = math.log(sigma)
        return float(min(range(self.n), key=lambda k: abs(ls - self._log[k])))
