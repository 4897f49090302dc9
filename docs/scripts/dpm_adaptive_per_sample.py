"""dpm_adaptive with a step size per sample against k-diffusion's batch-wide controller, on a batch whose samples
differ in difficulty (docs/sampling.md, "Adaptive steps per sample").

The exact x0 model of a labelled 2-D mixture on the VE path (sigma 80 -> 0.002): class 0 one Gaussian, class 1
eight sharp modes on a ring (std 0.05), a batch of 64 alternating classes. For each tolerance (rtol, atol = rtol / 10
... k-diffusion's defaults first), both samplers from the same initial noise; the error of each sample is its
distance to a reference run at rtol = 1e-7. Prints the total evaluations (fastdiff: the sum of each sample's own;
k-diffusion: its evaluations x the batch) and each class's mean / max error.

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
            "| rtol, atol | evaluations: per sample (fastdiff) | batch-wide (k-diffusion) | class 0 error: per sample "
            "| batch-wide | class 1 error: per sample | batch-wide |", "|---|---|---|---|---|---|---|"]
    for rtol, atol in TOLERANCES:
        ours, info = fastdiff.sample(model, None, **kw, rtol=rtol, atol=atol, return_info=True)
        theirs, kinfo = kd.sample_dpm_adaptive(denoiser, x, smin, smax, rtol=rtol, atol=atol, disable=True,
                                               return_info=True)
        e_ours, e_kd = (ours - reference).norm(dim=1), (theirs - reference).norm(dim=1)

        def err(e, c):
            return f"{float(e[c::2].mean()):.2e} / {float(e[c::2].max()):.2e}"

        nfe = info.nfe
        rows.append(f"| {rtol}, {atol} | {int(nfe.sum())} (class 0: {float(nfe[0::2].float().mean()):.1f}, class 1: "
                    f"{float(nfe[1::2].float().mean()):.1f} each; model rows {info.model_rows}) | "
                    f"{kinfo['nfe'] * batch} ({kinfo['nfe']} each) | {err(e_ours, 0)} | {err(e_kd, 0)} | "
                    f"{err(e_ours, 1)} | {err(e_kd, 1)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(main())
