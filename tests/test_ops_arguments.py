"""No silent coercions: every guided_step coefficient must be a finite real number (not a string, a
bool, a tensor, NaN or inf), and add_noise / diffusion_loss refuse flow times outside [0, 1] or
non-finite. Errors name the argument."""

import math

import pytest
import torch
from conftest import BACKENDS

from fastdiff import ops
from fastdiff.ops.guided_step import COEFFICIENTS

BAD_COEFFICIENTS = [("1", TypeError, "real number"), (True, TypeError, "real number"),
                    (torch.tensor(1.0), TypeError, "real number"), (None, TypeError, "real number"),
                    (1 + 0j, TypeError, "real number"), (math.nan, ValueError, "finite"),
                    (math.inf, ValueError, "finite"), (-math.inf, ValueError, "finite")]


@pytest.mark.parametrize("value,exc,what", BAD_COEFFICIENTS, ids=lambda v: repr(v) if not callable(v) else None)
@pytest.mark.parametrize("coefficient", COEFFICIENTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_step_coefficients_must_be_finite_real_numbers(backend, coefficient, value, exc, what):
    name, device = backend
    x = torch.zeros(2, 5, device=device)
    for step in (ops.guided_step, ops.guided_step_reference):
        kw = {} if step is ops.guided_step_reference else {"backend": name}
        with pytest.raises(exc, match=f"^{coefficient} must be .*{what}"):
            step(x, x, x, seeds=[1, 2], **{coefficient: value}, **kw)


def test_guided_step_accepts_ints_and_numpy_floats():
    np = pytest.importorskip("numpy")
    x = torch.ones(2, 5)
    want = ops.guided_step(x, x, c_x=2.0, c_pred=0.0)
    assert torch.equal(ops.guided_step(x, x, c_x=2, c_pred=0), want)
    assert torch.equal(ops.guided_step(x, x, c_x=np.float64(2.0), c_pred=np.float32(0.0)), want)


BAD_TIMES = [-0.1, 1.5, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BAD_TIMES)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_times_outside_0_1_are_refused(backend, as_tensor, bad):
    name, device = backend
    z = torch.zeros(2, 5, device=device)
    t = torch.tensor([0.5, bad], dtype=torch.float64, device=device) if as_tensor else bad
    if as_tensor and device != "cpu":
        # on a GPU no host sync: the bad sample's results are NaN, the others untouched
        x = ops.add_noise(z, t, [1, 2], 0, backend=name)
        assert torch.isfinite(x[0]).all() and torch.isnan(x[1]).all()
        loss = ops.diffusion_loss(z, z, t, [1, 2], 0, reduction="none", backend=name)
        assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
        return
    with pytest.raises(ValueError, match="^t must .*in \\[0, 1\\]"):
        ops.add_noise(z, t, [1, 2], 0, backend=name)
    with pytest.raises(ValueError, match="^t must .*in \\[0, 1\\]"):
        ops.diffusion_loss(z, z, t, [1, 2], 0, backend=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_times_at_the_ends_are_accepted(backend):
    name, device = backend
    z = torch.zeros(2, 5, device=device)
    eps = ops.randn_reference(torch.tensor([1, 2]), 0, (5,))
    x = ops.add_noise(z, torch.tensor([0.0, 1.0], dtype=torch.float64, device=device), [1, 2], 0, backend=name)
    # condot: t = 0 is the noise, t = 1 the data
    torch.testing.assert_close(x[0].cpu(), eps[0], rtol=0, atol=1e-5)
    assert torch.equal(x[1].cpu(), z[1].cpu())
    loss = ops.diffusion_loss(z, z, torch.tensor([0.0, 1.0], device=device), [1, 2], 0, prediction="x0",
                              reduction="none", backend=name)
    assert torch.equal(loss.cpu(), torch.zeros(2))  # pred = z is the x0 target at both ends
    loss = ops.diffusion_loss(z, z, 1, [1, 2], 0, backend=name)  # velocity target z - eps
    torch.testing.assert_close(loss.cpu(), eps.square().mean(), rtol=1e-5, atol=1e-6)
