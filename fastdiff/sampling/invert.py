"""Inversion (``fastdiff.invert``): a decreasing grid integrates the probability-flow ODE from data to noise
with any method registered with ``inverts=True`` (DDIM inversion is method="ddim")."""

from __future__ import annotations

import torch

from fastdiff.paths import check_prediction, get_path
from fastdiff.sampling.core.arguments import time_grid
from fastdiff.sampling.methods.registry import get_method
from fastdiff.sampling.sampler import sample


def invert(model, x: torch.Tensor, steps: int | None = 50, cfg: float = 1.0, *, timesteps=None, schedule=None,
           path="condot", prediction: str = "velocity", method: str = "heun", **kwargs) -> torch.Tensor:
    """Inversion: integrate the probability-flow ODE from the data ``x`` [B, *shape] (t = the grid's end, 1 by
    default) back to noise (its start), on the reversed grid that ``fastdiff.sample`` with the same ``steps`` /
    ``timesteps`` (or ``schedule``, fastdiff.schedules), path, prediction and method runs, so that
    ``sample(model, steps, noise=invert(model, x, steps))``
    gives x back up to the discretization error of both ways. Methods registered with inverts=True (heun,
    euler, ddim: DDIM inversion, dpmpp_2m, deis, ipndm, unipc); the multistep ones step in the noise level,
    infinite at t = 1, so their grid must end below 1 (``timesteps``). ``kwargs`` are sample()'s (y, cfg,
    null_y, backend, ...)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor [B, *shape] (the data to invert), got "
                        + (f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                           else type(x).__name__))
    if not bool(torch.isfinite(x).all()):  # else the first model call is blamed for the data's inf/NaN
        raise ValueError("x (the data to invert) holds inf or NaN")
    record = get_method(method)
    grid = time_grid(steps, timesteps, get_path(path), check_prediction(prediction), record.needed_conversions(),
                     schedule=schedule)
    if grid[0] > grid[-1]:
        raise ValueError("timesteps: give the sampling grid (increasing, noise to data); invert runs it backwards")
    return sample(model, None, cfg, noise=x, timesteps=grid[::-1], path=path, prediction=prediction, method=method,
                  **kwargs)
