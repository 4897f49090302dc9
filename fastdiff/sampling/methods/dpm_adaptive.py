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

are fused sampler_step calls with per-sample coefficient rows (the state x unscaled in float32, E = a x + b g the eps
conversion at each evaluation's time, CFG's two branches blended inside the call): the second evaluation's input with
E_0 as side output, the third's with E_1, then y_high with y_low as side output; the accept is one more in-place call
(x = accept alpha' (y_high + s_noise su xi) + (1 - accept) x, y_prev likewise). The error norm and the controller are
[B]-sized torch ops. 16.8 ms per iteration at 2^20 elements against 37.5 ms for the loop as float64 torch ops (AMD
EPYC, 2 threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdiff.paths import VE, CondOT, affine_coefficients, get_path
from fastdiff.sampling.core.arguments import T_MIN_SINGULAR, is_number, sample_seeds
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import noise_level

# k-diffusion's options and defaults, and h_max: the largest step in lambda = -log sigma (scipy's max_step; inf, no
# cap, is k-diffusion's controller). A sample alone has no other samples' errors in its norm: over a stretch where its
# embedded pair agrees (a narrow class's prediction barely moves until sigma nears its width) the atan limiter grows h
# up to 2.57x a step, and one step of h ~ 4 then crosses the class's transition with an estimate that misses it
# (VE, sigma 0.31 -> 0.0035, error 1.5: accepted). A batch's one norm is dominated by whichever samples are changing,
# which caps every sample's step for it. h_max = 1 (sigma falls at most e-fold a step) restores that per sample:
# docs/sampling.md, "Adaptive steps per sample".
OPTIONS = dict(order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
               h_max=math.inf)


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
    h_max = opts["h_max"]
    if not is_number(h_max) or not h_max > 0:  # NaN too; inf: no cap
        raise ValueError(f"h_max must be a number > 0 (inf: no cap) for method='dpm_adaptive', got {h_max!r}")
    for name in ("pcoeff", "icoeff", "dcoeff"):
        if not is_number(opts[name]) or not math.isfinite(opts[name]):
            raise ValueError(f"{name} must be a finite number for method='dpm_adaptive', got {opts[name]!r}")
    if not is_number(eta) or not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 for method='dpm_adaptive', got {eta!r}")
    if not is_number(s_noise) or not 0 <= s_noise < math.inf:
        raise ValueError(f"s_noise must be a finite number >= 0, got {s_noise!r}")
    return {k: float(v) if k != "order" else int(v) for k, v in opts.items()}


class _Evaluator:
    """The model at each sample's own flow time: its branches (conditional, then unconditional under CFG) and their
    weights in the fused step's blend, g = w_c p_c + w_u p_u."""

    def __init__(self, model, cfg, y, null_y):
        self.model, self.cfg, self.y, self.null_y = model, float(cfg), y, null_y
        self.weights = (1.0,) if self.cfg == 1.0 else (self.cfg, 1.0 - self.cfg)

    def __call__(self, x, t64, keep) -> list:
        t = t64.float()
        y = None if self.y is None else self.y[keep]
        if self.cfg == 1.0:
            return [self.model(x, t, y).contiguous()]
        null = torch.as_tensor(self.null_y, dtype=y.dtype, device=y.device)  # one label for all, or one per sample
        null = null[keep] if null.dim() and null.shape[0] == self.y.shape[0] else null.expand_as(y)
        cond, uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return [cond.contiguous(), uncond.contiguous()]


def _ancestral(s, lam_next, lam_end, eta):
    """(lambda the step goes to, the noise scale su): k-diffusion's ancestral split of the step s -> lam_next
    (sigma_down not below the end's level), or (lam_next, 0) at eta = 0."""
    if not eta:
        return lam_next, torch.zeros_like(s)
    sig, sig_next = torch.exp(-s), torch.exp(-lam_next)
    up = torch.minimum(sig_next, eta * torch.sqrt(torch.clamp(sig_next ** 2 * (sig ** 2 - sig_next ** 2) / sig ** 2,
                                                              min=0.0)))
    down = torch.sqrt(torch.clamp(sig_next ** 2 - up ** 2, min=0.0))
    lam_to = torch.minimum(torch.full_like(s, lam_end), -torch.log(down))
    return lam_to, torch.sqrt(torch.clamp(sig_next ** 2 - torch.exp(-2 * lam_to), min=0.0))


class _Step:
    """One iteration's per-sample coefficient rows (float32 [B, 2M], fastdiff.ops.sampler_step's layout) of the embedded
    DPM-Solver pair from lambda = s to lam_to, the state x unscaled at flow time t_now, E = a x + b g the eps
    conversion at each evaluation."""

    def __init__(self, path, prediction, lo, hi, s, lam_to, t_now, order, r1):
        # a finished sample (h = 0) still passes through the calls, its result discarded: a finite stand-in step keeps
        # 0/0 out of its rows (0 x NaN would leak through the accept pass's zero weight)
        hh = torch.where(lam_to > s, lam_to - s, torch.ones_like(s))
        lam_to = s + hh
        self.t0 = t_now
        self.t1 = time_of_lambda(path, s + r1 * hh, lo, hi)
        self.t2 = time_of_lambda(path, s + (2.0 / 3.0) * hh, lo, hi) if order == 3 else None
        self.al0, self.al1 = path.coefficients(self.t0)[0], path.coefficients(self.t1)[0]
        self.a0, self.b0 = affine_coefficients(path, self.t0, prediction, "eps")
        self.a1, self.b1 = affine_coefficients(path, self.t1, prediction, "eps")
        self.sig_to, self.E, self.hh, self.r1, self.order = torch.exp(-lam_to), torch.expm1(hh), hh, r1, order
        self.c1 = -torch.exp(-(s + r1 * hh)) * torch.expm1(r1 * hh)  # u_1 = y + c1 E_0
        if order == 3:
            self.al2 = path.coefficients(self.t2)[0]
            self.a2, self.b2 = affine_coefficients(path, self.t2, prediction, "eps")
            s2, e2h = torch.exp(-(s + (2.0 / 3.0) * hh)), torch.expm1((2.0 / 3.0) * hh)
            self.d2 = (2.0 / 3.0) / r1 * s2 * (e2h / ((2.0 / 3.0) * hh) - 1.0)  # u_2 = y - s2 e2h E_0 - d2 (E_1 - E_0)
            self.k2 = s2 * e2h

    @staticmethod
    def _rows(*columns):
        return torch.stack([c if isinstance(c, torch.Tensor) else torch.full_like(columns[0], c) for c in columns],
                           1).float().contiguous()

    def rows_u1(self):
        """out: the second evaluation's input alpha_1 u_1; side: E_0."""
        c = self.al1 * self.c1
        return self._rows(self.al1 / self.al0 + c * self.a0, c * self.b0, self.a0, self.b0)

    def rows_u2(self):
        """(input u_1, history x, E_0) out: alpha_2 u_2; side: E_1."""
        k = -self.al2 * self.d2
        return self._rows(k * self.a1, k * self.b1, self.al2 / self.al0, self.al2 * (self.d2 - self.k2),
                          self.a1, self.b1, 0.0, 0.0)

    def rows_final(self):
        """out: y_high; side: y_low (scaled states y = x / alpha): order 2 (input u_1; history x, E_0), order 3 (input
        u_2; history x, E_0, E_1)."""
        first = self.sig_to * self.E  # y - sigma' expm1(h) E_0
        two = self.sig_to / (2 * self.r1) * self.E  # the second-order term's weight on (E_1 - E_0)
        if self.order == 2:  # high: DPM-Solver-2 (from E_1 at the input), low: DPM-Solver-1
            return self._rows(-two * self.a1, -two * self.b1, 1.0 / self.al0, two - first,
                              0.0, 0.0, 1.0 / self.al0, -first)
        k3 = 1.5 * self.sig_to * (self.E / self.hh - 1.0)  # DPM-Solver-3's weight on (E_2 - E_0)
        return self._rows(-k3 * self.a2, -k3 * self.b2, 1.0 / self.al0, k3 - first, 0.0,
                          0.0, 0.0, 1.0 / self.al0, two - first, -two)


class _Fused:
    """fastdiff.ops.sampler_step with per-sample rows on the call's backend: out and side written in place."""

    def __init__(self, weights, seeds, backend):
        self.weights, self.seeds, self.backend = weights, seeds, backend

    def __call__(self, x, preds, history, rows, out, side, streams=(), weights=None):
        from fastdiff.ops import sampler_step

        sampler_step(x, preds, weights=weights or self.weights, history=history, coeffs=rows, seeds=self.seeds,
                     streams=streams, outs=[out], side=side, backend=self.backend)


def dpm_adaptive(model, cfg: float = 1.0, *, shape=None, y=None, null_y=None, seed=0, noise=None, path="condot",
                 prediction="velocity", timesteps=None, batch_size=None, device=None, eta: float = 0.0,
                 s_noise: float = 1.0, check_every: int = 4, max_iterations: int = 10000, return_info: bool = False,
                 progress: bool = False, check_finite: bool = True, backend=None, **options):
    """Sample with per-sample adaptive DPM-Solver steps from the first to the last nonzero noise level of
    ``timesteps`` (the grid's ends are all it reads; default t = 0 to 1 - 1e-3; a first time where alpha = 0 moves to
    T_MIN_SINGULAR = 1e-3, as fastdiff's grids do where a conversion is singular), k-diffusion's options
    (order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0, icoeff=1, dcoeff=0, accept_safety=0.81, eta, s_noise) and
    ``h_max``, the largest step in log sigma (default inf, k-diffusion's; 1 for batches: see OPTIONS).
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
    evaluate = _Evaluator(model, cfg, y, null_y)
    lam_start, lam_end = -math.log(top), -math.log(bottom)
    lo, hi = grid[0], grid[-1]
    order = opts["order"]
    r1 = 1.0 / 3.0 if order == 3 else 0.5
    b1 = (opts["pcoeff"] + opts["icoeff"] + opts["dcoeff"]) / (1.5 if eta else order)
    b2 = -(opts["pcoeff"] + 2 * opts["dcoeff"]) / (1.5 if eta else order)
    b3 = opts["dcoeff"] / (1.5 if eta else order)
    f64 = dict(dtype=torch.float64, device=dev)
    s = torch.full((B,), lam_start, **f64)
    for name, value in (("check_every", check_every), ("max_iterations", max_iterations)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    h_max = opts["h_max"]
    if math.ceil((lam_end - lam_start) / h_max) > max_iterations:  # fail now, not after max_iterations
        raise ValueError(f"h_max={h_max:g} needs at least {math.ceil((lam_end - lam_start) / h_max)} steps from "
                         f"sigma_max={top:g} to sigma_min={bottom:g} (log ratio {lam_end - lam_start:.4g}), more than "
                         f"max_iterations={max_iterations}: raise h_max or max_iterations")
    h = torch.full((B,), min(opts["h_init"], h_max), **f64)
    errs = torch.zeros((B, 3), **f64)  # the PID history (inverse errors), set at the first proposal
    fresh = torch.ones(B, dtype=torch.bool, device=dev)
    t_now = torch.full((B,), lo, **f64)  # each sample's flow time (the state x is unscaled, at t_now)
    x = x.float().contiguous()
    y_prev = (x.double() / path.coefficients(t_now)[0].view((-1,) + (1,) * (x.dim() - 1))).float()  # y = x / alpha
    nfe = torch.zeros(B, dtype=torch.int64, device=dev)
    n_acc, n_rej = torch.zeros_like(nfe), torch.zeros_like(nfe)
    out = torch.empty_like(x)
    idx = torch.arange(B, device=dev)  # the samples still in the batch
    numel = math.prod(x.shape[1:])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=B, desc="fastdiff dpm_adaptive", unit="sample")
    it = rows = 0
    buf = None
    moved = torch.zeros((), dtype=torch.int64, device=dev)  # iterations with an unfinished sample (read at the end)
    while idx.numel():
        if it >= max_iterations:
            raise RuntimeError(f"method='dpm_adaptive': {idx.numel()} samples did not reach the end in "
                               f"{max_iterations} iterations (rtol={opts['rtol']}, atol={opts['atol']}, "
                               f"h_max={opts['h_max']:g})")
        active = s < lam_end - 1e-5
        lam_next = torch.minimum(torch.full_like(s, lam_end), s + h)
        lam_to, su = _ancestral(s, lam_next, lam_end, eta)
        step = _Step(path, prediction, lo, hi, s, lam_to, t_now, order, r1)
        g0 = evaluate(x, step.t0, idx)
        if buf is None or buf["u1"].shape != x.shape:  # the step's buffers, new only when the batch shrinks
            buf = {name: torch.empty_like(x) for name in ("u1", "e0", "u2", "e1", "high", "low")}
        fused = _Fused(evaluate.weights, seeds[idx], backend)
        fused(x, g0, [], step.rows_u1(), buf["u1"], buf["e0"])
        g1 = evaluate(buf["u1"], step.t1, idx)
        if order == 2:
            fused(buf["u1"], g1, [x, buf["e0"]], step.rows_final(), buf["high"], buf["low"])
        else:
            fused(buf["u1"], g1, [x, buf["e0"]], step.rows_u2(), buf["u2"], buf["e1"])
            g2 = evaluate(buf["u2"], step.t2, idx)
            fused(buf["u2"], g2, [x, buf["e0"], buf["e1"]], step.rows_final(), buf["high"], buf["low"])
        low, high = buf["low"], buf["high"]
        delta = torch.clamp(opts["rtol"] * torch.maximum(low.abs(), y_prev.abs()), min=opts["atol"])
        error = ((low - high) / delta).flatten(1).norm(dim=1).double() / math.sqrt(numel)
        inv = 1.0 / (error + 1e-8)
        errs = torch.where(fresh[:, None], inv[:, None].expand(-1, 3), errs)
        fresh = torch.zeros_like(fresh)
        errs[:, 0] = inv
        factor = 1.0 + torch.atan(errs[:, 0] ** b1 * errs[:, 1] ** b2 * errs[:, 2] ** b3 - 1.0)
        accept = (factor >= opts["accept_safety"]) & active
        errs = torch.where(accept[:, None], torch.stack([errs[:, 0], errs[:, 0], errs[:, 1]], 1), errs)
        h = torch.where(active, h * factor, h)
        if h_max < math.inf:
            h = h.clamp(max=h_max)
        # accepted: x = alpha_next (y_high + s_noise su xi) at the step's end, y_prev = y_low; else both kept
        t_new = torch.where(accept, time_of_lambda(path, lam_next, lo, hi), t_now)
        acc = accept.double()
        al_new = path.coefficients(t_new)[0]
        draw = (acc * al_new * su * s_noise,) if eta else ()  # eta = 0: no draw at all
        rows_accept = _Step._rows(acc * al_new, 0.0, 1.0 - acc, 0.0, 0.0, *draw,
                                  0.0, 0.0, 0.0, acc, 1.0 - acc, *(0.0,) * len(draw))
        # one pass, in place: x (out, read as history 0) and y_prev (side, read as history 2)
        fused(high, [high], [x, low, y_prev], rows_accept, x, y_prev, streams=[1 + it] if eta else [],
              weights=(1.0,))
        s = torch.where(accept, lam_next, s)
        t_now = t_new
        rows += idx.numel() * order
        nfe[idx] += active.long() * order
        n_acc[idx] += accept.long()
        n_rej[idx] += (active & ~accept).long()
        moved += active.any()
        it += 1
        if it % check_every == 0:  # the one host read of check_every iterations: finished and non-finite counts
            done = s >= lam_end - 1e-5
            bad = ~torch.isfinite(x).flatten(1).all(1) if check_finite else torch.zeros_like(done)
            n_done, n_bad = torch.stack([done.sum(), bad.sum()]).tolist()
            if n_bad:
                raise ValueError(f"method='dpm_adaptive': the state of samples {idx[bad].tolist()[:8]} is not finite "
                                 f"after iteration {it} (the model returned inf / NaN, or the steps diverged)")
            if bar is not None:
                bar.update(n_done)
            if n_done:
                out[idx[done]] = x[done]
                keep = ~done
                idx, s, h, errs, t_now, fresh = idx[keep], s[keep], h[keep], errs[keep], t_now[keep], fresh[keep]
                x, y_prev = x[keep].contiguous(), y_prev[keep].contiguous()
    if bar is not None:
        bar.close()
    info = AdaptiveInfo(nfe, n_acc, n_rej, int(moved), rows)
    return (out, info) if return_info else out


# sample()'s arguments a per-sample adaptive call takes (the rest must keep their defaults)
_TAKES = {"shape", "y", "null_y", "seed", "noise", "path", "prediction", "method", "eta", "timesteps", "schedule",
          "batch_size", "device", "s_noise", "check_every", "max_iterations", "return_info", "progress", "check_finite",
          "backend", *OPTIONS}
_IGNORED: set = set()
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
