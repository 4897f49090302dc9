"""dpm_adaptive with a step size per sample against k-diffusion's batch-wide controller, on a batch whose samples
differ in difficulty (docs/sampling.md, "Adaptive steps per sample").

The exact x0 model of a labelled 2-D mixture on the VE path (sigma 80 -> 0.002): class 0 one Gaussian, class 1
eight sharp modes on a ring (std 0.05), a batch of 64 alternating classes. For each tolerance (rtol, atol = rtol / 10
... k-diffusion's defaults first), both samplers from the same initial noise (fastdiff per sample with h_max = inf,
k-diffusion's controller, and h_max = 1); the error of each sample is its distance to a reference run at
rtol = 1e-7. Prints the total evaluations (fastdiff: the sum of each sample's own; k-diffusion: its evaluations x the
batch) and each class's mean / max error.

Run: pip install --no-deps k-diffusion && pip install torchsde torchdiffeq scipy &&
     python docs/scripts/dpm_adaptive_per_sample.py
"""

from __future__ import annotations

import math

import torch

import fastdiff
from fastdiff.mixtures import GaussianMixture, MixtureModel
from fastdiff.paths import VE

TOLERANCES = ((0.05, 0.0078), (0.01, 0.001), (0.002, 0.0002))
H_MAX = (math.inf, 1.0)  # k-diffusion's controller per sample; every step at most 1 in log sigma


def main(class0_std: float = 0.05, batch: int = 64) -> str:
    from fastdiff.bench.peers import k_diffusion_sampling

    kd = k_diffusion_sampling()
    smax, smin = 80.0, 0.002
    path = VE(smax)
    angles = torch.arange(8) * 2 * math.pi / 8
    means = torch.cat([torch.zeros(1, 2), torch.stack([4 * angles.cos(), 4 * angles.sin()], 1)])
    mixture = GaussianMixture(means, stds=torch.tensor([class0_std] + [0.05] * 8), labels=torch.tensor([0] + [1] * 8))
    model = MixtureModel(mixture, path, "x0")
    y = torch.tensor([0, 1] * (batch // 2))

    def denoiser(x, sigma):
        return model(x, path.time(sigma.double()).float(), y)

    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0)) * smax
    grid = [0.0, path.time(smin)]
    kw = dict(noise=x, y=y, path=path, prediction="x0", method="dpm_adaptive", timesteps=grid)
    reference = fastdiff.sample(model, None, **{**kw, "noise": x.double()}, rtol=1e-7, atol=1e-8)
    rows = [f"class 0: one Gaussian (std {class0_std}); class 1: eight modes (std 0.05); batch {batch}", "",
            "| rtol, atol | controller | evaluations (class 0 / class 1 each) | class 0 error: mean / max "
            "| class 1 error: mean / max |", "|---|---|---|---|---|"]

    def err(e, c):
        return f"{float(e[c::2].mean()):.2e} / {float(e[c::2].max()):.2e}"

    for rtol, atol in TOLERANCES:
        theirs, kinfo = kd.sample_dpm_adaptive(denoiser, x, smin, smax, rtol=rtol, atol=atol, disable=True,
                                               return_info=True)
        e_kd = (theirs - reference).norm(dim=1)
        for h_max in H_MAX:
            ours, info = fastdiff.sample(model, None, **kw, rtol=rtol, atol=atol, h_max=h_max, return_info=True)
            e_ours, nfe = (ours - reference).norm(dim=1), info.nfe
            rows.append(f"| {rtol}, {atol} | per sample, h_max = {h_max:g} | **{int(nfe.sum())}** "
                        f"({float(nfe[0::2].float().mean()):.1f} / {float(nfe[1::2].float().mean()):.1f}) | "
                        f"{err(e_ours, 0)} | {err(e_ours, 1)} |")
        rows.append(f"| {rtol}, {atol} | batch-wide (k-diffusion) | **{kinfo['nfe'] * batch}** ({kinfo['nfe']} each) "
                    f"| {err(e_kd, 0)} | {err(e_kd, 1)} |")
    return "\n".join(rows)


def high_dim(dim: int = 64, batch: int = 64, hard: int = 48) -> str:
    """The same comparison on samples of ``dim`` dimensions: ``hard`` of eight sharp modes (std 0.05), the rest of two
    broad ones (std 0.5), means drawn N(0, 4 I); errors as RMS over the dimensions, mean / max over the batch."""
    from fastdiff.bench.peers import k_diffusion_sampling

    kd = k_diffusion_sampling()
    smax, smin = 80.0, 0.002
    path = VE(smax)
    g = torch.Generator().manual_seed(1)
    means = torch.randn(10, dim, generator=g) * 2
    mixture = GaussianMixture(means, stds=torch.tensor([0.5] * 2 + [0.05] * 8), labels=torch.tensor([0] * 2 + [1] * 8))
    model = MixtureModel(mixture, path, "x0")
    y = torch.tensor([1] * hard + [0] * (batch - hard))

    def denoiser(x, sigma):
        return model(x, path.time(sigma.double()).float(), y)

    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0)) * smax
    kw = dict(noise=x, y=y, path=path, prediction="x0", method="dpm_adaptive", timesteps=[0.0, path.time(smin)])
    reference = fastdiff.sample(model, None, **{**kw, "noise": x.double()}, rtol=1e-7, atol=1e-8)
    rows = [f"{dim}-D: {hard} samples of eight sharp modes, {batch - hard} of two broad ones", "",
            "| rtol, atol | controller | evaluations | error: mean / max |", "|---|---|---|---|"]
    for rtol, atol in TOLERANCES[:2]:
        theirs, kinfo = kd.sample_dpm_adaptive(denoiser, x, smin, smax, rtol=rtol, atol=atol, disable=True,
                                               return_info=True)
        for h_max in H_MAX:
            ours, info = fastdiff.sample(model, None, **kw, rtol=rtol, atol=atol, h_max=h_max, return_info=True)
            e = (ours - reference).norm(dim=1) / math.sqrt(dim)
            rows.append(f"| {rtol}, {atol} | per sample, h_max = {h_max:g} | {int(info.nfe.sum())} | "
                        f"{float(e.mean()):.2e} / {float(e.max()):.2e} |")
        e = (theirs - reference).norm(dim=1) / math.sqrt(dim)
        rows.append(f"| {rtol}, {atol} | batch-wide (k-diffusion) | {kinfo['nfe'] * batch} | "
                    f"{float(e.mean()):.2e} / {float(e.max()):.2e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(main())
    print()
    print(high_dim())
