"""docs/img/method_errors.png: each registered sampling method's error against the number of model
evaluations, on a 2-D Gaussian whose exact answers are known (fastdiff.mixtures).

- ODE methods (left): mean distance to the exact probability-flow map from the same initial points,
  CondOT with a velocity model from t = 0.05 to 0.95 (no singular end point, so the slopes are the orders).
- Stochastic methods (right): distance of the samples' mean and covariance to the Gaussian's at t = 0.95
  (400k samples: a floor of ~3e-3 from sampling error), the same path and grid.

Run: pip install matplotlib && python docs/scripts/method_errors.py   (~1 minute on 2 CPU cores)
"""

from __future__ import annotations

import pathlib

import torch

import fastdiff
from fastdiff.mixtures import GaussianMixture, MixtureModel

ODE = [("euler", {}), ("heun", {}), ("ddim", {}), ("dpmpp_2m", {}), ("dpm_2", {}), ("lms", {}),
       ("ipndm", {"order": 3}), ("ipndm_v", {"order": 3}), ("deis", {}), ("unipc", {"order": 2}),
       ("unipc", {"order": 3, "lower_order_final": False}), ("dpmpp_3m_sde", {"eta": 0.0})]
SDE = [("euler", {"sigma": 1.0}), ("ddim", {"eta": 1.0}), ("euler_ancestral", {}), ("dpm_2_ancestral", {}),
       ("dpmpp_2s_ancestral", {}), ("dpmpp_sde", {}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}),
       ("heun", {"s_churn": 2.0})]
STEPS = (4, 8, 16, 32, 64)
T0, T1 = 0.05, 0.95


def label(method: str, options: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


def main(out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[0.5, 0.2], [0.2, 0.3]])
    g = GaussianMixture(means=mean[None], covs=cov[None])
    model = MixtureModel(g, "condot", "velocity")
    path = fastdiff.paths.get_path("condot")
    al, be = path.coefficients(T0)[:2]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax in (left, right):  # distinct colours and line styles for up to 20 methods
        ax.set_prop_cycle(color=plt.cm.tab20.colors[:12], linestyle=["-", "--", "-.", ":"] * 3)

    x0 = be * torch.randn(512, 2, generator=torch.Generator().manual_seed(0)).double() + al * mean.double()
    exact = g.flow_map(x0, T0, T1, "condot")
    for method, options in ODE:
        evals, errors = [], []
        for n in STEPS:
            grid = [T0 + (T1 - T0) * i / n for i in range(n + 1)]
            x = fastdiff.sample(model, None, noise=x0.float(), path="condot", prediction="velocity", method=method,
                                timesteps=grid, **options)
            evals.append(n * fastdiff.sampling.get_method(method).evals_per_step)
            errors.append(float((x.double() - exact).norm(dim=1).mean()))
        left.loglog(evals, errors, "o-", label=label(method, options))

    a1, b1 = path.coefficients(T1)[:2]
    want_mean, want_cov = a1 * mean.double(), a1 * a1 * cov.double() + b1 * b1 * torch.eye(2, dtype=torch.float64)
    n_samples = 400_000
    start = be * torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(1)) + al * mean
    for method, options in SDE:
        evals, errors = [], []
        for n in STEPS:
            grid = [T0 + (T1 - T0) * i / n for i in range(n + 1)]
            x = fastdiff.sample(model, None, noise=start, path="condot", prediction="velocity", method=method,
                                timesteps=grid, seed=7, **options).double()
            err = (x.mean(0) - want_mean).norm() + (torch.cov(x.T) - want_cov).norm()
            evals.append(n * fastdiff.sampling.get_method(method).evals_per_step)
            errors.append(float(err))
        right.loglog(evals, errors, "o-", label=label(method, options))

    left.set_title("ODE methods: distance to the exact flow map")
    right.set_title("stochastic methods: error of mean and covariance (floor ~3e-3)")
    for ax in (left, right):
        ax.set_xlabel("model evaluations")
        ax.set_ylabel("error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("fastdiff methods on a 2-D Gaussian, CondOT t = 0.05 -> 0.95 (docs/scripts/method_errors.py)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(pathlib.Path(__file__).resolve().parents[1] / "img" / "method_errors.png")
