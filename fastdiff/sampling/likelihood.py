"""Exact likelihoods through the probability-flow ODE (docs/score_based.md; Chen et al. 2018, Song et al. 2021).

Along dx/dt = u(x, t) the log-density obeys d log p_t(x_t)/dt = −div u(x_t, t), so integrating from the data
x at t_data back to the noise end t_noise,

    log p(x) = log π(x_{t_noise}) − ∫_{t_noise}^{t_data} div u(x_t, t) dt,     π = N(0, β(t_noise)² I)

(π is the path's marginal at t_noise when α(t_noise) = 0: exact on condot and VE, within e^{-10} on VP). The
model's prediction p converts to u = a(t) x + b(t) p (fastdiff.paths.affine_coefficients), so div u =
a d + b div p. div p is the exact trace of ∂p/∂x (d backward passes: small d) or Hutchinson's estimate
ε·(∂p/∂x)ᵀε averaged over probes ε (Rademacher or Gaussian, the normals of stream PROBE_STREAM + k of each
sample's seed, one ε per probe for the whole path; each probe's integral is an unbiased estimate, so their
spread gives the standard error). The x update is Heun's (or Euler's) stage table on the reversed grid, run
by the fused sampler_step; the divergence integral takes the same rule (trapezoid / rectangle) in float64.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from fastdiff import _checks
from fastdiff import dispatch as _dispatch
from fastdiff.ops.randn import randn
from fastdiff.ops.sampler_step import KERNEL_ARGS, prepare
from fastdiff.paths import affine_coefficients, check_prediction, get_path
from fastdiff.sampling.core.arguments import MAX_STEPS, T_MIN_SINGULAR, sample_seeds, time_grid
from fastdiff.sampling.methods.coefficients import _singular
from fastdiff.sampling.methods import get_method

PROBE_STREAM = 1 << 28  # Hutchinson probe k of a sample: the normals of stream 2^28 + k (docs/design.md §3)
MAX_PROBES = 1 << 16
T_DATA_SINGULAR = 1e-5  # score_sde's likelihood starts at t = 1 − 1e-5 where the field is singular at the data


class Likelihood(NamedTuple):
    """log_likelihood's result, per sample (float64 [B])."""

    log_prob: torch.Tensor  # log p(x) in nats (the mean over probes with Hutchinson)
    std_error: torch.Tensor | None  # Hutchinson: the standard error of log_prob over its probes (None: exact trace)
    prior_log_prob: torch.Tensor  # log π(x at t_noise)
    noise: torch.Tensor  # x carried to t_noise [B, *shape] (float32)


def bits_per_dim(log_prob: torch.Tensor, dims: int, *, levels: int = 256, data_range: float = 2.0) -> torch.Tensor:
    """Bits per dimension of data quantized to ``levels`` values over an interval of width ``data_range`` (8-bit
    images scaled to [−1, 1]: 256 and 2): −log2 of the bin's probability p(x) Δ^d, Δ = data_range / levels, per
    dimension."""
    dims = _checks.count("dims", dims, least=1)
    levels = _checks.count("levels", levels, least=2)  # one level is no quantization: p(x) Δ^d is not a bin's mass
    data_range = _checks.real("data_range", data_range, lo=0.0, lo_open=True)
    if not isinstance(log_prob, torch.Tensor):
        raise TypeError(f"log_prob must be a tensor (log p(x) in nats), got {type(log_prob).__name__}")
    return (-log_prob / dims + math.log(levels / data_range)) / math.log(2.0)


