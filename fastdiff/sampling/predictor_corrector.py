"""Score-based sampling in ``fastdiff.sample`` (docs/score_based.md): annealed Langevin dynamics (NCSN),
score_sde's reverse-diffusion predictor and Langevin corrector steps around any method.

- ``method="annealed_langevin"`` (Song & Ermon 2019, Algorithm 1): at each of the grid's first ``steps``
  times t_i (the noise levels, most noise first), ``n_steps_each`` Langevin steps on the marginal p_{t_i}

      x ← x + (a_i / 2) s(x, t_i) + sqrt(a_i) ξ,        a_i = step_lr · β_i² / β_L²

  (β_L: the last level's; on the VE path β = σ, NCSN's α_i = ε σ_i² / σ_L²); then, with ``denoise``, one
  Tweedie step x ← x0(x, t_L) (NCSNv2's final denoising). The last grid time only closes the grid.
- ``method="reverse_diffusion"`` (score_sde's ReverseDiffusionPredictor, on any path): the path's forward
  transition from t' to t is x_t = r x_t' + sqrt(v) n with r = α_t / α_t', v = β_t² − r² β_t'²; the reverse
  step of its discretized SDE is

      x' = (2 − r) x + v s(x, t) + sqrt(v) ξ

  (VE: x + (σ² − σ'²) s + sqrt(σ² − σ'²) ξ; VP on its own grid: score_sde's DDPM form). The last step
  returns its mean, as score_sde does with denoise=True.
- ``corrector_steps=n, snr=r`` (score_sde's LangevinCorrector): before each step's predictor, n Langevin
  steps at t_i with the step size of the signal-to-noise rule, per sample:

      ε_b = 2 (r ‖ξ_b‖ / ‖s_b‖)²,   x ← x + ε_b s + sqrt(2 ε_b) ξ

  The norms come from one reduction pass over (x, the branch predictions, ξ) (fastdiff.ops.sample_gram),
  the step is the fused step with per-sample coefficient rows: no host synchronization. score_sde takes
  the batch means of the norms (a sample then depends on its batch) and, on VP paths, scales ε by the
  discrete α_i = 1 − β_i (≈ 1); fastdiff uses each sample's own norms and 1 on every path, so a sample is
  the same in any batch. With one sample per batch on the VE path the two agree.

Langevin step j at grid point i draws the normal of stream langevin_stream(i, j) (docs/design.md §3).
"""

from __future__ import annotations

import math
import numbers

import torch

from fastdiff import _checks
from fastdiff.ops.sample_gram import sample_gram
from fastdiff.paths import affine_coefficients
from fastdiff.sampling.methods import register_method
from fastdiff.sampling.stage import Stage, draw_stream

LANGEVIN_BASE, LANGEVIN_STEP_BITS, MAX_LANGEVIN_STEPS = 1 << 29, 20, 1 << 9


def langevin_stream(step: int, j: int) -> int:
    """The stream id of Langevin step j at grid point ``step`` (annealed Langevin's steps at a level, the
    corrector's before a step): 2^29 + (j << 20) + step (docs/design.md §3)."""
    if not 0 <= step < 1 << LANGEVIN_STEP_BITS or not 0 <= j < MAX_LANGEVIN_STEPS:
        raise ValueError(f"langevin_stream: step must be in [0, 2^20) and j in [0, 512), got step={step}, j={j}")
    return LANGEVIN_BASE + (j << LANGEVIN_STEP_BITS) + step


