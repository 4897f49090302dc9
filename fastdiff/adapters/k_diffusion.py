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
instead of ``torch.randn_like`` or a Brownian tree: pass ``seed``.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional

import torch

import fastdiff
from fastdiff.schedules import ve_grid

__all__ = ["DenoiserModel", "sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_lms"]


class DenoiserModel(torch.nn.Module):
    """``model(x, t, y)`` for fastdiff from a k-diffusion denoiser: an ``"x0"`` model on ``path``.

    The noise level handed to the denoiser is the schedule's own sigma where t is a grid time (the
    sampler calls the model only there), so a float32 t near 1 (sigma ~ 1e-3 of sigma_max) does not
    shift it; elsewhere sigma = sigma_max (1 - t). ``y`` is ignored: conditioning goes in ``extra_args``.
    """

    def __init__(self, denoiser: Callable, sigmas, extra_args: Optional[dict] = None):
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x, sigma, **extra_args), got {type(denoiser).__name__}")
        if extra_args is not None and not isinstance(extra_args, dict):
            raise TypeError(f"extra_args must be a dict of keyword arguments, got {type(extra_args).__name__}")
        self.denoiser = denoiser
        self.extra_args = dict(extra_args or {})
        self.path, self.timesteps = ve_grid(sigmas)
        self._sigmas64 = [self.path.sigma(t) for t in self.timesteps]  # = sigmas up to rounding
        self._exact = {}  # device -> (grid times as float32, sigmas as float32)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if t.device not in self._exact:
            self._exact[t.device] = (torch.tensor(self.timesteps, dtype=torch.float32, device=t.device),
                                     torch.tensor(self._sigmas64, dtype=torch.float32, device=t.device))
        grid, sig = self._exact[t.device]
        tf = t.float()
        idx = torch.searchsorted(grid, tf).clamp_(max=len(self.timesteps) - 1)
        on_grid = grid[idx] == tf
        return torch.where(on_grid, sig[idx], (self.path.sigma_max * (1.0 - tf.double())).float())

    def forward(self, x, t, y=None):
        return self.denoiser(x, self.sigma(t).to(x.dtype), **self.extra_args)


def _run(method: str, model, x, sigmas, extra_args, callback, disable, *, eta=None, seed=0, **options):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor [B, ...] (the initial state, noise times sigmas[0])")
    if isinstance(sigmas, torch.Tensor) and sigmas.dim() != 1:
        raise ValueError(f"sigmas must be 1-D (steps + 1 noise levels), got shape {tuple(sigmas.shape)}")
    try:
        wrapped = DenoiserModel(model, sigmas, extra_args)
    except ValueError as exc:
        raise ValueError(f"sigmas: {exc}") from None
    if wrapped._sigmas64[-1] != 0.0:
        raise ValueError(f"sigmas must end at 0 (k-diffusion's schedules append it), got {wrapped._sigmas64[-1]}")
    fd_callback = None
    if callback is not None:
        def fd_callback(step, t, state, x0):  # x is the state after the step (k-diffusion: before)
            s = wrapped._sigmas64[step]
            callback({"x": state, "i": step, "sigma": s, "sigma_hat": s, "denoised": x0})
    # disable=None: a bar on a terminal only, as tqdm's disable=None does
    progress = (not disable) if disable is not None else sys.stderr.isatty()
    return fastdiff.sample(wrapped, None, noise=x, path=wrapped.path, prediction="x0", method=method,
                           timesteps=wrapped.timesteps, eta=eta, seed=seed, progress=progress,
                           callback=fd_callback, device=x.device, **options).to(x.dtype)


def _no_churn(s_churn, s_noise):
    if s_churn != 0.0:
        raise NotImplementedError(f"s_churn={s_churn}: fastdiff's adapter runs the churn-free samplers "
                                  "(s_churn = 0); stochastic sampling: sample_euler_ancestral")
    if s_noise != 1.0:
        raise NotImplementedError(f"s_noise={s_noise}: only s_noise = 1 is supported")


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """k-diffusion's ``sample_euler`` (Euler in sigma; s_churn = 0) through fastdiff."""
    _no_churn(s_churn, s_noise)
    return _run("euler", model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """k-diffusion's ``sample_heun`` (Heun in sigma, Euler on the last step to sigma = 0; s_churn = 0)."""
    _no_churn(s_churn, s_noise)
    return _run("heun", model, x, sigmas, extra_args, callback, disable)


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
    per-sample seeds), so image b is reproduced alone; a ``noise_sampler`` is not supported."""
    _no_noise_sampler(noise_sampler)
    return _run("euler_ancestral", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                s_noise=s_noise)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", seed=0):
    """k-diffusion's ``sample_dpmpp_2m_sde`` (DPM-Solver++(2M) SDE, midpoint or heun correction): fastdiff's
    method ``dpmpp_2m_sde`` on the same path. The noise is fastdiff's per-sample stream of ``seed``, one
    draw per step (k-diffusion's default is a Brownian tree over sigma)."""
    _no_noise_sampler(noise_sampler)
    return _run("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                s_noise=s_noise, solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, seed=0):
    """k-diffusion's ``sample_dpmpp_3m_sde`` (DPM-Solver++(3M) SDE): fastdiff's method ``dpmpp_3m_sde``, the
    noise fastdiff's per-sample stream of ``seed`` as in :func:`sample_dpmpp_2m_sde`."""
    _no_noise_sampler(noise_sampler)
    return _run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, eta=_eta(eta), seed=seed,
                s_noise=s_noise)


def _no_noise_sampler(noise_sampler):
    if noise_sampler is not None:
        raise NotImplementedError("noise_sampler: fastdiff draws its own reproducible noise; pass seed instead")


def _eta(eta) -> float:
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    return float(eta)
