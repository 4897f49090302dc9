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
s_noise), ``sample_dpmpp_2m_sde`` (midpoint or heun) and ``sample_dpmpp_3m_sde`` draw fastdiff's reproducible
per-sample noise instead of ``torch.randn_like`` or a Brownian tree: pass ``seed`` (a ``noise_sampler`` given is
honoured: its noise enters the fused step as one more input; ``noise_sampler="brownian"`` draws the in-kernel
Brownian path of fastdiff.sampling.features.brownian, step-count stable as k-diffusion's default Brownian tree
of the SDE samplers, ~15x faster than that tree on the CPU). ``sample_dpm_2``,
``sample_dpm_2_ancestral``, ``sample_dpmpp_2s_ancestral`` and ``sample_dpmpp_sde`` evaluate the denoiser
between grid points too (their midpoints), and the churn options of ``sample_euler`` / ``sample_heun`` /
``sample_dpm_2`` are honoured (fastdiff.sampling.methods.churn). ``sample_dpm_fast`` and ``sample_dpm_adaptive`` take
k-diffusion's (sigma_min, sigma_max) ends: fastdiff's ``dpm_fast`` and its per-sample ``dpm_adaptive``.

Each call's plan (the noise levels, the stage table, a ``fastdiff.Sampler``) is kept for the next call with the same
schedule, method, options and x layout; the denoiser is held weakly (fastdiff.adapters.k_diffusion_plans;
``clear_plans()`` drops them).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from fastdiff.adapters.k_diffusion_plans import NoiseLevels, check_denoiser, clear_plans, run as _run

__all__ = ["DenoiserModel", "sample_euler", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
           "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_euler_ancestral",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_lms", "sample_dpm_fast", "sample_dpm_adaptive",
           "clear_plans"]


class DenoiserModel(torch.nn.Module):
    """``model(x, t, y)`` for fastdiff from a k-diffusion denoiser: an ``"x0"`` model on ``path``.

    The noise level handed to the denoiser is the schedule's own sigma where t is a grid time or a time
    given to :meth:`exact_at` (the sampler calls the model only there), so a float32 t near 1 (sigma
    ~ 1e-3 of sigma_max) does not shift it; elsewhere sigma = sigma_max (1 - t) (:class:`NoiseLevels`).
    ``sigma_max`` (default sigmas[0]) leaves room above the schedule for churn. ``y`` is ignored:
    conditioning goes in ``extra_args``.
    """

    def __init__(self, denoiser: Callable, sigmas, extra_args: Optional[dict] = None,
                 sigma_max: Optional[float] = None):
        super().__init__()
        check_denoiser(denoiser, extra_args)
        self.denoiser = denoiser
        self.extra_args = dict(extra_args or {})
        self.levels = NoiseLevels(sigmas, sigma_max)
        self.path, self.timesteps = self.levels.path, self.levels.timesteps
        self._sigmas64 = self.levels.sigmas64

    def exact_at(self, times) -> None:
        """Also hand the exact sigma of these flow times (float64) to the denoiser: the times between the
        grid points where a method evaluates the model (midpoints, churn)."""
        self.levels.exact_at(times)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.levels(t)

    def forward(self, x, t, y=None):
        return self.denoiser(x, self.sigma(t).to(x.dtype), **self.extra_args)


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


