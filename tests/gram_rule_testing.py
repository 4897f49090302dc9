"""What the tests of the branch-function guidance rules (test_tcfg, test_mambo_g, test_apg_mix, test_epsilon_scaling)
share: the backends, the loop's shapes and labels, the hand-written Euler loop the samplers are held against, the
CLI check, and a model of device ops only for the captured-loop checks."""

from __future__ import annotations

import argparse

import pytest
import torch

import fastdiff
from fastdiff.ops.randn import randn

from combination_matrix import gaussian_velocity_model as model

BACKENDS = [b for b in ("cpu", "reference", "triton") if fastdiff.backends()[b]]
SHAPE, B, STEPS = (2, 3), 3, 6
Y, Y2, NULL = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 3


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def kw(backend, **more):
    return dict(shape=SHAPE, seed=3, backend=backend, **more)


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def hand_euler(blend, grid=None, steps=STEPS, seed=3, batch=B):
    """Euler on CondOT from the sampler's own initial noise, in float64 (the blend's model in float32):
    x' = x + h blend(x, t) over ``grid`` (default: ``steps`` uniform steps from 0 to 1)."""
    x = randn(torch.arange(seed, seed + batch), 0, SHAPE).double()
    grid = [i / steps for i in range(steps + 1)] if grid is None else grid
    for t, t1 in zip(grid, grid[1:]):
        x = x + (t1 - t) * blend(x.float(), torch.full((batch,), t)).double()
    return x.float()


def branches(x, t, a=(1.0,), labels=(Y, Y2), null=NULL):
    """(p_null, Σ_k a_k p_k) of the model at (x, t): the unconditional branch and the weighted conditions."""
    p_null = model(x, t, torch.full((x.shape[0],), null))
    p_c = sum(ak * model(x, t, yk).double() for ak, yk in zip(a, labels))
    return p_null, p_c


def assert_cli_accepts(name: str) -> None:
    """``--guidance name`` parses in the sampling CLI."""
    from fastdiff.cli_sampler import add_sampler_arguments

    p = argparse.ArgumentParser()
    add_sampler_arguments(p)
    assert p.parse_args(["--checkpoint", "c.json", "--guidance", name]).guidance == name


def device_ops_model():
    """A model of device ops only (a linear map and a label embedding, no host read): what a captured loop runs."""
    lin = 0.2 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

    def m(x, t, y):
        return ((x.flatten(1) @ lin) * (1.0 + t[:, None]) + emb[y]).view_as(x)

    return m
