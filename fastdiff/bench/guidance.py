"""Guidance rules' fused steps against the formulas users write today, one Euler ODE step each (CondOT
velocity): ``rescale`` with CFG rescale (diffusers' guidance_rescale = 0.7, cfg = 4) and ``apg`` with
adaptive projected guidance (diffusers' defaults: w = 7.5, norm threshold 15, eta = 1; here eta = 0.5 so the
projection counts). fastdiff: the per-sample reduction pass over both branches, the [B] weights and one
sampler_step; eager: diffusers' formula (rescale_noise_cfg, normalized_guidance) and the update;
compile: torch.compile of eager."""

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


def eager_apg_step(x, out2b, *, w=7.5, eta=0.5, threshold=15.0, dt=DT):
    """APG's step as diffusers writes it (normalized_guidance without momentum), then the Euler update."""
    cond, uncond = out2b.float().chunk(2)
    dims = list(range(1, cond.dim()))
    diff = cond - uncond
    diff = diff * torch.minimum(torch.ones_like(diff), threshold / diff.norm(p=2, dim=dims, keepdim=True))
    v0, v1 = diff.double(), torch.nn.functional.normalize(cond.double(), dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    update = (v0 - parallel).float() + eta * parallel.float()
    return x + dt * (uncond + w * update)


def rescale_cases(n: int, dtype: str = "fp32", device="cpu", impls=None, rule: str = "rescale") -> list[Case]:
    """The bytes a guided step must move: x and both branches read, the new state written (the fused
    path reads the branches twice: the reduction, then the step). ``rule``: "rescale" or "apg"."""
    import fastdiff
    from fastdiff.ops.sample_gram import sample_gram
    from fastdiff.sampling.features.guidance import APG, CFG as CFGRule, branch_weights

    dt_ = _dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((BATCH, n // BATCH), generator=g).to(device)
    out2b = torch.randn((2 * BATCH, n // BATCH), generator=g).to(device=device, dtype=dt_)
    cond, uncond = out2b.chunk(2)
    weights = torch.empty((BATCH, 2), device=device)
    out = torch.empty_like(x)

    spec, w, phi, eager = (CFGRule(), CFG, PHI, eager_rescale_step) if rule == "rescale" else \
        (APG(eta=0.5, norm_threshold=15.0), 7.5, 0.0, eager_apg_step)

    def fused(backend=None):
        branch_weights(sample_gram([uncond, cond], backend=backend), spec, w, phi, weights)
        return fastdiff.ops.sampler_step(x, [uncond, cond], weights=weights, coeffs=[1.0, DT, 0.0, 0.0], outs=[out],
                                         backend=backend)

    cases = {"fastdiff": fused, "eager": lambda: eager(x, out2b), "reference": lambda: fused("reference")}
    if impls is None or "compile" in impls:
        compiled = torch.compile(eager, dynamic=False)
        cases["compile"] = lambda: compiled(x, out2b)
    nbytes = n * (4 + 4 + 2 * dt_.itemsize)
    return [Case(rule, k, n, dtype, f, nbytes) for k, f in cases.items() if impls is None or k in impls]
