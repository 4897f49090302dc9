"""The pictures and figures of docs/score_based.md.

- docs/img/langevin_particles.png: the lectures' 50 particles under Langevin dynamics (fastdiff.langevin) on a
  5-mode Gaussian mixture, from random starting points, at steps 0, 20, 100 and 1000 (the target's density
  behind them).
- docs/img/ncsn_digits.png and the printed figures: NCSN on scikit-learn's 8×8 digits: the demo's UNet trained
  with multi-level denoising score matching (fastdiff.training.ncsn_objective: 10 levels σ 2 → 0.02, eps
  parameterization, i.e. s = −ε̂/σ), sampled with annealed Langevin dynamics (50 steps per level, then
  Tweedie's denoising step) and judged by the demo's digit classifier. The model is trained once into
  ``--work`` (default ~/.cache/fastdiff-docs/ncsn) and reused on later runs.

Run: pip install scikit-learn pillow matplotlib && python docs/scripts/score_based_pictures.py
     (~7 minutes on 2 CPU cores the first time, mostly training)
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch

import fastdiff
from fastdiff.mixtures import GaussianMixture

TRAIN_STEPS = 2000
LEVELS = dict(sigma_min=0.02, sigma_max=2.0, num_levels=10)
STEP_LR = 8e-5  # a_L / σ_L² = 0.2, NCSNv1's ratio (2e-5 at σ_L = 0.01)
N_STEPS_EACH = 50


def five_modes() -> GaussianMixture:
    angles = torch.arange(5) * 2 * math.pi / 5
    means = 3.0 * torch.stack([angles.cos(), angles.sin()], 1)
    return GaussianMixture(means, stds=0.5, weights=[0.3, 0.2, 0.2, 0.15, 0.15])


def particles_picture(path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mix = five_modes()
    x0 = 6.0 * torch.rand(50, 2, generator=torch.Generator().manual_seed(0)) - 3.0
    chain = fastdiff.langevin(lambda x: mix.score(x, 1.0), x0, steps=1000, step_size=0.01, thin=1, seed=0)
    grid = torch.linspace(-5.5, 5.5, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    density = mix.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1).double()).exp().view(200, 200)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for ax, step in zip(axes, (0, 20, 100, 1000)):
        pts = x0 if step == 0 else chain[step - 1]
        ax.contourf(gx, gy, density, levels=12, cmap="Greys")
        ax.scatter(pts[:, 0], pts[:, 1], s=12, c="tab:red")
        ax.set_title(f"step {step}" + (" (start)" if step == 0 else ""))
        ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("Langevin dynamics, h = 0.01: 50 particles find the 5-mode mixture from its score alone")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def ncsn_digits(work: pathlib.Path, img: pathlib.Path) -> dict:
    from fastdiff.demo import data, images
    from fastdiff.demo.models import load_model
    from fastdiff.demo.run import digits_model
    from fastdiff.training import Trainer, checkpoint, ncsn_grid, ncsn_objective

    newest = checkpoint.latest(work / "checkpoints", warn=False) if (work / "checkpoints").is_dir() else None
    t0 = time.perf_counter()
    if newest is None or int(checkpoint.read(newest)[1]["step"]) < TRAIN_STEPS:
        torch.manual_seed(0)
        model = digits_model()
        trainer = Trainer(model, data.digits(), objective=ncsn_objective(prediction="eps", **LEVELS), steps=TRAIN_STEPS,
                          batch_size=256, lr=2e-3, warmup=200, lr_schedule="cosine", lr_min=1e-4, ema_decay=0.999,
                          grad_clip=1.0, seed=0, out_dir=work, checkpoint_every=500, keep=1, log_every=25)
        trainer.fit()
    model, _ = load_model(work / "checkpoints")
    model.eval()
    train_seconds = time.perf_counter() - t0
    path, grid = ncsn_grid(**LEVELS)
    per_class = 100
    y = torch.arange(10).repeat_interleave(per_class)
    t1 = time.perf_counter()
    x = fastdiff.sample(model, None, timesteps=grid, path=path, prediction="eps", method="annealed_langevin",
                        shape=(1, 8, 8), y=y, seed=0, n_steps_each=N_STEPS_EACH, step_lr=STEP_LR, progress=True)
    sample_seconds = time.perf_counter() - t1
    classifier = data.digit_classifier(0)
    accuracy = float((classifier.predict(x) == y).float().mean())
    panel = x.view(10, per_class, 1, 8, 8)[:, :10]
    images.labelled_grid([(f"NCSN, annealed Langevin: accuracy {accuracy:.3f}", panel)],
                         row_labels=[str(c) for c in range(10)], path=img, scale=4, vmin=1.0, vmax=-1.0)
    figures = {"levels": LEVELS, "train_steps": TRAIN_STEPS, "n_steps_each": N_STEPS_EACH, "step_lr": STEP_LR,
               "accuracy_on_generated": accuracy, "classifier_accuracy_on_real": classifier.score_real,
               "train_seconds": round(train_seconds, 1), "sample_seconds_1000": round(sample_seconds, 1)}
    print(json.dumps(figures, indent=1))
    print(f"wrote {img}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(pathlib.Path.home() / ".cache" / "fastdiff-docs" / "ncsn"))
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "img"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    particles_picture(out / "langevin_particles.png")
    ncsn_digits(pathlib.Path(args.work), out / "ncsn_digits.png")


if __name__ == "__main__":
    main()
