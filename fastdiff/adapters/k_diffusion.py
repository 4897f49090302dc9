"""k-diffusion adapter: its denoisers as fastdiff models, fastdiff's samplers behind its signature.

A k-diffusion denoiser ``D(x, sigma, **extra_args)`` predicts the clean data from x = z + sigma eps.
On fastdiff's VE path (alpha = 1, beta = sigma_max (1 - t), :class:`fastdiff.paths.VE`) that is an
``"x0"`` model, and a decreasing sigma schedule ending at 0 is the time grid t_i = 1 - sigma_i /
sigma_max (:func:`fastdiff.schedules.ve_timesteps`). Since sigma is affine in t, fastdiff's Euler,
Heun and DPM-Solver++(2M) steps on that grid are k-diffusion's ``sample_euler``, ``sample_heun`` and
``sample_dpmpp_2m`` (tested to 1e-4), each step one fused kernel call:

    from fastdiff.adapters import k_diffusion as fk
    x = fk.sample_dpmpp_2m(denoiser, torch.randn(8, 4, 32, 32) * sigmas[0], sigmas)

``sample_euler_ancestral`` (DDIM with eta on the same path: k-diffusion's sigma_up / sigma_down step,
s_noise), ``sample_dpmpp_2m_sde`` (midpoint or heun) and ``sample_dpmpp_3m_sde`` draw fastdiff's reproducible per-sample noise
instead of ``torch.randn_like`` or a Brownian tree: pass ``seed`` (a ``noise_sampler`` given is honoured:
its noise enters the fused step as one more input; ``noise_sampler="brownian"`` draws the in-kernel
Brownian path of fastdiff.sampling.features.brownian, step-count stable as k-diffusion's default Brownian tree
of the SDE samplers, ~15x faster than that tree on the CPU). ``sample_dpm_2``,
``sample_dpm_2_ancestral``, ``sample_dpmpp_2s_ancestral`` and ``sample_dpmpp_sde`` evaluate the denoiser
between grid points too (their midpoints), and the churn options of ``sample_euler`` / ``sample_heun`` /
``sample_dpm_2`` are honoured (fastdiff.sampling.methods.churn).
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional

import torch

import fastdiff
from fastdiff.paths import VE
from fastdiff.sampling.methods.churn import GAMMA_MAX
from fastdiff.sampling.methods import get_method
from fastdiff.schedules import ve_grid, ve_timesteps

__all__ = ["DenoiserModel", "sample_euler", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
           "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_euler_ancestral",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_lms"]


class DenoiserModel(torch.nn.Module):
    """``model(x, t, y)`` for fastdiff from a k-diffusion denoiser: an ``"x0"`` model on ``path``.

    The noise level handed to the denoiser is the schedule's own sigma where t is a grid time or a time
    given to :meth:`exact_at` (the sampler calls the model only there), so a float32 t near 1 (sigma
    ~ 1e-3 of sigma_max) does not shift it; elsewhere sigma = sigma_max (1 - t). ``sigma_max`` (default
    sigmas[0]) leaves room above the schedule for churn. ``y`` is ignored: conditioning goes in
    ``extra_args``.
    """

    def __init__(self, denoiser: Callable, sigmas, extra_args: Optional[dict] = None, sigma_max: Optional[float] = None):
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x, sigma, **extra_args), got {type(denoiser).__name__}")
        if extra_args is not None and not isinstance(extra_args, dict):
            raise TypeError(f"extra_args must be a dict of keyword arguments, got {type(extra_args).__name__}")
        self.denoiser = denoiser
        self.extra_args = dict(extra_args or {})
        self.path, self.timesteps = ve_grid(sigmas)
        if sigma_max is not None:  # room above sigmas[0] (churn at the first step raises the level)
            self.timesteps = ve_timesteps(sigmas, sigma_max)
            self.path = VE(sigma_max)
        self._sigmas64 = [self.path.sigma(t) for t in self.timesteps]  # = sigmas up to rounding
        self._times = list(self.timesteps)  # where the sampler evaluates the model (exact_at adds more)
        self._exact = {}  # device -> (times as float32, sigmas as float32)

    def exact_at(self, times) -> None:
        """Also hand the exact sigma of these flow times (float64) to the denoiser: the times between the
        grid points where a method evaluates the model (midpoints, churn)."""
        self._times = sorted(set(self._times) | {float(t) for t in times})
        self._exact = {}

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if t.device not in self._exact:
            times = torch.tensor(self._times, dtype=torch.float32)
            keep = torch.cat([times[1:] != times[:-1], torch.tensor([True])])  # one entry per float32 time
            sig = torch.tensor([self.path.sigma(u) for u in self._times], dtype=torch.float32)
            self._exact[t.device] = (times[keep].to(t.device), sig[keep].to(t.device))
        grid, sig = self._exact[t.device]
        tf = t.float()
        idx = torch.searchsorted(grid, tf).clamp_(max=len(grid) - 1)
        on_grid = grid[idx] == tf
        return torch.where(on_grid, sig[idx], (self.path.sigma_max * (1.0 - tf.double())).float())

    def forward(self, x, t, y=None):
        return self.denoiser(x, self.sigma(t).to(x.dtype), **self.extra_args)


def _run(method: str, model, x, sigmas, extra_args, callback, disable, *, eta=None, seed=0, noise_sampler=None,
         **options):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor [B, ...] (the initial state, noise times sigmas[0])")
    if isinstance(sigmas, torch.Tensor) and sigmas.dim() != 1:
        raise ValueError(f"sigmas must be 1-D (steps + 1 noise levels), got shape {tuple(sigmas.shape)}")
    record = get_method(method)
    try:
        wrapped = DenoiserModel(model, sigmas, extra_args, sigma_max=_churn_headroom(sigmas, **options))
    except ValueError as exc:
        raise ValueError(f"sigmas: {exc}") from None
    if wrapped._sigmas64[-1] != 0.0:
        raise ValueError(f"sigmas must end at 0 (k-diffusion's schedules append it), got {wrapped._sigmas64[-1]}")
    # the times between grid points where the method evaluates the model, handed over exactly
    values = record.option_values(eta=eta, **options)
    stages = record.stages(wrapped.path, wrapped.timesteps, "x0", **values)
    wrapped.exact_at(st.t for st in stages)
    sigma_hat = {}  # each step's first evaluation: k-diffusion's sigma_hat (sigma raised by churn)
    for st in stages:
        sigma_hat.setdefault(st.step, wrapped.path.sigma(st.t))
    fd_callback = None
    if callback is not None:
        def fd_callback(step, t, state, x0):  # x is the state after the step (k-diffusion: before)
            callback({"x": state, "i": step, "sigma": wrapped._sigmas64[step], "sigma_hat": sigma_hat[step],
                      "denoised": x0})
    # disable=None: a bar on a terminal only, as tqdm's disable=None does
    progress = (not disable) if disable is not None else sys.stderr.isatty()
    return fastdiff.sample(wrapped, None, noise=x, path=wrapped.path, prediction="x0", method=method,
                           timesteps=wrapped.timesteps, eta=eta, seed=seed, progress=progress,
                           callback=fd_callback, device=x.device,
                           step_noise=_step_noise(noise_sampler, sigmas, x.shape, method, options.get("r", 0.5)),
                           **options).to(x.dtype)


def _step_noise(noise_sampler, sigmas, shape, method: str, r: float = 0.5):
    """fastdiff.sample's step_noise from k-diffusion's noise_sampler(sigma, sigma_next), asked for the same
    noise levels as k-diffusion asks, computed as it computes them (float32): (sigma_i, sigma_{i+1}) for one
    draw per step; dpmpp_sde's two, (sigma(t), sigma(s)) then (sigma(t), sigma(t_next)) in its t = -log sigma."""
    if noise_sampler is None or noise_sampler == "brownian":  # in-kernel: independent draws, or the Brownian path
        return noise_sampler
    if not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be 'brownian' or callable as noise_sampler(sigma, sigma_next), got "
                        f"{type(noise_sampler).__name__}")
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.tensor([float(v) for v in sigmas], dtype=torch.float32)

    def step_noise(step: int, j: int):
        if method != "dpmpp_sde":
            noise = noise_sampler(sigmas[step], sigmas[step + 1])
        else:
            t, t_next = sigmas[step].log().neg(), sigmas[step + 1].log().neg()
            upper = t + (t_next - t) * r if j == 0 else t_next
            noise = noise_sampler(t.neg().exp(), upper.neg().exp())
        if not isinstance(noise, torch.Tensor) or noise.shape != shape:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise_sampler returned {got} at step {step}; it must return noise of x's shape "
                             f"{tuple(shape)}")
        return noise

    return step_noise


