"""fastdiff.log_likelihood: the probability-flow ODE's log-density against closed forms (a Gaussian on every path
and prediction, the oracle module's mixture), Hutchinson's estimate against its stated standard error, and
itself across backends and batches."""

import math

import pytest
import torch
from conftest import BACKENDS

import fastdiff
from fastdiff.mixtures import GaussianMixture, MixtureModel, ring_mixture
from fastdiff.schedules import karras_sigmas, ve_timesteps

GAUSSIAN = GaussianMixture(torch.tensor([[1.0, -0.5, 2.0]]), stds=torch.tensor([[0.7, 1.3, 0.4]]))


def _data(mix, n, seed=0):
    return mix.sample(n, torch.Generator().manual_seed(seed))[0].float()


def _exact_prior(mix, path, t):
    return lambda z: mix.marginal(t, path).log_prob(z.double())


CASES = [("condot", p) for p in ("velocity", "x0", "eps", "score")] + [("vp", p) for p in ("velocity", "eps", "x0", "score")]


@pytest.mark.parametrize("path,prediction", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_gaussian_closed_form(path, prediction):
    """log N(x; μ, diag(s²)) to the ODE solver's accuracy (exact trace, Heun, 200 steps), with the path's exact
    marginal as the prior at the noise end (< 2e-4 nats per dimension; measured 1e-5 to 2e-4)."""
    x = _data(GAUSSIAN, 6)
    t_noise = 1e-3 if prediction in ("eps", "x0", "score") and path == "condot" else 0.0
    r = fastdiff.log_likelihood(MixtureModel(GAUSSIAN, path, prediction), x, 200, path=path, prediction=prediction,
                                t_noise=t_noise, prior=_exact_prior(GAUSSIAN, path, t_noise))
    exact = GAUSSIAN.log_prob(x.double())
    assert r.std_error is None and r.noise.shape == x.shape
    assert (r.log_prob - exact).abs().max().item() / 3 < 2e-4


@pytest.mark.parametrize("prediction", ["score", "x0"])
def test_ve_converges_at_second_order(prediction):
    """On VE (σ_max = 80) over Karras levels: the error against the closed form falls ~(1/n)² (measured: 1.2e-2
    at 60 levels, 1.1e-3 at 200, nats per dimension)."""
    x = _data(GAUSSIAN, 6)
    errors = []
    for n in (60, 200):
        ts = ve_timesteps(karras_sigmas(n, 0.002, 80.0))[::-1][1:]  # data (σ = 0.002) to noise (σ = 80)
        r = fastdiff.log_likelihood(MixtureModel(GAUSSIAN, "ve", prediction), x, None, timesteps=ts, path="ve",
                                    prediction=prediction, prior=_exact_prior(GAUSSIAN, "ve", ts[-1]))
        errors.append((r.log_prob - GAUSSIAN.log_prob(x.double())).abs().max().item() / 3)
    assert errors[1] < 2e-3 and errors[0] / errors[1] > 6, errors


def test_default_prior_is_the_standard_normal_on_condot():
    x = _data(GAUSSIAN, 4)
    r = fastdiff.log_likelihood(MixtureModel(GAUSSIAN), x, 100)
    z = r.noise.double()
    torch.testing.assert_close(r.prior_log_prob, -0.5 * (z * z).sum(1) - 1.5 * math.log(2 * math.pi))
    assert (r.log_prob - GAUSSIAN.log_prob(x.double())).abs().max().item() / 3 < 1e-4


def test_mixture_exact_trace_within_1e_3_nats_per_dimension():
    mix = ring_mixture()
    x = _data(mix, 64)
    r = fastdiff.log_likelihood(MixtureModel(mix), x, 250)
    assert (r.log_prob - mix.log_prob(x.double())).abs().max().item() / 2 < 1e-3


@pytest.mark.parametrize("probe_kind", ["rademacher", "gaussian"])
def test_hutchinson_within_its_standard_error(probe_kind):
    """Hutchinson probes give an unbiased estimate with a stated standard error: the exact log-density lies
    within 4 standard errors of every sample's estimate, and the errors shrink as sqrt(probes)."""
    mix = GaussianMixture(torch.randn(3, 6, generator=torch.Generator().manual_seed(1)) * 2, stds=0.6)
    x = _data(mix, 8)
    exact = mix.log_prob(x.double())
    kw = dict(divergence="hutchinson", probe_kind=probe_kind)
    r = fastdiff.log_likelihood(MixtureModel(mix), x, 20, probes=16, **kw)
    z = (r.log_prob - exact) / r.std_error
    assert bool((r.std_error > 0).all()) and z.abs().max().item() < 4.5, z  # t with 15 degrees of freedom
    r4 = fastdiff.log_likelihood(MixtureModel(mix), x, 20, probes=64, **kw)
    assert 1.3 < (r.std_error / r4.std_error).median().item() < 3.0  # ~2: four times the probes


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend):
    name, device = backend
    x = _data(GAUSSIAN, 3).to(device)
    model = MixtureModel(GAUSSIAN, "vp", "eps")
    ref = fastdiff.log_likelihood(model, x.cpu(), 8, path="vp", prediction="eps", divergence="hutchinson", probes=2,
                                  seed=[3, 4, 5], backend="reference")
    got = fastdiff.log_likelihood(model, x, 8, path="vp", prediction="eps", divergence="hutchinson", probes=2,
                                  seed=[3, 4, 5], backend=name)
    torch.testing.assert_close(got.log_prob.cpu(), ref.log_prob, rtol=1e-5, atol=1e-5)


def test_a_sample_is_the_same_alone_and_in_a_batch():
    mix = ring_mixture()
    x = _data(mix, 3)
    kw = dict(divergence="hutchinson", probes=3)
    batch = fastdiff.log_likelihood(MixtureModel(mix), x, 20, seed=[7, 8, 9], **kw)
    for b, s in enumerate((7, 8, 9)):
        alone = fastdiff.log_likelihood(MixtureModel(mix), x[b:b + 1], 20, seed=[s], **kw)
        assert alone.log_prob.item() == batch.log_prob[b].item() and torch.equal(alone.noise[0], batch.noise[b])


def test_bits_per_dim():
    # a uniform density on [-1, 1]^d (log p = -d log 2) quantized to 256 levels: exactly 8 bits per dimension
    d = 5
    assert fastdiff.bits_per_dim(torch.tensor([-d * math.log(2.0)]), d).item() == pytest.approx(8.0)


def test_errors_name_the_argument():
    model = MixtureModel(GAUSSIAN)
    x = _data(GAUSSIAN, 2)
    with pytest.raises(ValueError, match="method must be 'heun' or 'euler'"):
        fastdiff.log_likelihood(model, x, 4, method="ddim")
    with pytest.raises(ValueError, match="divergence must be"):
        fastdiff.log_likelihood(model, x, 4, divergence="trace")
    with pytest.raises(ValueError, match="probes must be an int"):
        fastdiff.log_likelihood(model, x, 4, divergence="hutchinson", probes=0)
    with pytest.raises(ValueError, match="timesteps must decrease"):
        fastdiff.log_likelihood(model, x, None, timesteps=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="singular at t = 1.0"):
        fastdiff.log_likelihood(MixtureModel(GAUSSIAN, "condot", "x0"), x, 4, prediction="x0", t_data=1.0)
    with pytest.raises(ValueError, match=r"prior\(z\) must return one log-density per sample"):
        fastdiff.log_likelihood(model, x, 4, prior=lambda z: z.sum())
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fastdiff.log_likelihood(model, torch.zeros(2, 3, dtype=torch.long), 4)