def _ends(model, x, sigma_min, sigma_max, name: str):
    """(DenoiserModel on VE(sigma_max), its path) for k-diffusion's calls that take the ends of a schedule."""
    for arg, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not (isinstance(v, (int, float, torch.Tensor)) and math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{name}: {arg} must be a finite number > 0 (k-diffusion: 'must not be 0'), got {v!r}")
    lo, hi = float(sigma_min), float(sigma_max)
    if not lo < hi:
        raise ValueError(f"{name}: sigma_min must be below sigma_max, got {lo} and {hi}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor [B, ...] (the initial state, noise times sigma_max)")
    return lo, hi


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None, seed=0):
    """k-diffusion's ``sample_dpm_fast`` (DPM-Solver-fast: n evaluations in 3/2/1-stage steps uniform in log sigma
    from sigma_max to sigma_min, the state at sigma_min returned): fastdiff's method ``dpm_fast``. The noise of
    eta > 0 is fastdiff's stream of ``seed``, or the ``noise_sampler``'s, called as k-diffusion calls it
    (noise_sampler(sigma, sigma_next) of each step). ``callback`` gets k-diffusion's dict per step."""
    from fastdiff.sampling.methods.dpm_fast import step_grid

    lo, hi = _ends(model, x, sigma_min, sigma_max, "sample_dpm_fast")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"n (the model evaluations) must be an int >= 2, got {n!r}")
    levels = [hi * (lo / hi) ** (k / n) for k in range(n + 1)]  # only the ends count; uniform in log sigma
    den = DenoiserModel(model, levels, extra_args)
    eta = _eta(eta)
    times = step_grid(den.path, den.timesteps, eta)
    sigmas = torch.tensor([den.path.sigma(t) for t in times], dtype=torch.float32)
    den.exact_at(sorted(set(times) | {st.t for st in _stages("dpm_fast", den, eta, s_noise)}))
    step_noise = None if noise_sampler is None else _noise_from_sampler(noise_sampler, sigmas, x.shape)
    steps = len(times) - 1
    kd_callback = None if callback is None else (
        lambda i, t, state, x0: callback({"x": state, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                                          "t": -sigmas[i].log(), "t_up": -sigmas[i].log(), "denoised": x0}))
    out = _sample(den, None, noise=x.float(), path=den.path, prediction="x0", method="dpm_fast",
                          timesteps=den.timesteps, eta=eta, s_noise=s_noise, seed=seed, step_noise=step_noise,
                          callback=kd_callback, progress=_progress(disable) and steps > 0)
    return out.to(x.dtype)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False, seed=0):
    """k-diffusion's ``sample_dpm_adaptive`` (DPM-Solver-12 / 23 with PID step-size control) with each sample its own
    controller (fastdiff's ``dpm_adaptive``: one sample is k-diffusion's run exactly; a batch's samples do not wait
    for each other). ``return_info``: k-diffusion's dict (steps: the batch's iterations; nfe, n_accept, n_reject:
    the most any sample used) plus ``nfe_per_sample``, ``n_accept_per_sample``, ``n_reject_per_sample`` tensors.
    The noise of eta > 0 is fastdiff's stream of ``seed``; a ``noise_sampler`` (one draw for the whole batch at
    batch-wide sigmas) and a ``callback`` (per batch-wide step) have no per-sample counterpart and are refused."""
    lo, hi = _ends(model, x, sigma_min, sigma_max, "sample_dpm_adaptive")
    if noise_sampler is not None or callback is not None:
        raise ValueError("sample_dpm_adaptive: noise_sampler and callback are k-diffusion's per batch-wide step; here "
                         "each sample has its own steps (use seed for the noise)")
    den = DenoiserModel(model, [hi, lo], extra_args)
    out, info = _sample(den, None, noise=x.float(), path=den.path, prediction="x0", method="dpm_adaptive",
                                timesteps=den.timesteps, order=order, rtol=rtol, atol=atol, h_init=h_init,
                                pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff, accept_safety=accept_safety,
                                eta=_eta(eta), s_noise=s_noise, seed=seed, return_info=True,
                                progress=_progress(disable))
    if not return_info:
        return out.to(x.dtype)
    most = lambda v: int(v.max()) if v.numel() else 0  # noqa: E731
    return out.to(x.dtype), {"steps": info.iterations, "nfe": most(info.nfe), "n_accept": most(info.n_accept),
                             "n_reject": most(info.n_reject), "nfe_per_sample": info.nfe,
                             "n_accept_per_sample": info.n_accept, "n_reject_per_sample": info.n_reject}


def _stages(method, den, eta, s_noise):
    from fastdiff.sampling.methods import get_method

    return get_method(method).stages(den.path, den.timesteps, "x0", eta=eta, s_noise=s_noise)


def _noise_from_sampler(noise_sampler, sigmas, shape):
    if not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be callable as noise_sampler(sigma, sigma_next), got "
                        f"{type(noise_sampler).__name__}")

    def step_noise(step: int, j: int):
        noise = noise_sampler(sigmas[step], sigmas[step + 1])
        if not isinstance(noise, torch.Tensor) or noise.shape != shape:
            raise ValueError(f"noise_sampler returned {getattr(noise, 'shape', type(noise).__name__)} at step {step}; "
                             f"it must return noise of x's shape {tuple(shape)}")
        return noise

    return step_noise


def _progress(disable) -> bool:
    import sys

    return (not disable) if disable is not None else sys.stderr.isatty()


def _sample(*args, **kwargs):
    import fastdiff

    return fastdiff.sample(*args, **kwargs)


def _eta(eta) -> float:
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    return float(eta)