def _churn_headroom(sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, **_) -> Optional[float]:
    """VE's sigma_max when churn raises the first noise level above sigmas[0] (else None: sigmas[0])."""
    s = sigmas.detach().double().cpu().tolist() if isinstance(sigmas, torch.Tensor) else [float(v) for v in sigmas]
    if not (isinstance(s_churn, (int, float)) and s_churn > 0) or len(s) < 2 or not s_tmin <= s[0] <= s_tmax:
        return None
    return s[0] * (1.0 + min(s_churn / (len(s) - 1), GAMMA_MAX))


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, seed=0):
    """k-diffusion's ``sample_euler``: Euler in sigma, with Karras et al.'s churn (s_churn, s_tmin, s_tmax,
    s_noise; the churn noise is fastdiff's per-sample stream of ``seed``)."""
    return _run("euler", model, x, sigmas, extra_args, callback, disable, seed=seed, s_churn=s_churn,
                s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, seed=0):
    """k-diffusion's ``sample_heun`` (Heun in sigma, Euler on the last step to sigma = 0) with churn as
    :func:`sample_euler`."""
    return _run("heun", model, x, sigmas, extra_args, callback, disable, seed=seed, s_churn=s_churn,
                s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, seed=0):
    """k-diffusion's ``sample_dpm_2`` (DPM-Solver-2 midpoint steps in log sigma) with churn as
    :func:`sample_euler`."""
    return _run("dpm_2", model, x, sigmas, extra_args, callback, disable, seed=seed, s_churn=s_churn,
                s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, seed=0):
    """k-diffusion's ``sample_dpm_2_ancestral``; the noise is fastdiff's per-sample stream of ``seed``, or the
    ``noise_sampler``'s where one is given."""
    return _run("dpm_2_ancestral", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                noise_sampler=noise_sampler, s_noise=s_noise)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None, seed=0):
    """k-diffusion's ``sample_dpmpp_2s_ancestral``; the noise as :func:`sample_dpm_2_ancestral`."""
    return _run("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                noise_sampler=noise_sampler, s_noise=s_noise)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2, seed=0):
    """k-diffusion's ``sample_dpmpp_sde`` (two stages at ratio r): fastdiff's method ``dpmpp_sde``, two
    per-sample draws per step from the stream of ``seed``, correlated as a Brownian path's increments over
    the nested intervals (k-diffusion's default draws both from a Brownian tree over sigma), or the
    ``noise_sampler``'s noise where one is given."""
    return _run("dpmpp_sde", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                noise_sampler=noise_sampler, s_noise=s_noise, r=r)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion's ``sample_dpmpp_2m`` (DPM-Solver++(2M), first order on the first and last steps)."""
    return _run("dpmpp_2m", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """k-diffusion's ``sample_lms`` (linear multistep of ``order`` in sigma): fastdiff's method ``lms``."""
    return _run("lms", model, x, sigmas, extra_args, callback, disable, order=order)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, seed=0):
    """k-diffusion's ``sample_euler_ancestral``: step to sigma_down, add sigma_up noise (DDIM with eta on
    the VE path). The noise is fastdiff's stream of ``seed`` (int: sample b uses seed + b, or
    per-sample seeds), so image b is reproduced alone; a ``noise_sampler`` given is called as k-diffusion
    calls it (once per step with noise) and its noise used instead."""
    return _run("euler_ancestral", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                noise_sampler=noise_sampler, s_noise=s_noise)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", seed=0):
    """k-diffusion's ``sample_dpmpp_2m_sde`` (DPM-Solver++(2M) SDE, midpoint or heun correction): fastdiff's
    method ``dpmpp_2m_sde`` on the same path. The noise is fastdiff's per-sample stream of ``seed``, one
    draw per step (k-diffusion's default is a Brownian tree over sigma: ``noise_sampler="brownian"`` is
    fastdiff's in-kernel counterpart), or the ``noise_sampler``'s."""
    return _run("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                noise_sampler=noise_sampler, s_noise=s_noise, solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, seed=0):
    """k-diffusion's ``sample_dpmpp_3m_sde`` (DPM-Solver++(3M) SDE): fastdiff's method ``dpmpp_3m_sde``, the
    noise fastdiff's per-sample stream of ``seed`` as in :func:`sample_dpmpp_2m_sde`."""
    return _run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                noise_sampler=noise_sampler, s_noise=s_noise)


def _eta(eta) -> float:
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    return float(eta)
