"""The measured order of a deterministic method: its error against the exact flow map of a Gaussian (the oracle
fastdiff.mixtures computes in closed form) on [0.05, 0.95], where no grid end is singular, as the steps grow."""

import math

import torch

import fastdiff
from fastdiff.mixtures import GaussianMixture, MixtureModel
from fastdiff.paths import get_path

T0, T1 = 0.05, 0.95


def single_gaussian() -> GaussianMixture:
    return GaussianMixture(means=torch.tensor([[1.0, -2.0]]), covs=torch.tensor([[[0.5, 0.2], [0.2, 0.3]]]))


def flow_map_errors(method: str, path, prediction: str, steps, **options) -> list[float]:
    """Mean distance to the exact flow map from the same 256 points at T0, for each step count (uniform grids)."""
    g = single_gaussian()
    model = MixtureModel(g, path, prediction)
    al, be = get_path(path).coefficients(T0)[:2]
    x0 = (be * torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).double()
          + al * torch.tensor([1.0, -2.0], dtype=torch.float64))
    exact = g.flow_map(x0, T0, T1, path)
    errors = []
    for n in steps:
        grid = [T0 + (T1 - T0) * i / n for i in range(n + 1)]
        x = fastdiff.sample(model, None, noise=x0.float(), path=path, prediction=prediction, method=method,
                            timesteps=grid, **options)
        errors.append(float((x.double() - exact).norm(dim=1).mean()))
    return errors


def slopes(errors: list[float]) -> list[float]:
    """log2 of successive error ratios: the order where the step counts double."""
    return [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
