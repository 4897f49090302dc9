"""Langevin corrector steps around any method (score_sde's LangevinCorrector; docs/score_based.md):
``corrector_steps=n, snr=r`` puts n Langevin steps at t_i before each step's predictor, each sample's step size
from the signal-to-noise rule, ε_b = 2 (r ‖ξ_b‖ / ‖s_b‖)², x ← x + ε_b s + sqrt(2 ε_b) ξ. The norms come from one
reduction pass over (x, the branch predictions, ξ) (fastdiff.ops.sample_gram); the step is the fused step with
per-sample coefficient rows: no host synchronization (fastdiff.sampling.methods.score_based explains how this
differs from score_sde's batch means)."""

from __future__ import annotations

import torch

from fastdiff.ops.sample_gram import sample_gram
from fastdiff.paths import affine_coefficients
from fastdiff.sampling.core.arguments import langevin_steps, positive_number
from fastdiff.sampling.core.stage import Stage, langevin_stream


def correctors(stages: list[Stage], stage_key, corrector_steps, snr, path, grid, prediction, *, per_sample,
               classifier, step_noise) -> tuple[list[Stage], object]:
    """sample()'s corrector options applied: ``corrector_steps`` (checked) Langevin corrector stages at t_i
    before the first stage of each step i, and the stage key extended; the stages unchanged when 0."""
    n = langevin_steps("corrector_steps", corrector_steps)
    snr = positive_number("snr", snr)  # also when unused: a NaN or misspelt snr is a mistake all the same
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
