"""dpm_adaptive with a step size per sample against k-diffusion's batch-wide controller, on batches whose samples
differ in difficulty (docs/sampling.md, "Adaptive steps per sample"; the picture docs/img/dpm_adaptive_per_sample.png).

The exact x0 model of a labelled mixture on the VE path (sigma 80 -> 0.002). The 2-D batch: class 0 one Gaussian,
class 1 eight sharp modes on a ring (std 0.05), 64 samples alternating classes. The 64-D batch: 48 samples of eight
sharp modes (std 0.05), 16 of two broad ones (std 0.5), means drawn N(0, 4 I). For each tolerance (rtol, atol =
rtol / 10 ... k-diffusion's defaults first) every controller starts from the same noise: fastdiff per sample with
h_max = inf (k-diffusion's controller) and h_max = 1, and k-diffusion's sample_dpm_adaptive on the whole batch. The
error of a sample is its distance to a reference run at rtol = 1e-7 (64-D: RMS over the dimensions). Prints the
total evaluations (fastdiff: the sum of each sample's own; k-diffusion: its evaluations x the batch) and the mean /
max errors.

Run: pip install --no-deps k-diffusion && pip install torchsde torchdiffeq scipy matplotlib &&
     python docs/scripts/dpm_adaptive_per_sample.py
"""

from __future__ import annotations

import math
import pathlib
import sys
from dataclasses import dataclass

import torch

import fastdiff
from fastdiff.mixtures import GaussianMixture, MixtureModel
from fastdiff.paths import VE

TOLERANCES = ((0.05, 0.0078), (0.01, 0.001), (0.002, 0.0002))
SWEEP = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002)  # the picture's rtol (atol = rtol / 10)
H_MAX = (math.inf, 1.0)  # k-diffusion's controller per sample; every step at most 1 in log sigma
SMAX, SMIN = 80.0, 0.002
DOCS = pathlib.Path(__file__).resolve().parents[1]


