"""Empty inputs, defined as torch.nn.functional.mse_loss defines them: a sample with no elements has
loss NaN (a mean over nothing) and an empty gradient; no samples give an empty [0] loss whose mean is
NaN and sum 0. Every backend and the reference agree, forward and backward (2 / n with n = 0 raised
ZeroDivisionError)."""

import math

import pytest
import torch
from conftest import BACKENDS

from fastdiff import ops


@pytest.mark.parametrize("shape", [(0, 5), (0,), (2, 0), (2, 3, 0)], ids=["B0", "B0_scalar", "n0", "n0_3d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_of_empty_inputs(backend, shape):
    name, device = backend
    B = shape[0]
    pred = torch.zeros(shape, device=device, requires_grad=True)
    z = torch.zeros(shape, device=device)
    t = torch.full((B,), 0.5, dtype=torch.float64, device=device)
    seeds = torch.arange(B, device=device)
    per_sample = ops.diffusion_loss(pred, z, t, seeds, 0, reduction="none", backend=name)
    assert per_sample.shape == (B,) and per_sample.dtype == torch.float32
    if B:  # n = 0: each sample's loss is a mean over no elements (B = 0: the [0] shape above is the claim)
        assert bool(per_sample.isnan().all())
    mean = ops.diffusion_loss(pred, z, t, seeds, 0, backend=name)
    assert mean.shape == () and mean.dtype == torch.float32 and mean.device == pred.device
    assert math.isnan(float(mean.detach()))  # as torch.nn.functional.mse_loss(empty, empty)
    total = ops.diffusion_loss(pred, z, t, seeds, 0, reduction="sum", backend=name)
    assert total.shape == () and total.dtype == torch.float32
    assert float(total.detach()) == 0.0 if B == 0 else math.isnan(float(total.detach()))
    for reduction in ("mean", "sum", "none"):
        pred.grad = None
        out = ops.diffusion_loss(pred, z, t, seeds, 0, reduction=reduction, backend=name)
        (out.sum() if reduction == "none" else out).backward()
        assert pred.grad.shape == shape and pred.grad.numel() == 0


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B0", "n0"])
def test_backward_references_of_empty_inputs(shape):
    B = shape[0]
    pred, z = torch.zeros(shape), torch.zeros(shape)
    c, seeds = torch.ones(B), torch.arange(B)
    grad = ops.diffusion_loss_backward_reference(c, pred, z, c, c, c, seeds, 0)
    assert grad.shape == shape
    loss, residual = ops.diffusion_loss_residual_reference(pred, z, c, c, c, seeds, 0)
    assert loss.shape == (B,) and bool(loss.isnan().all()) and residual.shape == shape
    from fastdiff.ops.diffusion_loss import grad_from_residual

    assert grad_from_residual(c, residual, c, torch.float16).shape == shape


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B0", "n0"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_noise_of_empty_inputs(backend, shape):
    name, device = backend
    B = shape[0]
    z = torch.zeros(shape, device=device, requires_grad=True)
    t = torch.full((B,), 0.5, dtype=torch.float64, device=device, requires_grad=True)
    x = ops.add_noise(z, t, torch.arange(B, device=device), 0, backend=name)
    assert x.shape == shape
    x.sum().backward()
    assert z.grad.shape == shape and t.grad.shape == (B,) and not bool(t.grad.any())
