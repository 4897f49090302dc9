"""method="lms": k-diffusion's sample_lms (order 1-4) on the same denoiser, sigma grid (Karras and VP) and
initial state; its weights are the exact integrals of the Lagrange basis; the samples of an analytic
mixture (also on CondOT from t = 0, where the first step is DDIM's)."""

import pytest
import torch

import fastdiff
from fastdiff.adapters.k_diffusion import DenoiserModel
from fastdiff.sampling.methods.lms import lms_coefficients
from test_adapter_k_diffusion import Denoiser, _kd


@pytest.mark.parametrize("grid", ["karras", "vp"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_k_diffusion(grid, order):
    kd = _kd()
    den = Denoiser()
    sigmas = kd.get_sigmas_karras(12, 0.02, 30.0) if grid == "karras" else kd.get_sigmas_vp(12)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    model = DenoiserModel(den, sigmas)
    ours = fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method="lms",
                           timesteps=model.timesteps, order=order)
    theirs = kd.sample_lms(den, x, sigmas, disable=True, order=order)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())


def test_weights_are_k_diffusions_quadrature():
    kd = _kd()
    sigmas = kd.get_sigmas_karras(10, 0.1, 10.0).double().numpy()
    for i in range(3, 9):
        ours = lms_coefficients(list(sigmas), i, 4)
        theirs = [kd.linear_multistep_coeff(4, sigmas, i, j) for j in range(4)]
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    # order 1 is Euler: the weight is the step in sigma
    assert lms_coefficients([3.0, 2.0, 0.5], 1, 1) == [pytest.approx(-1.5)]


@pytest.mark.parametrize("path,prediction", [("vp", "eps"), ("condot", "velocity")])
def test_samples_the_mixture(path, prediction):
    from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    x = fastdiff.sample(model, None, method="lms", shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=_quadratic_grid(40))
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_options_and_paths_are_checked():
    from fastdiff.mixtures import MixtureModel, ring_mixture

    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), batch_size=2, path="condot", prediction="velocity", method="lms")
    assert torch.isfinite(fastdiff.sample(model, 10, **kw)).all()  # from t = 0: a DDIM step first
    assert torch.isfinite(fastdiff.sample(model, None, timesteps=[0.05 + 0.095 * i for i in range(11)], **kw)).all()
    with pytest.raises(ValueError, match=r"order must be an int in \[1, 4\]"):
        fastdiff.sample(model, None, timesteps=[0.1, 0.5, 1.0], order=5, **kw)
    with pytest.raises(ValueError, match="order applies to method=.*'lms'.*; method='euler' does not take it"):
        fastdiff.sample(model, 4, shape=(2,), batch_size=2, path="condot", method="euler", order=2)


def test_adapter_is_k_diffusions_sample_lms():
    from fastdiff.adapters import k_diffusion as fk

    kd = _kd()
    den = Denoiser()
    sigmas = kd.get_sigmas_karras(8, 0.05, 10.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    theirs = kd.sample_lms(den, x, sigmas, disable=True, order=3)
    torch.testing.assert_close(fk.sample_lms(den, x, sigmas, disable=True, order=3), theirs, rtol=0,
                               atol=2e-5 * theirs.abs().max().item())
