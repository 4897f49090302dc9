"""Editing (fastdiff.sampling.features.editing) on the analytic mixtures: inversion round trips (decreasing grids),
img2img / SDEdit (``strength``), inpainting (``known_mask``) with RePaint resampling against the exact
conditional of the unknown coordinates (fastdiff.mixture_conditionals.known_conditional)."""

import math

import pytest
import torch

import fastdiff
from fastdiff.mixture_conditionals import known_conditional
from fastdiff.mixtures import GaussianMixture, MixtureModel, mode_zscores, ring_mixture
from fastdiff.sampling.features.editing import KNOWN_SLOT, BACK_SLOT, edit_stream
from fastdiff.sampling.methods import methods
from conftest import BACKENDS

RING = ring_mixture(8, 4.0, 0.5)


def _data(n, seed=0):
    return RING.sample(n, torch.Generator().manual_seed(seed))[0].float()


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- inversion -----------------------------------------------------------------------------------

def test_heun_inversion_round_trip_error_vs_steps():
    """data -> noise -> data with Heun: second order (error / 4 per doubling, about), <= 1e-3 at 100 steps (the
    issue's bound; measured 4.9e-6)."""
    model = MixtureModel(RING)
    x = _data(256)
    errors = {}
    for steps in (25, 50, 100):
        latent = fastdiff.invert(model, x, steps, method="heun", backend="cpu")
        errors[steps] = _relative(fastdiff.sample(model, steps, noise=latent, method="heun", backend="cpu"), x)
    assert errors[100] <= 1e-3
    assert errors[50] < errors[25] / 3 and errors[100] < errors[50] / 3, errors


@pytest.mark.parametrize("record", [m for m in methods() if m.inverts], ids=lambda m: m.name)
def test_every_inverting_method_round_trips(record):
    """Each method registered with inverts=True recovers the data, better with more steps. The multistep ones step
    in the noise level, infinite at t = 1: their grid ends below 1."""
    model = MixtureModel(RING, "condot", "eps")
    x = _data(128, seed=1)
    errors = []
    for steps in (25, 100):
        grid = [1e-3 + (1 - 2e-3) * i / steps for i in range(steps + 1)]
        kw = dict(timesteps=grid, prediction="eps", method=record.name, backend="cpu")
        latent = fastdiff.invert(model, x, None, **kw)
        errors.append(_relative(fastdiff.sample(model, None, noise=latent, **kw), x))
    assert errors[1] < 2e-2 and errors[1] < errors[0] / 2, errors


def test_inverted_data_is_standard_normal():
    """The probability-flow map sends the data distribution to the noise: latents of data samples have mean 0 and
    covariance I (within sampling error)."""
    model = MixtureModel(RING)
    latent = fastdiff.invert(model, _data(8000, seed=2), 25, method="heun", backend="cpu").double()
    se = 1 / math.sqrt(8000)
    assert latent.mean(0).abs().max() < 4 * se
    assert (torch.cov(latent.T) - torch.eye(2)).abs().max() < 6 * se


@pytest.mark.parametrize("backend", BACKENDS)
def test_inversion_on_every_backend(backend):
    """The decreasing grid runs the same kernels: each backend's latent equals the reference's."""
    name, device = backend
    model = MixtureModel(RING)
    x = _data(8, seed=3)
    ours = fastdiff.invert(model, x.to(device), 8, method="ddim", backend=name)
    ref = fastdiff.invert(model, x, 8, method="ddim", backend="reference")
    torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


