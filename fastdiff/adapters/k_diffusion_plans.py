"""The k-diffusion adapter's runs, planned once per schedule (fastdiff.adapters.k_diffusion's ``sample_*``).

A call used to build its noise levels, the method's stage table (~1 ms at 50 steps, only to learn where the model
is evaluated) and a fresh fastdiff.sample plan (its model object was new each call, so nothing could be reused):
0.6-1.3 ms fixed and 90-165 us per step at batch 1 against k-diffusion's 36-52 (AMD EPYC, bench/results/
amd-epyc-20261206-latency-before.md). Now a :class:`SchedulePlan` holds all of that for one schedule (the sigmas'
values, the method and its options, x's layout, which of noise_sampler / callback / progress is given) and a
``fastdiff.Sampler`` built once; a call refills x (the Sampler's noise) and the seed, and hands the plan this call's
denoiser, extra_args, callback and noise_sampler through a holder that is emptied when the call returns.

The last MAX_PLANS plans are kept, each holding the denoiser only weakly (an entry goes with its denoiser; the
cache never keeps the user's model alive). Calls whose arguments cannot be keyed (a denoiser that takes no weak
reference, per-sample options) plan anew each time, as before.
"""

from __future__ import annotations

import math
import sys
import weakref

import torch

import fastdiff
from fastdiff import _backends
from fastdiff import dispatch as _dispatch
from fastdiff.paths import VE
from fastdiff.sampling.methods import get_method
from fastdiff.sampling import plan_cache
from fastdiff.sampling.methods.churn import GAMMA_MAX
from fastdiff.sampling.sampler import Sampler
from fastdiff.schedules import ve_grid, ve_timesteps

MAX_PLANS = 4
# x's elements up to which a plan keeps its Sampler (and its buffers, ~6 copies of x: 12 MiB at most); larger
# runs take fastdiff.sample's pooled scratch, their planning being a negligible part of a call
MAX_SAMPLER_ELEMENTS = 1 << 19

_plans = plan_cache.ModelKeyedCache(MAX_PLANS)