def _int_in(name, value, low, high):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def _divergence(model, x, t, y, d: int, probes: torch.Tensor | None):
    """(p(x, t) float32, div p [B] float64 or [K, B] per probe) by autograd: the exact trace or Hutchinson."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        p = model(xr, t, y)
        if not isinstance(p, torch.Tensor) or p.shape != x.shape:
            raise ValueError(f"model must return a tensor shaped like x {tuple(x.shape)}, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        if not p.requires_grad:  # else autograd's own error, naming neither the model nor the cause
            raise ValueError("the model's output has no gradient path to x (computed under torch.no_grad, "
                             "detached, or constant in x): the divergence needs a model differentiable in x")
        B = x.shape[0]
        flat = p.reshape(B, d)
        if probes is None:  # Σ_i ∂p_i/∂x_i: one backward pass per coordinate
            div = torch.zeros(B, dtype=torch.float64, device=x.device)
            for i in range(d):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xr, retain_graph=True, allow_unused=True)
                if g is not None:  # None: p_i does not depend on x
                    div += g.reshape(B, d)[:, i].to(torch.float64)
        else:
            div = torch.empty(probes.shape[0], B, dtype=torch.float64, device=x.device)
            for k in range(probes.shape[0]):
                (g,) = torch.autograd.grad((flat * probes[k]).sum(), xr, retain_graph=k + 1 < probes.shape[0],
                                           allow_unused=True)
                div[k] = 0.0 if g is None else (g.reshape(B, d).to(torch.float64) * probes[k]).sum(1)
    return p.detach().to(torch.float32).contiguous(), div


@torch.no_grad()
def log_likelihood(model, x: torch.Tensor, steps: int | None = 100, *, path="condot", prediction: str = "velocity",
                   y=None, method: str = "heun", divergence: str = "exact", probes: int | None = None,
                   probe_kind: str | None = None, seed=0, t_data: float | None = None, t_noise: float | None = None,
                   timesteps=None, prior=None, backend: str | None = None, progress: bool = False) -> Likelihood:
    """log p(x) of the model's probability-flow ODE, per sample: the data x [B, *shape] carried to the noise end,
    with the divergence integral along the way.

    Args:
        model: ``model(x, t, y)`` → a prediction of type ``prediction`` (differentiable in x).
        x: data [B, *shape]. steps: ODE steps (uniform in t). path, prediction, y: as in fastdiff.sample.
        method: "heun" (second order, default) or "euler".
        divergence: "exact" (trace by d backward passes per evaluation: small d) or "hutchinson" (``probes``
            vector-Jacobian products per evaluation, default 1; ``probe_kind`` "rademacher" (default) or
            "gaussian"; the result then carries its standard error). The exact trace takes neither.
        seed: int (sample b uses seed + b) or per-sample seeds: the probes' noise stream.
        t_data, t_noise: the integration's ends (default 1 and 0, moved in to 1 − 1e-5 / 1e-3 where the field
            is singular there, as score_sde does for VP paths).
        timesteps: instead of steps, t_data and t_noise: the grid, strictly decreasing from the data's time to the
            noise end (e.g. VE's levels, reversed: fine steps where the field is stiff, near the data).
        prior: ``prior(z)`` → log π(z) [B] of the state at t_noise; default N(0, β(t_noise)² I), exact where
            α(t_noise) = 0 (condot, VE) and off by about α(t_noise) |z · E[data]| on VP paths (α(0) = 0.0066 on
            "vp"), as score_sde's prior is.
        backend: the fused step's backend; None (default): the one in force (fastdiff.use_backend, else
            FASTDIFF_BACKEND, else "auto"). progress: a tqdm bar.
    """
    path = get_path(path)
    prediction = check_prediction(prediction)
    if method not in ("heun", "euler"):
        raise ValueError(f"method must be 'heun' or 'euler' for log_likelihood, got {method!r}")
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    if divergence == "exact":  # silently ignoring them would pass off the exact trace as the asked-for estimate
        for name, value in (("probes", probes), ("probe_kind", probe_kind)):
            if value is not None:
                raise ValueError(f'{name}={value!r} applies to divergence="hutchinson"; the exact trace '
                                 "(divergence=\"exact\") uses no probes")
    probe_kind = "rademacher" if probe_kind is None else probe_kind
    if probe_kind not in ("rademacher", "gaussian"):
        raise ValueError(f"probe_kind must be 'rademacher' or 'gaussian', got {probe_kind!r}")
    probes = _int_in("probes", 1 if probes is None else probes, 1, MAX_PROBES)
    progress = _checks.flag("progress", progress)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor [B, *shape] (the data)")
    _checks.device_arg("x's device", x.device)  # meta and other types fail inside the kernels
    if not bool(torch.isfinite(x).all()):  # else the model is blamed for the data's inf/NaN
        raise ValueError("x (the data) holds inf or NaN")
    if timesteps is not None:
        grid = time_grid(steps, timesteps, path, prediction, ())
        if len(grid) > 1 and not grid[0] > grid[-1]:
            raise ValueError("timesteps must decrease: the likelihood integrates from the data to the noise")
        steps, t_data, t_noise = len(grid) - 1, grid[0], grid[-1]
    else:
        steps = _int_in("steps", steps, 1, MAX_STEPS)
        t_data = (1.0 - T_DATA_SINGULAR if _singular(path, 1.0, prediction, "velocity") else 1.0) if t_data is None \
            else _checks.real("t_data", t_data)  # float() would take '0.9'
        t_noise = (T_MIN_SINGULAR if _singular(path, 0.0, prediction, "velocity") else 0.0) if t_noise is None \
            else _checks.real("t_noise", t_noise)
        if not 0.0 <= t_noise < t_data <= 1.0:
            raise ValueError(f"need 0 <= t_noise < t_data <= 1, got t_noise={t_noise}, t_data={t_data}")
        grid = [t_data + (t_noise - t_data) * i / steps for i in range(steps)] + [t_noise]  # data to noise
    for t in (t_data, t_noise):
        if _singular(path, t, prediction, "velocity"):
            raise ValueError(f"the velocity of a {prediction} model on {path!r} is singular at t = {t}; move the "
                             "grid's end inside (t_data < 1, t_noise > 0)")
    if backend is not None:
        _dispatch.check_name(backend)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
    if prior is not None and not callable(prior):
        raise TypeError(f"prior must be None or callable as prior(z) -> log density [B], got {type(prior).__name__}")
    B, shape, device = x.shape[0], tuple(x.shape[1:]), x.device
    d = math.prod(shape)
    if B == 0:  # nothing to integrate: no model call (as sample), the empty result of each field
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        std = empty if divergence == "hutchinson" and probes > 1 else None
        return Likelihood(empty, std, empty.clone(), x.detach().to(torch.float32).clone())
    seeds = sample_seeds(seed, B, device)
    step_backend = _dispatch.resolve(device, backend)  # None: use_backend / FASTDIFF_BACKEND, else auto
    step_kernel = _dispatch.kernel(step_backend, "sampler_step")
    stages = get_method(method).stages(path, grid, prediction)
    eps = None
    if divergence == "hutchinson":
        eps = torch.stack([randn(seeds, PROBE_STREAM + k, (d,), device=device, backend=step_backend)
                           for k in range(probes)])  # [K, B, d]
        if probe_kind == "rademacher":
            eps = torch.where(eps >= 0, 1.0, -1.0)
    buffers = {"x": x.detach().to(torch.float32, copy=True).contiguous()}  # one copy, the caller's x untouched
    for st in stages:
        for name in (st.out, st.side, st.extra):
            if name is not None and name not in buffers:
                buffers[name] = torch.empty_like(buffers["x"])
    delta = torch.zeros((probes if eps is not None else 1), B, dtype=torch.float64, device=device)
    pending = None  # Heun: the first stage's div u, waiting for the corrector's
    y = y.to(device) if isinstance(y, torch.Tensor) else y
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fastdiff log_likelihood", unit="step")
    for st in stages:
        t = torch.full((B,), st.t, dtype=torch.float32, device=device)
        p, div_p = _divergence(model, buffers[st.input], t, y, d, eps)
        a_u, b_u = affine_coefficients(path, st.t, prediction, "velocity")
        div_u = a_u * d + b_u * div_p
        h = grid[st.step + 1] - grid[st.step]
        if not st.final:  # Heun's predictor: the corrector averages the two divergences (trapezoid)
            pending = div_u
        elif pending is not None:
            delta += 0.5 * h * (pending + div_u)
            pending = None
        else:
            delta += h * div_u
        history = [buffers[st.extra]] if st.extra else []
        call = prepare(buffers[st.input], [p], None, history, st.kernel_rows(), seeds, st.streams(), [buffers[st.out]],
                       buffers[st.side] if st.side else None, None)
        step_kernel(*(call[k] for k in KERNEL_ARGS))
        if bar is not None and st.final:
            bar.update(1)
    if bar is not None:
        bar.close()
    z = buffers["x"]
    be = path.coefficients(t_noise)[1]
    if prior is None:
        zz = z.reshape(B, d).to(torch.float64)
        prior_lp = -0.5 * (zz * zz).sum(1) / (be * be) - d * math.log(be) - 0.5 * d * math.log(2 * math.pi)
    else:
        prior_lp = prior(z.clone())
        if not isinstance(prior_lp, torch.Tensor) or prior_lp.shape != (B,):
            raise ValueError(f"prior(z) must return one log-density per sample, shape ({B},)")
        prior_lp = prior_lp.detach().to(torch.float64)
    # the integral ran from t_data down to t_noise: delta = ∫_{t_data}^{t_noise} div u dt = −∫_{t_noise}^{t_data}
    per_probe = prior_lp + delta
    log_prob = per_probe.mean(0)
    std_error = None
    if eps is not None and probes > 1:  # std over the probes; an empty batch has none (and no warning)
        std_error = per_probe.std(0) / math.sqrt(probes) if B else per_probe.new_empty(0)
    return Likelihood(log_prob, std_error, prior_lp, z)
