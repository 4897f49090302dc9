"""Langevin dynamics: samples of any density p from its score s = ∇ log p alone (docs/score_based.md).

    x_{i+1} = x_i + (h/2) s(x_i) + sqrt(h) ξ_i                                   (unadjusted: ULA)

is the Euler–Maruyama step of dX = ½ ∇ log p(X) dt + dW, whose stationary law is p; its bias is O(h).
With the log-density, the Metropolis adjustment (MALA) makes p exactly stationary: the step above is a
proposal x', accepted with probability min(1, p(x') q(x | x') / (p(x) q(x' | x))), q(b | a) =
N(b; a + (h/2) s(a), h I).

Each step is one fused sampler_step (x + (h/2) s + sqrt(h) ξ; step sizes per sample as coefficient rows).
ξ_i of sample b is the spec-v1 normal of (seed_b, draw_stream(i)) and MALA's uniform is Φ of the normal
of (seed_b, draw_stream(i, 1)), element 0 (docs/design.md §3); x_0, when not given, is the normal of stream
0. A chain is thus a function of its seed alone, in any batch. MALA's two proposal densities are
quadratic forms of one per-sample reduction pass (fastdiff.ops.sample_gram) over (x, x', s(x), s(x')), and
its decisions stay on the device: nothing is read back inside the loop.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastdiff import _checks
from fastdiff import dispatch as _dispatch
from fastdiff.ops.randn import randn
from fastdiff.ops.sample_gram import sample_gram
from fastdiff.ops.sampler_step import KERNEL_ARGS, prepare
from fastdiff.sampling.core.arguments import FiniteFlags, sample_seeds
from fastdiff.sampling.core.stage import DRAW_STRIDE, draw_stream


def _positive_int(name, value, low=1):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def step_sizes(step_size, B: int, device) -> torch.Tensor | float:
    """``step_size`` as a float, or as a float64 tensor [B] for one value per sample; each finite and > 0."""
    if isinstance(step_size, bool):
        raise TypeError(f"step_size must be a number or one number per sample, got bool {step_size!r}")
    if isinstance(step_size, numbers.Real):
        if not 0.0 < step_size <= _checks.FLOAT32_MAX:  # the step's coefficients are float32
            raise ValueError(f"step_size must be a finite number > 0 (in float32's range), got {step_size!r}")
        return float(step_size)
    if isinstance(step_size, torch.Tensor):
        h = step_size.detach().to(device=device, dtype=torch.float64)
    elif isinstance(step_size, (list, tuple)):
        for i, v in enumerate(step_size):  # float() would take '0.1' or True
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"step_size[{i}] must be a real number, got {type(v).__name__} {v!r}")
        h = torch.tensor([float(v) for v in step_size], dtype=torch.float64, device=device)
    else:
        raise TypeError(f"step_size must be a number or one number per sample (a list or 1-D tensor), "
                        f"got {type(step_size).__name__}")
    if h.shape != (B,):
        raise ValueError(f"step_size holds {tuple(h.shape)} values; give a number or one per sample ({B})")
    if not bool(((h > 0) & (h <= _checks.FLOAT32_MAX)).all()):  # NaN fails both
        raise ValueError(f"step_size must hold finite numbers > 0, got {h.tolist()}")
    return h


def _start(x0, shape, batch_size, device, seeds_arg):
    if x0 is not None:
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1:
            raise TypeError("x0 must be a floating-point tensor [B, *shape]")
        if shape is not None and tuple(shape) != tuple(x0.shape[1:]):
            raise ValueError(f"shape {tuple(shape)} disagrees with x0's per-sample shape {tuple(x0.shape[1:])}")
        if batch_size is not None and batch_size != x0.shape[0]:
            raise ValueError(f"batch_size={batch_size} disagrees with x0's {x0.shape[0]} samples")
        return x0.shape[0], tuple(x0.shape[1:]), _checks.device_arg("device", device) if device is not None \
            else x0.device
    if shape is None:
        raise ValueError("give x0 (the chains' starting points) or shape (to start from standard normals)")
    shape = _checks.shape_tuple(shape)
    if batch_size is None:  # the number of per-sample seeds (checked: a float or 0-d tensor has no len)
        batch_size = 1 if isinstance(seeds_arg, numbers.Integral) and not isinstance(seeds_arg, bool) else \
            _checks.seeds_tensor(seeds_arg, name="seed").shape[0]
    batch_size = _positive_int("batch_size", batch_size, 0)
    device = _checks.device_arg("device", "cpu" if device is None else device)
    # the chains, their proposals and scores at least: refuse what the device cannot hold (else the OOM killer)
    _checks.check_memory(f"batch_size = {batch_size} chains of shape = {shape}", 16 * batch_size * math.prod(shape),
                         device)
    return batch_size, shape, device


def _evaluate(fn, name, x):
    """fn(x) as a contiguous float32 tensor shaped like x (the kernels' history buffers are float32)."""
    out = fn(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or not out.is_floating_point():
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name}(x) must return a floating-point tensor shaped like x {tuple(x.shape)}, got {got}")
    return out.to(device=x.device, dtype=torch.float32).contiguous()


class _Target:
    """The score and (MALA) the log-density at a batch of points; the score by autograd when not given."""

    def __init__(self, score, log_prob):
        if score is not None and not callable(score):
            raise TypeError(f"score must be a callable x -> ∇ log p(x), got {type(score).__name__}")
        if log_prob is not None and not callable(log_prob):
            raise TypeError(f"log_prob must be a callable x -> log p(x) [B], got {type(log_prob).__name__}")
        if score is None and log_prob is None:
            raise ValueError("give score (∇ log p) or log_prob (log p, differentiable) of the target")
        self.score, self.log_prob = score, log_prob

    def _log_prob(self, x, value):
        if not isinstance(value, torch.Tensor) or value.shape != (x.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"log_prob(x) must return one value per sample, shape ({x.shape[0]},), got {got}")
        return value.detach().to(torch.float64)

    def __call__(self, x, need_log_prob: bool):
        if self.score is not None:
            s = _evaluate(self.score, "score", x)
            return (self._log_prob(x, self.log_prob(x)) if need_log_prob else None), s
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            lp = self.log_prob(xr)
            lp64 = self._log_prob(x, lp)
            # without a graph to x (no_grad, .detach(), a constant) autograd's own error names neither
            (grad,) = torch.autograd.grad(lp.sum(), xr, allow_unused=True) if lp.requires_grad else (None,)
        if grad is None:
            raise ValueError("log_prob(x) does not depend on x through autograd (its output has no gradient "
                             "path to x: computed under torch.no_grad, detached, or constant), so the score "
                             "cannot be taken from it; make log_prob differentiable or give score")
        return (lp64 if need_log_prob else None), grad.to(torch.float32).contiguous()


def _rows(values: list, B: int, device) -> list | torch.Tensor:
    """Coefficient rows: host floats, or a float32 [B, len] tensor where any value is a per-sample tensor."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values]
    cols = [v.to(torch.float32) if isinstance(v, torch.Tensor) else torch.full((B,), float(v), device=device)
            for v in values]
    return torch.stack(cols, 1).contiguous()


@torch.no_grad()
def langevin(score=None, x0: torch.Tensor | None = None, *, steps: int, step_size, shape=None,
             batch_size: int | None = None, log_prob=None, metropolis: bool | None = None, seed=0, burn_in: int = 0,
             thin: int | None = None, return_acceptance: bool = False, progress: bool = False,
             backend: str | None = None, device=None, check_finite: bool = True):
    """Run B Langevin chains targeting the density whose score is ``score`` (or whose log is ``log_prob``).

    Args:
        score: ``score(x)`` → ∇ log p(x), shaped like x [B, *shape] (a model, or an analytic density's
            gradient). None: by autograd of ``log_prob``.
        x0: the chains' starting points [B, *shape] (not modified); default: standard normals (stream 0).
        steps: number of steps.
        step_size: h of x' = x + (h/2) s(x) + sqrt(h) ξ (the lectures' η = h/2 of x + η s + sqrt(2η) ξ), a
            number or one per sample (a list or 1-D tensor of B values).
        shape, batch_size: the chains' per-sample shape and number when x0 is not given (batch_size defaults
            to the number of per-sample seeds, else 1).
        log_prob: ``log_prob(x)`` → log p(x) up to a constant, shape [B]; enables the Metropolis adjustment.
        metropolis: MALA (default: when log_prob is given).
        seed: int (chain b uses seed + b) or per-chain seeds.
        burn_in, thin: with thin = k, return the states after steps burn_in + k, burn_in + 2k, …, steps as a
            tensor [n, B, *shape]; without thin, the last state [B, *shape].
        return_acceptance: MALA: also return each chain's acceptance rate (float64 [B]).
        progress: show a tqdm progress bar. backend: the fused step's backend ("auto", "cpu", "cuda",
            "triton", "reference"; None: the one in force, fastdiff.use_backend / FASTDIFF_BACKEND).
        device: where the chains run (default: x0's, else the CPU).
        check_finite: fail naming the step where the score returned inf/NaN, or (MALA) log_prob NaN or +inf
            (checked on the device, read once after the loop). log_prob −inf (zero density) rejects the proposal.
    """
    metropolis = _checks.optional_flag("metropolis", metropolis)
    return_acceptance = _checks.flag("return_acceptance", return_acceptance)
    progress = _checks.flag("progress", progress)
    check_finite = _checks.flag("check_finite", check_finite)
    steps = _positive_int("steps", steps)
    if steps >= DRAW_STRIDE - 1:
        raise ValueError(f"steps must be < 2^24 - 1 (the noise stream ids of one chain), got {steps}")
    burn_in = _positive_int("burn_in", burn_in, 0)
    if thin is not None:
        thin = _positive_int("thin", thin)
        if burn_in + thin > steps:
            raise ValueError(f"burn_in + thin = {burn_in + thin} exceeds steps = {steps}: no state would be kept")
    elif burn_in:
        raise ValueError("burn_in needs thin (the kept states are every thin-th after burn_in)")
    target = _Target(score, log_prob)
    metropolis = log_prob is not None if metropolis is None else metropolis
    if metropolis and log_prob is None:
        raise ValueError("metropolis=True needs log_prob (the acceptance ratio reads the log-density)")
    if return_acceptance and not metropolis:
        raise ValueError("return_acceptance needs the Metropolis adjustment (give log_prob)")
    if backend is not None:
        _dispatch.check_name(backend)
    B, shape, device = _start(x0, shape, batch_size, device, seed)
    seeds = sample_seeds(seed, B, device)
    h = step_sizes(step_size, B, device)
    step_backend = _dispatch.resolve(device, backend)  # None: use_backend / FASTDIFF_BACKEND, else auto
    step_kernel = _dispatch.kernel(step_backend, "sampler_step")
    if x0 is not None:
        x = x0.detach().to(device=device, dtype=torch.float32, copy=True).contiguous()
    else:
        x = randn(seeds, 0, shape, device=device, backend=step_backend)
    kept = [] if thin is not None else None
    if kept is not None:  # the kept states on top of the chains (_start's check)
        _checks.check_memory(f"thin = {thin} keeps {(steps - burn_in) // thin} states (steps = {steps}, burn_in = "
                             f"{burn_in}) of batch_size = {B} chains of shape = {shape}, which",
                             4 * ((steps - burn_in) // thin) * B * math.prod(shape), device)
    accepted = torch.zeros(B, dtype=torch.float64, device=device) if metropolis else None
    if B == 0 or math.prod(shape) == 0:
        out = x if kept is None else x.new_empty(((steps - burn_in) // thin, *x.shape))
        return (out, accepted) if return_acceptance else out
    finite = FiniteFlags(steps, B, device, check_finite)
    sqrt_h = h.sqrt() if isinstance(h, torch.Tensor) else math.sqrt(h)
    # the proposal (ULA: the step): out = x + (h/2) s + sqrt(h) ξ, written into x (ULA) or x' (MALA)
    proposal = x if not metropolis else torch.empty_like(x)
    rows = _rows([1.0, h / 2, sqrt_h, 0.0, 0.0, 0.0], B, device)
    log_p, s = target(x, metropolis)
    mala = _Metropolis(h, B, device, check_finite) if metropolis else None
    if mala is not None:
        mala.note(log_p, 0)
    call = prepare(x, [s], None, [], rows, seeds, [draw_stream(0)], [proposal], None, finite.row(0))
    args = [call[k] for k in KERNEL_ARGS]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fastdiff langevin" + (" (MALA)" if metropolis else ""), unit="step")
    try:
        for i in range(steps):
            args[1], args[4], args[11] = [s], [draw_stream(i)], finite.row(i)
            step_kernel(*args)
            finite.after(i, steps - 1)
            if metropolis:
                log_p, s = mala(target, x, proposal, s, log_p, seeds, i, accepted, step_backend)
            else:
                s = target(x, False)[1]
            if kept is not None and i + 1 > burn_in and (i + 1 - burn_in) % thin == 0:
                kept.append(x.clone())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    bad, bad_lp, state_ok = -1, -1, True
    if check_finite:  # the one synchronization, after the loop
        # the last state too: a step far too large for the score overflows it after the score's last evaluation
        flags = [torch.isfinite(x).all().long() - 1, finite.first_bad] + ([mala.first_bad] if mala is not None else [])
        state, bad, bad_lp = (torch.stack(flags).tolist() + [-1])[:3]
        state_ok = state == 0
    if not state_ok and bad < 0:
        raise FloatingPointError(f"the chains' state is not finite after {steps} steps although the score stayed "
                                 "finite where it was evaluated: step_size is too large for this score (the step "
                                 "overflows float32)")
    if bad >= 0:
        raise FloatingPointError(f"the score is not finite at step {bad} of the chain; check the score function "
                                 "and step_size")
    if bad_lp >= 0:
        where = "at the chains' starting points" if bad_lp == 0 else f"at the proposal of step {bad_lp - 1}"
        raise FloatingPointError(f"log_prob returned NaN or +inf, or the score was not finite, {where}; MALA's "
                                 "acceptance ratio is then NaN, which rejects every move: check log_prob and the "
                                 "score (log_prob −inf, zero density, is allowed)")
    out = x if kept is None else torch.stack(kept)
    return (out, accepted / steps) if return_acceptance else out


class _Metropolis:
    """MALA's accept/reject for every chain, on the device. The quadratic forms' coefficient vectors depend on
    the step sizes alone: made once, not per step."""

    def __init__(self, h, B: int, device, check_finite: bool):
        self.h = h if isinstance(h, torch.Tensor) else torch.full((B,), h, dtype=torch.float64, device=device)
        self.check_finite = check_finite
        # 0: log_prob was NaN / +inf at the starting points, i + 1: at step i's proposal; -1: never
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        zero, one = torch.zeros_like(self.h), torch.ones_like(self.h)
        # over u = (1, x, x', s(x), s(x')): x' − x − (h/2) s(x) and x − x' − (h/2) s(x')
        self.forward = torch.stack([zero, -one, one, -self.h / 2, zero], 1)
        self.backward = torch.stack([zero, one, -one, zero, -self.h / 2], 1)

    def __call__(self, target, x, proposal, s, log_p, seeds, i, accepted, backend):
        """Accept ``proposal`` where the ratio allows: x updated in place, returns (log_p, s)."""
        log_q, s_q = target(proposal, True)
        G = sample_gram([x, proposal, s, s_q], backend=backend)  # the Gram matrix of (1, x, x', s, s')

        def quad(v):
            return torch.einsum("bi,bij,bj->b", v, G, v)

        log_ratio = log_q - log_p - (quad(self.backward) - quad(self.forward)) / (2 * self.h)
        # a NaN ratio where the proposal has density: the proposal's score was not finite (rejected forever)
        self.note(log_q, i + 1, torch.isnan(log_ratio) & (log_q > -math.inf))
        u = randn(seeds, draw_stream(i, 1), (1,), device=x.device, dtype=torch.float64, backend=backend)[:, 0]
        accept = torch.special.log_ndtr(u) < log_ratio  # u ~ N(0, 1): Φ(u) is uniform; NaN ratios reject
        accepted += accept
        mask = accept.view((x.shape[0],) + (1,) * (x.dim() - 1))
        # torch.where, not a 0/1 blend: a rejected proposal may hold inf/NaN, and 0 · NaN is NaN
        torch.where(mask, proposal, x, out=x)
        return torch.where(accept, log_q, log_p), torch.where(mask, s_q, s)

    def note(self, log_p, k: int, also=None) -> None:
        """Record k as the first bad evaluation when ``log_p`` holds NaN or +inf, or ``also`` holds True (on the
        device, no sync)."""
        if self.check_finite:
            bad = torch.isnan(log_p) | (log_p == math.inf)
            bad = (bad if also is None else bad | also).any()
            self.first_bad.copy_(torch.where((self.first_bad < 0) & bad, k, self.first_bad))