class NoiseLevels:
    """The noise level handed to the denoiser for flow times t: the schedule's own sigma where t is a grid time or
    a time given to :meth:`exact_at` (the sampler calls the model only there), so a float32 t near 1 (sigma ~ 1e-3
    of sigma_max) does not shift it; elsewhere sigma = sigma_max (1 - t).

    A sampler hands the model the same time tensor at each evaluation of a stage (fastdiff's plan keeps one per
    stage), so the levels of a tensor are remembered by its identity and version: ~0.6 us a call instead of the
    lookup's 6 torch ops (~10 us at batch 1)."""

    MAX_REMEMBERED = 64

    def __init__(self, sigmas, sigma_max: float | None = None):
        self.path, self.timesteps = ve_grid(sigmas)
        if sigma_max is not None:  # room above sigmas[0] (churn at the first step raises the level)
            self.timesteps = ve_timesteps(sigmas, sigma_max)
            self.path = VE(sigma_max)
        self.sigmas64 = [self.path.sigma(t) for t in self.timesteps]  # = sigmas up to rounding
        self._times = list(self.timesteps)  # where the sampler evaluates the model (exact_at adds more)
        self._exact = {}  # device -> (times as float32, sigmas as float32)
        self._remembered = {}  # id(t) -> (weak reference to t, t's version, its levels, their version)

    def exact_at(self, times) -> None:
        """Also hand the exact sigma of these flow times (float64): the times between the grid points where a
        method evaluates the model (midpoints, churn)."""
        self._times = sorted(set(self._times) | {float(t) for t in times})
        self._exact, self._remembered = {}, {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        hit = self._remembered.get(id(t))
        # (identity first: an inference tensor has no version, and a dead tensor's id may be reused by one)
        if hit is not None and hit[0]() is t and hit[1] == t._version and hit[3] == hit[2]._version:
            return hit[2]
        sigma = self.lookup(t)
        try:
            entry = (weakref.ref(t), t._version, sigma, sigma._version)
        except RuntimeError:  # an inference-mode tensor: no version counter, nothing remembered
            return sigma
        if len(self._remembered) >= self.MAX_REMEMBERED:
            self._remembered.clear()
        self._remembered[id(t)] = entry
        return sigma

    def lookup(self, t: torch.Tensor) -> torch.Tensor:
        """The levels of any flow times t (float32, t's device)."""
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


def check_denoiser(denoiser, extra_args) -> None:
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(x, sigma, **extra_args), got {type(denoiser).__name__}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments, got {type(extra_args).__name__}")


class _ThisCall:
    """What changes from call to call of a plan: set for a run, emptied after it (the plan keeps nothing of it)."""

    __slots__ = ("denoiser", "extra_args", "callback", "step_noise")

    def __init__(self):
        self.denoiser = self.extra_args = self.callback = self.step_noise = None


def _model(levels: NoiseLevels, call: _ThisCall):
    """fastdiff's model(x, t, y) for the denoiser of the call in progress (y is unused: conditioning is in
    extra_args)."""
    def model(x, t, y=None):
        sigma = levels(t)
        return call.denoiser(x, sigma if sigma.dtype is x.dtype else sigma.to(x.dtype), **call.extra_args)
    return model


class SchedulePlan:
    """A k-diffusion sampler call planned for one schedule: the noise levels, k-diffusion's sigma_hat per step (the
    callback's), the model fastdiff calls, and a fastdiff.Sampler (None for large x). ``noise_sampler``: its kind
    (None, "brownian" or any callable: the callable itself comes with each call)."""

    def __init__(self, method: str, sigmas, x: torch.Tensor, eta, seed, noise_sampler, callback_given: bool,
                 progress: bool, keep_sampler: bool, options: dict):
        record = get_method(method)
        try:
            self.levels = NoiseLevels(sigmas, sigma_max=churn_headroom(sigmas, **options))
        except ValueError as exc:
            raise ValueError(f"sigmas: {exc}") from None
        sigmas64 = self.levels.sigmas64
        if sigmas64[-1] != 0.0:
            raise ValueError(f"sigmas must end at 0 (k-diffusion's schedules append it), got {sigmas64[-1]}")
        # the times between grid points where the method evaluates the model, handed over exactly
        stages = record.stages(self.levels.path, self.levels.timesteps, "x0", **record.option_values(eta=eta,
                                                                                                       **options))
        self.levels.exact_at(st.t for st in stages)
        sigma_hat = {}  # each step's first evaluation: k-diffusion's sigma_hat (sigma raised by churn)
        for st in stages:
            sigma_hat.setdefault(st.step, self.levels.path.sigma(st.t))
        self.method, self.r = method, options.get("r", 0.5)
        self.call = call = _ThisCall()
        self.model = _model(self.levels, call)
        fd_callback = None
        if callback_given:
            def fd_callback(step, t, state, x0):  # x is the state after the step (k-diffusion: before)
                call.callback({"x": state, "i": step, "sigma": sigmas64[step], "sigma_hat": sigma_hat[step],
                               "denoised": x0})
        step_noise = noise_sampler  # (the plan keeps its kind only: a callable comes with each call)
        if callable(noise_sampler):
            def step_noise(step: int, j: int):
                return call.step_noise(step, j)
        self.kwargs = dict(path=self.levels.path, prediction="x0", method=method, timesteps=self.levels.timesteps,
                           eta=eta, progress=progress, callback=fd_callback, device=x.device, step_noise=step_noise,
                           **options)
        self.sampler = Sampler(self.model, None, noise=x, seed=seed, **self.kwargs) if keep_sampler else None

    def run(self, denoiser, x, sigmas, extra_args, callback, seed, noise_sampler) -> torch.Tensor:
        call = self.call
        call.denoiser, call.extra_args, call.callback = denoiser, dict(extra_args or {}), callback
        call.step_noise = _step_noise(noise_sampler, sigmas, x.shape, self.method, self.r)
        try:
            if self.sampler is not None:
                out = self.sampler(noise=x, seed=seed)
            else:
                out = fastdiff.sample(self.model, None, noise=x, seed=seed, **self.kwargs)
        finally:
            call.denoiser = call.extra_args = call.callback = call.step_noise = None
        return out.to(x.dtype)


def run(method: str, denoiser, x, sigmas, extra_args, callback, disable, *, eta=None, seed=0, noise_sampler=None,
        **options) -> torch.Tensor:
    """A k-diffusion ``sample_*`` call: its plan from the cache (or a new one), run with this call's arguments."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor [B, ...] (the initial state, noise times sigmas[0])")
    if isinstance(sigmas, torch.Tensor) and sigmas.dim() != 1:
        raise ValueError(f"sigmas must be 1-D (steps + 1 noise levels), got shape {tuple(sigmas.shape)}")
    check_denoiser(denoiser, extra_args)
    _step_noise(noise_sampler, None, None, method)  # its TypeError before any planning
    # disable=None: a bar on a terminal only, as tqdm's disable=None does
    progress = (not disable) if disable is not None else sys.stderr.isatty()
    values, key = _key(method, denoiser, x, sigmas, eta, noise_sampler, callback, progress, options)
    entry = _plans.take(key, denoiser) if key is not None else None
    plan = entry[1] if entry is not None else None
    if plan is None:
        plan = SchedulePlan(method, values if values is not None else sigmas, x, eta, seed, noise_sampler,
                            callback is not None, progress, key is not None and x.numel() <= MAX_SAMPLER_ELEMENTS,
                            options)
    try:
        return plan.run(denoiser, x, sigmas, extra_args, callback, seed, noise_sampler)
    finally:
        if key is not None:
            _plans.give(key, denoiser, plan, entry[0] if entry is not None else None)


def _key(method, denoiser, x, sigmas, eta, noise_sampler, callback, progress, options) -> tuple:
    """(the sigmas' values, the plan's cache key), or (None, None) when the call cannot be keyed."""
    try:
        values = tuple(sigmas.tolist() if isinstance(sigmas, torch.Tensor) else (float(v) for v in sigmas))
        plan_cache.model_ref(denoiser)  # TypeError: no weak reference
        model_id = (id(denoiser.__self__), id(denoiser.__func__)) if _bound(denoiser) else id(denoiser)
        kind = noise_sampler if noise_sampler is None or isinstance(noise_sampler, str) else "callable"
        # the method's record (a method registered again plans anew) and the step kernels in force (a plan holds
        # the one it resolved)
        return values, (model_id, method, id(get_method(method)), values, _scalar(eta),
                        tuple(sorted((k, _scalar(v)) for k, v in options.items())), tuple(x.shape), x.dtype,
                        x.device, kind, callback is not None, progress, _dispatch.current(),
                        tuple(id(_backends.get(n).kernels.get("sampler_step")) for n in _backends.names()))
    except (TypeError, ValueError):  # not keyable, or an argument error that planning names
        return None, None


def _scalar(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return (type(v), v)
    raise TypeError(type(v).__name__)  # a per-sample option (list or tensor): not keyed


def _bound(f) -> bool:
    return hasattr(f, "__self__") and hasattr(f, "__func__")


def clear_plans() -> None:
    """Drop every kept plan (also done by fastdiff.clear_scratch())."""
    _plans.clear()


plan_cache.CLEARERS.append(clear_plans)


def _step_noise(noise_sampler, sigmas, shape, method: str, r: float = 0.5):
    """fastdiff.sample's step_noise from k-diffusion's noise_sampler(sigma, sigma_next), asked for the same
    noise levels as k-diffusion asks, computed as it computes them (float32): (sigma_i, sigma_{i+1}) for one
    draw per step; dpmpp_sde's two, (sigma(t), sigma(s)) then (sigma(t), sigma(t_next)) in its t = -log sigma."""
    if noise_sampler is None or noise_sampler == "brownian":  # in-kernel: independent draws, or the Brownian path
        return noise_sampler
    if not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be 'brownian' or callable as noise_sampler(sigma, sigma_next), got "
                        f"{type(noise_sampler).__name__}")
    if sigmas is None:  # (a check only)
        return None
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


def churn_headroom(sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, **_) -> float | None:
    """VE's sigma_max when churn raises the first noise level above sigmas[0] (else None: sigmas[0])."""
    s = sigmas.detach().double().cpu().tolist() if isinstance(sigmas, torch.Tensor) else [float(v) for v in sigmas]
    if not (isinstance(s_churn, (int, float)) and s_churn > 0) or len(s) < 2 or not s_tmin <= s[0] <= s_tmax:
        return None
    return s[0] * (1.0 + min(s_churn / (len(s) - 1), GAMMA_MAX))
