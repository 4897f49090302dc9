"""Guidance rules' fused steps against the formulas users write today: ``rescale`` is one Euler ODE step
with CFG rescale (diffusers' guidance_rescale = 0.7, cfg = 4, CondOT velocity): fastdiff's per-sample
reduction pass over both branches, the [B] weights and one sampler_step, against the eager blend, two
standard deviations and the update (diffusers' rescale_noise_cfg), and torch.compile of that."""

from __future__ import annotations

import torch

from fastdiff.bench.case import BATCH, CFG, DT, Case, _dtype

PHI = 0.7


def eager_rescale_step(x, out2b, *, cfg=CFG, phi=PHI, dt=DT):
    """The rescaled CFG step as users write it (diffusers' rescale_noise_cfg, then the Euler update)."""
    cond, uncond = out2b.float().chunk(2)
    g = uncond + cfg * (cond - uncond)
    dims = list(range(1, g.dim()))
    rescaled = g * (cond.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
    g = phi * rescaled + (1 - phi) * g
    return x + dt * g


def rescale_cases(n: int, dtype: str = "fp32", device="cpu", impls=None) -> list[Case]:
    """The bytes a rescaled step must move: x and both branches read, the new state written (the fused
    path reads the branches twice: the reduction, then the step)."""
    import fastdiff
    from fastdiff.ops.sample_gram import sample_gram
    from fastdiff.sampling.guidance import rescale_weights

    dt_ = _dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((BATCH, n // BATCH), generator=g).to(device)
    out2b = torch.randn((2 * BATCH, n // BATCH), generator=g).to(device=device, dtype=dt_)
    cond, uncond = out2b.chunk(2)
    weights = torch.empty((BATCH, 2), device=device)
    out = torch.empty_like(x)

    def fused(backend=None):
        rescale_weights(sample_gram([uncond, cond], backend=backend), CFG, PHI, weights)
        return fastdiff.ops.sampler_step(x, [uncond, cond], weights=weights, coeffs=[1.0, DT, 0.0, 0.0], outs=[out],
                                         backend=backend)

    cases = {"fastdiff": fused, "eager": lambda: eager_rescale_step(x, out2b),
             "reference": lambda: fused("reference")}
    if impls is None or "compile" in impls:
        compiled = torch.compile(eager_rescale_step, dynamic=False)
        cases["compile"] = lambda: compiled(x, out2b)
    nbytes = n * (4 + 4 + 2 * dt_.itemsize)
    return [Case("rescale", k, n, dtype, f, nbytes) for k, f in cases.items() if impls is None or k in impls]
