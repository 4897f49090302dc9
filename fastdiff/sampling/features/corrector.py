"""Langevin corrector steps around any method (score_sde's LangevinCorrector; docs/score_based.md):
``corrector_steps=n, snr=r`` puts n Langevin steps at t_i before each step's predictor, each sample's step size
from the signal-to-noise rule, ε_b = 2 (r ‖ξ_b‖ / ‖s_b‖)², x ← x + ε_b s + sqrt(2 ε_b) ξ. The norms come from one
reduction pass over (x, the branch predictions, ξ) (fastdiff.ops.sample_gram); the step is the fused step with
per-sample coefficient rows: no host synchronization (fastdiff.sampling.methods.score_based explains how this
differs from score_sde's batch means)."""

from __future__ import annotations

import torch

from fastdiff.ops.sample_gram import sample_gram
from fastdiff.ops.step_call import replaced
from fastdiff.paths import affine_coefficients
from fastdiff.sampling.core.arguments import langevin_steps, positive_number
from fastdiff.sampling.core.stage import Stage, langevin_stream


class Correctors:
    """The stage-table transform of ``corrector_steps`` (checked) Langevin corrector stages at t_i before the first
    stage of each step i. Their own draws stay in the kernel with any step_noise (the caller's or Brownian noise
    is the predictor's SDE noise); a feature's history terms (classifier guidance) enter their score
    (Stage.corrector's fourth entry: each history buffer's coefficient in the score)."""

    def __init__(self, n: int, snr: float, path, grid, prediction: str):
        self.n, self.snr, self.path, self.grid, self.prediction = n, snr, path, grid, prediction
        self.key = ("corrector", n, snr)

    def __call__(self, stages: list[Stage]) -> list[Stage]:
        out, seen = [], set()
        for st in stages:
            if st.step not in seen:
                seen.add(st.step)
                t = self.grid[st.step]
                a_s, b_s = affine_coefficients(self.path, t, self.prediction, "score")
                x0 = affine_coefficients(self.path, t, self.prediction, "x0")
                # host rows (1, 0, 1): placeholders that make the call draw its stream; the rows are per sample
                out += [Stage(st.step, t, "x", "x", 1.0, 0.0, c_noise=1.0, stream=langevin_stream(st.step, j), x0=x0,
                              corrector=(self.snr, a_s, b_s, ())) for j in range(self.n)]
            out.append(st)
        return out


def transform(corrector_steps, snr, path, grid, prediction) -> Correctors | None:
    """sample()'s corrector options as a stage-table transform; None for none."""
    n = langevin_steps("corrector_steps", corrector_steps)
    snr = positive_number("snr", snr)  # also when unused: a NaN or misspelt snr is a mistake all the same
    return Correctors(n, snr, path, grid, prediction) if n else None


def hook(stages: list[Stage], backend: str):
    """The before-step hook: a corrector stage's call gets its per-sample rows."""
    def rows(k: int, preds: list, call):
        st = stages[k]
        if st.corrector is None:
            return call
        return replaced(call, sample_coeffs=corrector_rows(call.args, preds, st, backend))

    return rows


def corrector_rows(args: tuple, preds: list, st: Stage, backend: str) -> torch.Tensor:
    """A corrector stage's per-sample rows [B, 2M] (``args``: its call's KERNEL_ARGS):
    out = (1 + ε a) x + ε b g + Σ ε h_j buffer_j + sqrt(2 ε) ξ, g the blend of ``preds``,
    s = a x + b g + Σ h_j buffer_j, ε from the norms of s and ξ."""
    x, history, seeds, streams, host_w, sample_w = args[0], args[2], args[3], args[4], args[5], args[7]
    snr, a, b, h = st.corrector
    # the pass reads one dtype: float16 / bfloat16 predictions are widened (exactly) next to the float32 state
    terms = [x, *(p if p.dtype == x.dtype else p.to(x.dtype) for p in preds), *history]
    G = sample_gram(terms, seeds=seeds, streams=streams, backend=backend)  # u = (1, x, p_0.., h.., ξ)
    B, K, H = x.shape[0], len(preds), len(history)
    # s = a x + b g with g = w_0 p_0 + Σ_k w_k (p_k − p_0): p_0's weight is w_0 − Σ_{k≥1} w_k. Host weights
    # fill columns by fill_ (no tensor made from host data, no host-to-device copy: capturable in a CUDA graph;
    # v[:, 1] = a would make a 0-d tensor of a first)
    v = torch.zeros(B, K + H + 3, dtype=torch.float64, device=x.device)
    v[:, 1].fill_(a)
    if sample_w is None:
        v[:, 2].fill_(b * (host_w[0] - sum(host_w[1:])))
        for k in range(1, K):
            v[:, 2 + k].fill_(b * host_w[k])
    else:
        w = sample_w.to(torch.float64)
        v[:, 2] = b * (w[:, 0] - w[:, 1:].sum(1))
        v[:, 3:K + 2] = b * w[:, 1:]
    for j, c in enumerate(h):
        v[:, 2 + K + j].fill_(c)
    score_sq = torch.einsum("bi,bij,bj->b", v, G, v)
    eps = 2.0 * snr * snr * G[:, -1, -1] / score_sq
    eps = torch.where(score_sq > 0, eps, torch.zeros_like(eps))  # a zero score: no move
    zero = torch.zeros_like(eps)
    out_row = [1.0 + eps * a, eps * b, *(eps * c for c in h), (2.0 * eps).sqrt()]
    rows = torch.stack(out_row + [zero] * len(out_row), 1).to(torch.float32)
    return rows
