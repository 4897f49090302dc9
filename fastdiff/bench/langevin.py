"""Langevin chains (fastdiff.langevin) against the lectures' loop as users write it: ``LANGEVIN_STEPS`` steps of
BATCH chains of N / BATCH elements on the Gaussian N(3, I), whose score 3 − x costs one elementwise pass in every
implementation.

- fastdiff: ``fastdiff.langevin`` (each step one fused pass: drift + in-kernel noise); fastdiff_mala: with the
  Metropolis adjustment (a proposal pass, the per-sample reduction pass, the device-side accept/reject);
- eager: ``x = x + h/2 * score(x) + sqrt(h) * torch.randn_like(x)``; eager_mala: MALA written with torch ops
  (norms, log-densities, torch.where); compile: torch.compile of the eager step.
"""

from __future__ import annotations

import math

import torch

from fastdiff.bench.case import BATCH, Case

LANGEVIN_STEPS, STEP_SIZE = 20, 0.01


def _score(x):
    return 3.0 - x


def _log_prob(x):
    return -0.5 * (x - 3.0).flatten(1).square().sum(1)


def eager_step(x, h=STEP_SIZE):
    return x + 0.5 * h * _score(x) + math.sqrt(h) * torch.randn_like(x)


def eager_mala(x, steps=LANGEVIN_STEPS, h=STEP_SIZE):
    """MALA as users write it: proposal, both proposal densities, the log-density ratio, accept per chain."""
    s, lp = _score(x), _log_prob(x)
    for _ in range(steps):
        prop = x + 0.5 * h * s + math.sqrt(h) * torch.randn_like(x)
        s_p, lp_p = _score(prop), _log_prob(prop)
        fwd = (prop - x - 0.5 * h * s).flatten(1).square().sum(1)
        bwd = (x - prop - 0.5 * h * s_p).flatten(1).square().sum(1)
        accept = torch.rand_like(lp).log() < lp_p - lp - (bwd - fwd) / (2 * h)
        mask = accept.view(-1, *([1] * (x.dim() - 1)))
        x, s, lp = torch.where(mask, prop, x), torch.where(mask, s_p, s), torch.where(accept, lp_p, lp)
    return x


def langevin_cases(n: int, device="cpu", impls=None) -> list[Case]:
    import fastdiff

    x0 = torch.randn(BATCH, n // BATCH, device=device)
    traffic = 12 * n * LANGEVIN_STEPS  # per step: read x and the score, write x (fp32)
    compiled = torch.compile(eager_step, dynamic=False)

    def loop(step):
        def run():
            x = x0
            for _ in range(LANGEVIN_STEPS):
                x = step(x)
            return x
        return run

    everything = [
        Case("langevin", "fastdiff", n, "fp32",
             lambda: fastdiff.langevin(_score, x0, steps=LANGEVIN_STEPS, step_size=STEP_SIZE), traffic,
             f"{LANGEVIN_STEPS} ULA steps"),
        Case("langevin", "fastdiff_mala", n, "fp32",
             lambda: fastdiff.langevin(_score, x0, steps=LANGEVIN_STEPS, step_size=STEP_SIZE, log_prob=_log_prob),
             traffic, f"{LANGEVIN_STEPS} MALA steps (vs eager_mala)"),
        Case("langevin", "eager", n, "fp32", loop(eager_step), traffic, "the lectures' loop"),
        Case("langevin", "compile", n, "fp32", loop(compiled), traffic, "torch.compile of its step"),
        Case("langevin", "eager_mala", n, "fp32", lambda: eager_mala(x0), traffic, "MALA with torch ops"),
    ]
    return [c for c in everything if impls is None or c.impl in impls or c.impl.startswith("fastdiff")]