def test_inversion_refuses_what_does_not_invert():
    model = MixtureModel(RING)
    x = _data(4)
    with pytest.raises(ValueError, match="needs a method that inverts"):
        fastdiff.invert(model, x, 10, method="lms")
    for kw in (dict(method="euler", sigma=1.0), dict(method="ddim", eta=1.0), dict(method="heun", s_churn=1.0)):
        with pytest.raises(ValueError, match="must be deterministic"):
            fastdiff.invert(model, x, 10, **kw)
    with pytest.raises(ValueError, match="strictly increasing .* or strictly decreasing"):
        fastdiff.sample(model, None, noise=x, timesteps=[1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="give the sampling grid"):
        fastdiff.invert(model, x, None, timesteps=[1.0, 0.5, 0.0])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fastdiff.invert(model, [1.0, 2.0], 10)


# ---- img2img / SDEdit ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_strength_one_is_plain_sampling(backend):
    """strength = 1 starts at the grid's first time from alpha_0 init + beta_0 z, z the initial noise: with
    alpha_0 = 0 (CondOT) plain sampling, bit for bit."""
    name, device = backend
    model = MixtureModel(RING)
    x = _data(8).to(device)
    edited = fastdiff.sample(model, 6, init=x, strength=1.0, seed=7, backend=name)
    plain = fastdiff.sample(model, 6, batch_size=8, shape=(2,), seed=7, backend=name, device=device)
    assert torch.equal(edited, plain)


def test_strength_runs_the_grid_tail_from_the_noised_data():
    """strength s runs the last int(steps s) steps; the model's first input is alpha_t init + beta_t z at the first
    of them (diffusers' img2img rule)."""
    inputs = []

    def model(x, t, y):
        inputs.append((x.clone(), t.clone()))
        return -x
    x = _data(16)
    fastdiff.sample(model, 10, init=x, strength=0.45, seed=3, backend="cpu")
    assert len(inputs) == 4  # int(10 * 0.45) = 4 Euler steps
    t0 = 0.6
    torch.testing.assert_close(inputs[0][1], torch.full((16,), t0))
    z = fastdiff.ops.randn(torch.arange(3, 19), 0, (2,))
    torch.testing.assert_close(inputs[0][0], t0 * x + (1 - t0) * z, rtol=0, atol=1e-6)


def test_sdedit_keeps_the_data_distribution():
    """Noising data to t and integrating the exact probability-flow ODE back returns the data distribution."""
    model = MixtureModel(RING)
    out = fastdiff.sample(model, 40, init=_data(8000, seed=4), strength=0.6, method="heun", backend="cpu")
    z = mode_zscores(out, RING)
    assert z.weights.abs().max() < 4.5 and z.means.abs().max() < 5 and z.covs.abs().max() < 6


def test_editing_errors_name_the_argument():
    model = MixtureModel(RING)
    x = _data(4)
    for strength in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="strength must be in"):
            fastdiff.sample(model, 10, init=x, strength=strength)
    with pytest.raises(ValueError, match="runs int"):
        fastdiff.sample(model, 3, init=x, strength=0.2)
    with pytest.raises(ValueError, match="give init"):
        fastdiff.sample(model, 3, batch_size=4, shape=(2,), strength=0.5)
    with pytest.raises(ValueError, match="not both"):
        fastdiff.sample(model, 3, init=x, noise=x, strength=0.5)
    with pytest.raises(ValueError, match="init holds inf or NaN"):
        fastdiff.sample(model, 3, init=torch.full((4, 2), math.nan), strength=0.5)
    with pytest.raises(ValueError, match="init has per-sample shape"):
        fastdiff.sample(model, 3, init=x, shape=(3,), strength=0.5)
    with pytest.raises(ValueError, match="known_mask of shape"):
        fastdiff.sample(model, 3, init=x, known_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        fastdiff.sample(model, 3, init=x, known_mask=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="resample .* applies to inpainting"):
        fastdiff.sample(model, 3, init=x, strength=0.9, resample=4)
    with pytest.raises(ValueError, match="resample .* a multistep method"):
        fastdiff.sample(model, 10, init=x, known_mask=torch.tensor([True, False]), resample=4, method="dpmpp_2m")


# ---- inpainting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_inpainting_keeps_the_known_region_exactly(backend):
    """Image-shaped samples, a mask broadcast over the batch: the known pixels end as init's, bit for bit, the
    others are sampled (with CFG and RePaint repeats too); every backend gives the reference's samples."""
    name, device = backend
    shape = (3, 5, 7)

    def model(x, t, y):
        return torch.tanh(x + y.view(-1, 1, 1, 1)) - x
    init = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    mask = (torch.rand(1, *shape, generator=torch.Generator().manual_seed(1)) < 0.4).to(device)
    y = torch.arange(4, device=device).float()
    kw = dict(cfg=2.0, y=y, null_y=0.0, init=init, known_mask=mask, resample=2, method="euler", sigma=0.5, seed=9)
    out = fastdiff.sample(model, 5, backend=name, **kw)
    assert torch.equal(out[mask.expand_as(out)], init[mask.expand_as(init)])
    assert not torch.isclose(out, init)[~mask.expand_as(out)].any()
    ref = fastdiff.sample(model, 5, backend="reference", **{**kw, "init": init.cpu(), "known_mask": mask.cpu(),
                                                            "y": y.cpu()})
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


# A 2-D mixture whose coordinates are correlated within each component: given the first coordinate, the second
# follows a two-component mixture that plain replacement misses badly (the imputation bias)
CORRELATED = GaussianMixture(torch.tensor([[-2.0, -1.5], [2.0, 1.5]]),
                             torch.tensor([[[1.0, 0.6], [0.6, 1.0]], [[1.0, -0.5], [-0.5, 1.0]]]))


def test_repaint_samples_the_conditional_of_the_unknown_coordinates():
    """Known x_0 = 0.5: the unknown x_1 follows the exact conditional mixture (mean 1.98, variance 1.27, 88 % in
    the right component) with RePaint's repeats; plain replacement lands near 0.4 (measured), far off."""
    model = MixtureModel(CORRELATED)
    n = 2000
    init = torch.tensor([[0.5, 0.0]]).expand(n, 2).contiguous()
    mask = torch.tensor([True, False])
    exact = known_conditional(CORRELATED, mask, torch.tensor([0.5]))
    mean, var = exact.mean.item(), exact.covariance.item()

    def unknown(resample):
        out = fastdiff.sample(model, 50, init=init, known_mask=mask, resample=resample, method="euler", sigma=1.0,
                              backend="cpu", seed=0)
        assert torch.equal(out[:, 0], init[:, 0])
        return out[:, 1].double()
    repaint, plain = unknown(20), unknown(1)
    se = math.sqrt(var / n)
    assert abs(repaint.mean().item() - mean) < 4 * se + 0.05  # + the 50-step discretization (measured 0.03)
    assert abs(repaint.var().item() - var) < 0.15 * var
    assert abs(plain.mean().item() - mean) > 10 * abs(repaint.mean().item() - mean)


def test_editing_streams_are_apart_from_the_sampling_streams():
    """Editing draws: ids >= 2^31, distinct per (step, repeat, slot), beside the steps' draws (< 2^26) and the
    Brownian nodes (2^30 + n)."""
    ids = {edit_stream(i, r, s) for i in (0, 1, 99_999) for r in (0, 1, 1023) for s in (0, 3, KNOWN_SLOT, BACK_SLOT)}
    assert len(ids) == 3 * 3 * 4 and min(ids) >= 1 << 31 and max(ids) < 1 << 32
    with pytest.raises(ValueError, match="edit_stream"):
        edit_stream(0, 1024, 0)