def _langevin_steps(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value <= MAX_LANGEVIN_STEPS:
        raise ValueError(f"{name} must be an int in [0, {MAX_LANGEVIN_STEPS}], got {value!r}")
    return int(value)


def _positive(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # '0.1' would fail inside a comparison
        raise TypeError(f"{name} must be a finite number > 0, got {type(value).__name__} {value!r}")
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@register_method("annealed_langevin", options={"n_steps_each": 100, "step_lr": 2e-5, "denoise": True},
                 evals_per_step="n_steps_each", conversions=("score", "x0"),
                 description="NCSN's annealed Langevin dynamics: n_steps_each Langevin steps at each noise level "
                             "(a_i = step_lr β_i² / β_L²), then a Tweedie denoising step")
def _annealed_langevin(path, grid, prediction, n_steps_each=100, step_lr=2e-5, denoise=True) -> list[Stage]:
    denoise = _checks.flag("denoise", denoise)
    n = _langevin_steps("n_steps_each", n_steps_each)
    if n < 1:
        raise ValueError("n_steps_each must be >= 1")
    step_lr = _positive("step_lr", step_lr)
    levels = grid[:-1]
    beta_last = path.coefficients(levels[-1])[1]
    if not beta_last > 0:
        raise ValueError(f"annealed_langevin: the last noise level (t = {levels[-1]}) has no noise (β = 0); "
                         "its levels are the grid's first steps times, the last time only closes the grid")
    stages = []
    for i, t in enumerate(levels):
        a = step_lr * (path.coefficients(t)[1] / beta_last) ** 2
        a_s, b_s = affine_coefficients(path, t, prediction, "score")
        x0 = affine_coefficients(path, t, prediction, "x0")
        for j in range(n):
            last = j == n - 1 and not (denoise and i == len(levels) - 1)
            stages.append(Stage(i, t, "x", "x", 1.0 + 0.5 * a * a_s, 0.5 * a * b_s, c_noise=math.sqrt(a),
                                stream=langevin_stream(i, j), x0=x0, final=last))
    if denoise:  # Tweedie: E[z | x] at the last level
        t = levels[-1]
        x0 = affine_coefficients(path, t, prediction, "x0")
        stages.append(Stage(len(levels) - 1, t, "x", "x", x0[0], x0[1], x0=x0, final=True))
    return stages


@register_method("reverse_diffusion", evals_per_step=1, conversions=("score",),
                 description="score_sde's reverse-diffusion predictor: the reverse of the path's discretized "
                             "forward SDE; the last step returns its mean")
def _reverse_diffusion(path, grid, prediction) -> list[Stage]:
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        (al, be), (al1, be1) = path.coefficients(t)[:2], path.coefficients(t1)[:2]
        r = al / al1
        v = max(0.0, be * be - (r * be1) ** 2)
        a_s, b_s = affine_coefficients(path, t, prediction, "score")
        noise = math.sqrt(v) if i < len(grid) - 2 else 0.0
        stages.append(Stage(i, t, "x", "x", 2.0 - r + v * a_s, v * b_s, c_noise=noise, stream=draw_stream(i),
                            x0=affine_coefficients(path, t, prediction, "x0"), final=True))
    return stages


def correctors(stages: list[Stage], stage_key, corrector_steps, snr, path, grid, prediction, *, per_sample,
               classifier, step_noise) -> tuple[list[Stage], object]:
    """sample()'s corrector options applied: ``corrector_steps`` (checked) Langevin corrector stages at t_i
    before the first stage of each step i, and the stage key extended; the stages unchanged when 0."""
    n = _langevin_steps("corrector_steps", corrector_steps)
    snr = _positive("snr", snr)  # also when unused: a NaN or misspelt snr is a mistake all the same
    if n == 0:
        return stages, stage_key
    for given, what in ((per_sample, "per-sample churn options"), (classifier, "classifier guidance"),
                        (step_noise, "step_noise")):
        if given is not None:  # their terms would ride in the corrector's call, whose rows are its own
            raise ValueError(f"corrector_steps does not combine with {what}")
    out, seen = [], set()
    for st in stages:
        if st.step not in seen:
            seen.add(st.step)
            t = grid[st.step]
            a_s, b_s = affine_coefficients(path, t, prediction, "score")
            x0 = affine_coefficients(path, t, prediction, "x0")
            # host rows (1, 0, 1): placeholders that make the call draw its stream; the rows are per sample
            out += [Stage(st.step, t, "x", "x", 1.0, 0.0, c_noise=1.0, stream=langevin_stream(st.step, j), x0=x0,
                          corrector=(snr, a_s, b_s)) for j in range(n)]
        out.append(st)
    return out, (stage_key, "corrector", n, snr)


def corrector_args(args: tuple, preds: list, st: Stage, backend: str) -> tuple:
    """A corrector stage's kernel arguments (fastdiff.ops.sampler_step.KERNEL_ARGS) with its per-sample rows
    [B, 6]: out = (1 + ε a) x + ε b g + sqrt(2 ε) ξ, g the blend of ``preds``, s = a x + b g, ε from the norms
    of s and ξ."""
    x, seeds, streams, host_w, sample_w = args[0], args[3], args[4], args[5], args[7]
    snr, a, b = st.corrector
    # the pass reads one dtype: float16 / bfloat16 predictions are widened (exactly) next to the float32 state
    terms = [x, *(p if p.dtype == x.dtype else p.to(x.dtype) for p in preds)]
    G = sample_gram(terms, seeds=seeds, streams=streams, backend=backend)  # u = (1, x, p_0.., ξ)
    B, K = x.shape[0], len(preds)
    # s = a x + b g with g = w_0 p_0 + Σ_k w_k (p_k − p_0): p_0's weight is w_0 − Σ_{k≥1} w_k. Host weights
    # fill columns (no host-to-device copy: capturable in a CUDA graph)
    v = torch.zeros(B, K + 3, dtype=torch.float64, device=x.device)
    v[:, 1] = a
    if sample_w is None:
        v[:, 2] = b * (host_w[0] - sum(host_w[1:]))
        for k in range(1, K):
            v[:, 2 + k] = b * host_w[k]
    else:
        w = sample_w.to(torch.float64)
        v[:, 2] = b * (w[:, 0] - w[:, 1:].sum(1))
        v[:, 3:K + 2] = b * w[:, 1:]
    score_sq = torch.einsum("bi,bij,bj->b", v, G, v)
    eps = 2.0 * snr * snr * G[:, -1, -1] / score_sq
    eps = torch.where(score_sq > 0, eps, torch.zeros_like(eps))  # a zero score: no move
    zero = torch.zeros_like(eps)
    rows = torch.stack([1.0 + eps * a, eps * b, (2.0 * eps).sqrt(), zero, zero, zero], 1).to(torch.float32)
    return (*args[:8], rows, *args[9:])