@dataclass
class Batch:
    model: MixtureModel
    y: torch.Tensor
    x: torch.Tensor  # the initial noise
    reference: torch.Tensor
    dim: int

    def kw(self) -> dict:
        path = VE(SMAX)
        return dict(noise=self.x, y=self.y, path=path, prediction="x0", method="dpm_adaptive",
                    timesteps=[0.0, path.time(SMIN)])

    def ours(self, rtol: float, atol: float, h_max: float) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(total evaluations, each sample's evaluations, each sample's error) of the per-sample controller."""
        out, info = fastdiff.sample(self.model, None, **self.kw(), rtol=rtol, atol=atol, h_max=h_max,
                                    return_info=True)
        return int(info.nfe.sum()), info.nfe, self.error(out)

    def theirs(self, rtol: float, atol: float) -> tuple[int, int, torch.Tensor]:
        """(total evaluations, evaluations each, each sample's error) of k-diffusion's batch-wide controller."""
        from fastdiff.bench.peers import k_diffusion_sampling

        path = VE(SMAX)

        def denoiser(x, sigma):
            return self.model(x, path.time(sigma.double()).float(), self.y)

        out, info = k_diffusion_sampling().sample_dpm_adaptive(denoiser, self.x, SMIN, SMAX, rtol=rtol, atol=atol,
                                                               disable=True, return_info=True)
        return info["nfe"] * len(self.x), info["nfe"], self.error(out)

    def error(self, out: torch.Tensor) -> torch.Tensor:
        return (out - self.reference).norm(dim=1) / (math.sqrt(self.dim) if self.dim > 2 else 1.0)


def _batch(mixture: GaussianMixture, y: torch.Tensor, dim: int) -> Batch:
    path = VE(SMAX)
    model = MixtureModel(mixture, path, "x0")
    x = torch.randn(len(y), dim, generator=torch.Generator().manual_seed(0)) * SMAX
    batch = Batch(model, y, x, torch.empty(0), dim)
    batch.reference = fastdiff.sample(model, None, **{**batch.kw(), "noise": x.double()}, rtol=1e-7, atol=1e-8)
    return batch


def two_classes(class0_std: float = 0.05, batch: int = 64) -> Batch:
    angles = torch.arange(8) * 2 * math.pi / 8
    means = torch.cat([torch.zeros(1, 2), torch.stack([4 * angles.cos(), 4 * angles.sin()], 1)])
    mixture = GaussianMixture(means, stds=torch.tensor([class0_std] + [0.05] * 8), labels=torch.tensor([0] + [1] * 8))
    return _batch(mixture, torch.tensor([0, 1] * (batch // 2)), 2)


def high_dim_batch(dim: int = 64, batch: int = 64, hard: int = 48) -> Batch:
    means = torch.randn(10, dim, generator=torch.Generator().manual_seed(1)) * 2
    mixture = GaussianMixture(means, stds=torch.tensor([0.5] * 2 + [0.05] * 8), labels=torch.tensor([0] * 2 + [1] * 8))
    return _batch(mixture, torch.tensor([1] * hard + [0] * (batch - hard)), dim)


def _err(e: torch.Tensor) -> str:
    return f"{float(e.mean()):.2e} / {float(e.max()):.2e}"


def main(batch: Batch | None = None) -> str:
    b = batch or two_classes()
    rows = ["class 0: one Gaussian (std 0.05); class 1: eight modes (std 0.05); batch 64", "",
            "| rtol, atol | controller | evaluations (class 0 / class 1 each) | class 0 error: mean / max "
            "| class 1 error: mean / max |", "|---|---|---|---|---|"]
    for rtol, atol in TOLERANCES:
        for h_max in H_MAX:
            total, nfe, e = b.ours(rtol, atol, h_max)
            rows.append(f"| {rtol}, {atol} | per sample, h_max = {h_max:g} | **{total}** "
                        f"({float(nfe[0::2].float().mean()):.1f} / {float(nfe[1::2].float().mean()):.1f}) | "
                        f"{_err(e[0::2])} | {_err(e[1::2])} |")
        total, each, e = b.theirs(rtol, atol)
        rows.append(f"| {rtol}, {atol} | batch-wide (k-diffusion) | **{total}** ({each} each) | {_err(e[0::2])} | "
                    f"{_err(e[1::2])} |")
    return "\n".join(rows)


def high_dim(batch: Batch | None = None) -> str:
    b = batch or high_dim_batch()
    rows = [f"{b.dim}-D: 48 samples of eight sharp modes, 16 of two broad ones", "",
            "| rtol, atol | controller | evaluations | error: mean / max |", "|---|---|---|---|"]
    for rtol, atol in TOLERANCES[:2]:
        for h_max in H_MAX:
            total, _, e = b.ours(rtol, atol, h_max)
            rows.append(f"| {rtol}, {atol} | per sample, h_max = {h_max:g} | {total} | {_err(e)} |")
        total, _, e = b.theirs(rtol, atol)
        rows.append(f"| {rtol}, {atol} | batch-wide (k-diffusion) | {total} | {_err(e)} |")
    return "\n".join(rows)


def picture(batches: dict, out: pathlib.Path) -> None:
    """Mean error against total evaluations over SWEEP's tolerances, one panel per batch, a curve per controller."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6.2 * len(batches), 4.8))
    styles = {"inf": ("tab:grey", "per sample, h_max = inf (k-diffusion's controller)"),
              "1": ("tab:blue", "per sample, h_max = 1"), "kd": ("k", "batch-wide (k-diffusion)")}
    for ax, (title, b) in zip(axes, batches.items()):
        curves = {k: ([], []) for k in styles}
        for rtol in SWEEP:
            atol = rtol / 10
            for h_max in H_MAX:
                total, _, e = b.ours(rtol, atol, h_max)
                curves[f"{h_max:g}"][0].append(total)
                curves[f"{h_max:g}"][1].append(float(e.mean()))
            total, _, e = b.theirs(rtol, atol)
            curves["kd"][0].append(total)
            curves["kd"][1].append(float(e.mean()))
        for key, (evals, errs) in curves.items():
            color, label = styles[key]
            ax.loglog(evals, errs, "o-", color=color, label=label, ms=4)
            if key != "inf":
                for rtol, ev, er in zip(SWEEP, evals, errs):
                    ax.annotate(f"{rtol:g}", (ev, er), textcoords="offset points", xytext=(4, 3), fontsize=7,
                                color=color)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("model evaluations, whole batch (64 samples)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean distance to an rtol = 1e-7 run")
    axes[0].legend(fontsize=8)
    fig.suptitle("dpm_adaptive: one step size per sample against one for the batch (labels: rtol; "
                 "docs/scripts/dpm_adaptive_per_sample.py)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    two, wide = two_classes(), high_dim_batch()
    print(main(two))
    print()
    print(high_dim(wide))
    picture({"2-D: one narrow Gaussian / eight sharp modes, alternating": two,
             "64-D: 48 of eight sharp modes, 16 of two broad ones": wide},
            DOCS / "img" / "dpm_adaptive_per_sample.png")
