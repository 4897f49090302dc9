"""Adaptive step sizes per sample: DPM-Solver-12 / 23 with a PID controller (Lu et al. 2022, "DPM-Solver", §3.3 and
Algorithm 4 of its appendix; k-diffusion's ``sample_dpm_adaptive``), with each sample its own controller.

k-diffusion (and ComfyUI, which calls it) control the whole batch with one step size: one error norm over the batch,
so an easy sample takes the hard one's small steps and every sample is rejected when one is. Here every sample keeps
its own log-SNR position s, step size h, PID error history and accept / reject, all as [B] tensors on the device: one
iteration evaluates the model at each sample's own times (3 evaluations for order 3: lambda = s, s + h/3, s + 2h/3),
computes the embedded low / high order pair, the sample's error norm

    error_b = || (y_low - y_high) / max(atol, rtol max(|y_low|, |y_prev|)) || / sqrt(numel of a sample)

and its PID factor (k-diffusion's PIDStepSizeController: factor = 1 + atan(inv_err^b1 inv_err_1^b2 inv_err_2^b3 - 1),
accept where factor >= accept_safety, h *= factor), in the scaled state y = x / alpha, lambda = log(alpha / beta) of
the call's path. A sample that has reached the end stops moving and stops counting evaluations; every ``check_every``
iterations one flag (are all done?) is read on the host and the finished samples leave the batch, so that the model
is called on the unfinished ones only. Each sample's result is a function of its own seed, noise and conditioning:
the same alone and in any batch (noise of iteration j: stream 1 + j of its seed, drawn whether or not it is accepted).
The steps of one iteration (the embedded pair, on k-diffusion's formulas as fastdiff.sampling.methods.dpm_fast's):

    order 2: y_low = y - sigma_t expm1(h) E_0,  y_high = DPM-Solver-2 (r1 = 1/2)
    order 3: y_low = DPM-Solver-2 with r1 = 1/3,  y_high = DPM-Solver-3 (r1 = 1/3, r2 = 2/3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdiff.paths import VE, CondOT, affine_coefficients, get_path
from fastdiff.sampling.core.arguments import T_MIN_SINGULAR, is_number, sample_seeds
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import noise_level

OPTIONS = dict(order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81)


@dataclass
class AdaptiveInfo:
    """Per-sample counts of one adaptive call ([B] int64 tensors on the samples' device)."""

    nfe: torch.Tensor  # model evaluations the sample used
    n_accept: torch.Tensor
    n_reject: torch.Tensor
    iterations: int  # iterations in which some sample moved (the most any sample needed: k-diffusion's steps)
    model_rows: int  # samples x evaluations the model computed, finished samples waiting for the next check included


def time_of_lambda(path, lam: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Flow times (float64) whose lambda = log(alpha / beta) is ``lam``: closed form on CondOT (sigmoid) and VE, else
    a bisection on the device between lo and hi (lambda increases in t)."""
    if type(path) is CondOT:
        return torch.sigmoid(lam).clamp(lo, hi)
    if type(path) is VE:
        return (1.0 - torch.exp(-lam) / path.sigma_max).clamp(lo, hi)
    a = torch.full_like(lam, lo)
    b = torch.full_like(lam, hi)
    for _ in range(64):  # float64 to ~1e-19 of [lo, hi]
        mid = 0.5 * (a + b)
        al, be = path.coefficients(mid)[:2]
        below = torch.log(al / be) < lam
        a, b = torch.where(below, mid, a), torch.where(below, b, mid)
    return 0.5 * (a + b)


def _check_options(opts: dict, eta, s_noise) -> dict:
    order = opts["order"]
    if order not in (2, 3) or isinstance(order, bool):
        raise ValueError(f"order must be 2 or 3 for method='dpm_adaptive', got {order!r}")
    for name in ("rtol", "atol", "h_init", "accept_safety"):
        v = opts[name]
        if not is_number(v) or not 0 < v < math.inf:
            raise ValueError(f"{name} must be a finite number > 0 for method='dpm_adaptive', got {v!r}")
    for name in ("pcoeff", "icoeff", "dcoeff"):
        if not is_number(opts[name]) or not math.isfinite(opts[name]):
            raise ValueError(f"{name} must be a finite number for method='dpm_adaptive', got {opts[name]!r}")
    if not is_number(eta) or not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 for method='dpm_adaptive', got {eta!r}")
    if not is_number(s_noise) or not 0 <= s_noise < math.inf:
        raise ValueError(f"s_noise must be a finite number >= 0, got {s_noise!r}")
    return {k: float(v) if k != "order" else int(v) for k, v in opts.items()}


class _Evaluator:
    """eps at each sample's own flow time: model(x, t, y) converted, with classifier-free guidance."""

    def __init__(self, model, path, prediction, cfg, y, null_y):
        self.model, self.path, self.prediction, self.cfg = model, path, prediction, float(cfg)
        self.y, self.null_y = y, null_y

    def __call__(self, x, t64, keep):
        t = t64.float()
        y = None if self.y is None else self.y[keep]
        if self.cfg == 1.0:
            g = self.model(x, t, y)
        else:  # null_y: one label for all, or one per sample
            null = torch.as_tensor(self.null_y, dtype=y.dtype, device=y.device)
            null = null[keep] if null.dim() and null.shape[0] == self.y.shape[0] else null.expand_as(y)
            both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
            cond, uncond = both.chunk(2)
            g = uncond + self.cfg * (cond - uncond)
        a, b = affine_coefficients(self.path, t64, self.prediction, "eps")
        view = (-1,) + (1,) * (x.dim() - 1)
        return (a.view(view) * x.double() + b.view(view) * g.double())


def dpm_adaptive(model, cfg: float = 1.0, *, shape=None, y=None, null_y=None, seed=0, noise=None, path="condot",
                 prediction="velocity", timesteps=None, batch_size=None, device=None, eta: float = 0.0,
                 s_noise: float = 1.0, check_every: int = 4, max_iterations: int = 10000, return_info: bool = False,
                 progress: bool = False, check_finite: bool = True, **options):
    """Sample with per-sample adaptive DPM-Solver steps from the first to the last nonzero noise level of
    ``timesteps`` (the grid's ends are all it reads; default t = 0 to 1 - 1e-3; a first time where alpha = 0 moves to
    T_MIN_SINGULAR = 1e-3, as fastdiff's grids do where a conversion is singular), k-diffusion's options
    (order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0, icoeff=1, dcoeff=0, accept_safety=0.81, eta, s_noise).
    Returns the samples [B, *shape] at the last level (not denoised, as k-diffusion's), and with ``return_info`` an
    :class:`AdaptiveInfo` of each sample's evaluations. ``progress``: a bar of finished samples (updated at the
    checks); ``check_finite``: fail naming the iteration when a sample's state is not finite (read at the checks).
    fastdiff.sample(method="dpm_adaptive", ...) calls this."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"method='dpm_adaptive' takes {', '.join(OPTIONS)}, eta, s_noise, not {', '.join(unknown)}")
    opts = _check_options({**OPTIONS, **options}, eta, s_noise)
    path = get_path(path)
    grid = [0.0, 1.0 - T_MIN_SINGULAR] if timesteps is None else [float(t) for t in timesteps]
    if math.isinf(noise_level(path, grid[0])):  # alpha = 0 (a flow model's t = 0): no log sigma there
        grid[0] = max(grid[0], T_MIN_SINGULAR)
    top, bottom = noise_level(path, grid[0]), noise_level(path, grid[-1])
    if bottom == 0.0 and len(grid) > 2:
        bottom = noise_level(path, grid[-2])
    if not (math.isfinite(top) and 0 < bottom < top):
        raise ValueError(f"method='dpm_adaptive' integrates in log sigma between the grid's first and last nonzero "
                         f"noise levels, which must be finite with 0 < sigma_min < sigma_max; got sigma_max={top:g}, "
                         f"sigma_min={bottom:g} (timesteps={grid})")
    if noise is not None:
        x = noise.detach().float().clone()
        B = x.shape[0]
    else:
        B = batch_size if batch_size is not None else (y.shape[0] if isinstance(y, torch.Tensor) else None)
        if B is None or shape is None:
            raise ValueError("method='dpm_adaptive' needs noise, or shape with batch_size (or a y batch)")
        dev = torch.device(device) if device is not None else (y.device if isinstance(y, torch.Tensor) else "cpu")
        from fastdiff import ops

        x = ops.randn(sample_seeds(seed, B, dev), 0, tuple(shape)) * path.coefficients(grid[0])[1]
    dev = x.device
    seeds = sample_seeds(seed, B, dev)
    if cfg != 1.0 and (y is None or null_y is None):
        raise ValueError("cfg != 1 needs y and null_y")
    evaluate = _Evaluator(model, path, prediction, cfg, y, null_y)
    lam_start, lam_end = -math.log(top), -math.log(bottom)
    lo, hi = grid[0], grid[-1]
    order = opts["order"]
    b1 = (opts["pcoeff"] + opts["icoeff"] + opts["dcoeff"]) / (1.5 if eta else order)
    b2 = -(opts["pcoeff"] + 2 * opts["dcoeff"]) / (1.5 if eta else order)
    b3 = opts["dcoeff"] / (1.5 if eta else order)
    f64 = dict(dtype=torch.float64, device=dev)
    s = torch.full((B,), lam_start, **f64)
    h = torch.full((B,), opts["h_init"], **f64)
    errs = torch.zeros((B, 3), **f64)  # the PID history (inverse errors), set at the first proposal
    fresh = torch.ones(B, dtype=torch.bool, device=dev)
    view = (-1,) + (1,) * (x.dim() - 1)
    alpha0 = path.coefficients(torch.full((B,), lo, **f64))[0]
    yst = x.double() / alpha0.view(view)  # the scaled state y = x / alpha
    y_prev = yst.clone()
    nfe = torch.zeros(B, dtype=torch.int64, device=dev)
    n_acc, n_rej = torch.zeros_like(nfe), torch.zeros_like(nfe)
    out = torch.empty_like(x)
    idx = torch.arange(B, device=dev)  # the samples still in the batch
    numel = math.prod(x.shape[1:])
    sig = lambda lam: torch.exp(-lam)  # noqa: E731
    if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=B, desc="fastdiff dpm_adaptive", unit="sample")
    it = rows = 0
    moved = torch.zeros((), dtype=torch.int64, device=dev)  # iterations with an unfinished sample (read at the end)
    while idx.numel():
        if it >= max_iterations:
            raise RuntimeError(f"method='dpm_adaptive': {idx.numel()} samples did not reach the end in "
                               f"{max_iterations} iterations (rtol={opts['rtol']}, atol={opts['atol']})")
        active = s < lam_end - 1e-5
        t_next = torch.minimum(torch.full_like(s, lam_end), s + h)
        lam_to, su = t_next, torch.zeros_like(s)
        if eta:
            sd_, s_next = sig(t_next), sig(t_next)
            up = torch.minimum(s_next, eta * torch.sqrt(torch.clamp(s_next ** 2 * (sig(s) ** 2 - s_next ** 2)
                                                                     / sig(s) ** 2, min=0.0)))
            sd_ = torch.sqrt(torch.clamp(s_next ** 2 - up ** 2, min=0.0))
            lam_to = torch.minimum(torch.full_like(s, lam_end), -torch.log(sd_))
            su = torch.sqrt(torch.clamp(s_next ** 2 - sig(lam_to) ** 2, min=0.0))
        hh = lam_to - s

        def eps_at(lam, ystate):
            t = time_of_lambda(path, lam, lo, hi)
            al = path.coefficients(t)[0]
            return evaluate((ystate * al.view(view)).float(), t, idx)

        def v(z):
            return z.view(view)

        e0 = eps_at(s, yst)
        r1 = 1.0 / 3.0 if order == 3 else 0.5
        s1 = s + r1 * hh
        u1 = yst - v(sig(s1) * torch.expm1(r1 * hh)) * e0
        e1 = eps_at(s1, u1)
        E = torch.expm1(hh)
        two = yst - v(sig(lam_to) * E) * e0 - v(sig(lam_to) / (2 * r1) * E) * (e1 - e0)
        if order == 2:
            low, high = yst - v(sig(lam_to) * E) * e0, two
        else:
            s2 = s + (2.0 / 3.0) * hh
            e2h = torch.expm1((2.0 / 3.0) * hh)
            u2 = yst - v(sig(s2) * e2h) * e0 - v(sig(s2) * 2.0 * (e2h / ((2.0 / 3.0) * hh) - 1)) * (e1 - e0)
            e2 = eps_at(s2, u2)
            low = two
            high = yst - v(sig(lam_to) * E) * e0 - v(sig(lam_to) * 1.5 * (E / hh - 1)) * (e2 - e0)
        delta = torch.maximum(torch.full_like(low, opts["atol"]), opts["rtol"] * torch.maximum(low.abs(), y_prev.abs()))
        error = ((low - high) / delta).flatten(1).norm(dim=1) / math.sqrt(numel)
        inv = 1.0 / (error + 1e-8)
        errs = torch.where(fresh[:, None], inv[:, None].expand(-1, 3), errs)
        fresh = torch.zeros_like(fresh)
        errs[:, 0] = inv
        factor = 1.0 + torch.atan(errs[:, 0] ** b1 * errs[:, 1] ** b2 * errs[:, 2] ** b3 - 1.0)
        accept = (factor >= opts["accept_safety"]) & active
        errs = torch.where(accept[:, None], torch.stack([errs[:, 0], errs[:, 0], errs[:, 1]], 1), errs)
        h = torch.where(active, h * factor, h)
        if eta:
            from fastdiff import ops

            xi = ops.randn(seeds[idx], 1 + it, tuple(x.shape[1:])).double()
            high = high + v(su * s_noise) * xi
        y_prev = torch.where(v(accept), low, y_prev)
        yst = torch.where(v(accept), high, yst)
        s = torch.where(accept, t_next, s)
        rows += idx.numel() * order
        nfe[idx] += active.long() * order
        n_acc[idx] += accept.long()
        n_rej[idx] += (active & ~accept).long()
        moved += active.any()
        it += 1
        if it % check_every == 0 or not bool(active.any()):
            done = s >= lam_end - 1e-5
            if check_finite and not bool(torch.isfinite(yst).all()):
                bad = idx[~torch.isfinite(yst).flatten(1).all(1)].tolist()
                raise ValueError(f"method='dpm_adaptive': the state of samples {bad[:8]} is not finite after "
                                 f"iteration {it} (the model returned inf / NaN, or the steps diverged)")
            if bar is not None:
                bar.update(int(done.sum()))
            if bool(done.any()):  # one host read per check_every iterations
                t_end = torch.full((int(done.sum()),), grid[-1] if noise_level(path, grid[-1]) > 0 else grid[-2],
                                   **f64)
                out[idx[done]] = (yst[done] * v(path.coefficients(t_end)[0])).float()
                keep = ~done
                idx, s, h, errs, yst, y_prev = idx[keep], s[keep], h[keep], errs[keep], yst[keep], y_prev[keep]
                fresh = fresh[keep]
    if bar is not None:
        bar.close()
    info = AdaptiveInfo(nfe, n_acc, n_rej, int(moved), rows)
    return (out, info) if return_info else out


# sample()'s arguments a per-sample adaptive call takes (the rest must keep their defaults)
_TAKES = {"shape", "y", "null_y", "seed", "noise", "path", "prediction", "method", "eta", "timesteps", "schedule",
          "batch_size", "device", "s_noise", "check_every", "max_iterations", "return_info", "progress", "check_finite",
          *OPTIONS}
# accepted and without effect: the loop runs torch ops on the samples' device, whatever the fused step's backend
_IGNORED = {"backend"}
# values that mean "not used" besides sample()'s defaults (the command line passes its own), and arguments that only
# matter with another one (snr: the corrector's)
_ALSO_NEUTRAL = {"guidance": ("cfg",), "sigma": (None, 0), "dynamic_thresholding": (False,), "step_noise": ()}
_UNUSED = {"snr"}


def run(model, steps, cfg, defaults: dict, **kwargs):
    """sample(method="dpm_adaptive", ...) with sample()'s ``defaults``: the grid that steps / timesteps / schedule make
    gives the ends (its first time and its last nonzero noise level, as ComfyUI reads them; neither given: t = 0 to
    1 - 1e-3); the arguments of a stage table's features are refused unless they keep their defaults."""
    from fastdiff.sampling.core.arguments import time_grid

    for name, value in kwargs.items():
        if name in _TAKES or name in _IGNORED:
            continue
        if name not in defaults:
            raise TypeError(f"method='dpm_adaptive' takes {', '.join(OPTIONS)}, eta, s_noise, check_every, "
                            f"max_iterations, return_info, not {name}")
        neutral = (defaults[name], *_ALSO_NEUTRAL.get(name, ()))
        if name not in _UNUSED and not any(value is v or (type(value) is type(v) and value == v) for v in neutral):
            raise ValueError(f"{name} does not apply to method='dpm_adaptive', which chooses each sample's steps "
                             "while it samples (it takes y / null_y / cfg, seeds, noise, the path and prediction, "
                             "the grid's ends and its own options)")
    path = get_path(kwargs.get("path", "condot"))
    prediction = kwargs.get("prediction", "velocity")
    if kwargs.get("timesteps") is None and kwargs.get("schedule") is None:  # steps have no meaning here
        grid = [0.0, 1.0 - T_MIN_SINGULAR]
    else:
        grid = time_grid(steps, kwargs.get("timesteps"), path, prediction, ("x0", "eps"),
                         schedule=kwargs.get("schedule"))
    given = {k: v for k, v in kwargs.items()
             if k in _TAKES and k not in ("method", "timesteps", "schedule", "path") and v is not None}
    return dpm_adaptive(model, cfg, path=path, timesteps=grid, **given)


def _not_a_table(path, grid, prediction, **_):
    raise ValueError("method='dpm_adaptive' chooses its steps while it samples: it has no stage table "
                     "(fastdiff.sample runs it; fastdiff.sampling.methods.dpm_adaptive.dpm_adaptive)")


register_method("dpm_adaptive", options={**OPTIONS, "eta": 0.0, "s_noise": 1.0}, evals_per_step=3,
                conversions=("x0", "eps"), run=run,
                description="k-diffusion's DPM-Solver-12/23 with PID step-size control, each sample its own step "
                            "size (accepts and rejects on the device, finished samples leave the batch)")(_not_a_table)
