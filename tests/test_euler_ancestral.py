"""method="euler_ancestral": k-diffusion's sample_euler_ancestral (eta, s_noise) on the same denoiser,
sigma grid, initial state and noise (fastdiff's stream fed through k-diffusion's noise_sampler), and
its definition: DDIM(eta) with the noise scaled by s_noise."""

import pytest
import torch

import fastdiff
from fastdiff.adapters.k_diffusion import DenoiserModel
from fastdiff.sampling.methods.coefficients import draw_stream
from test_adapter_k_diffusion import Denoiser, _kd


def _fastdiff(den, x, sigmas, seeds, **options):
    model = DenoiserModel(den, sigmas)
    return fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method="euler_ancestral",
                           timesteps=model.timesteps, seed=seeds, **options)


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.8), (0.3, 1.3)])
def test_matches_k_diffusion_on_the_same_noise(eta, s_noise):
    kd = _kd()
    den = Denoiser()
    sigmas = kd.get_sigmas_karras(10, 0.01, 20.0)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    seeds = [5, 6, 7]
    kw = {} if (eta, s_noise) == (1.0, 1.0) else {"eta": eta, "s_noise": s_noise}  # k-diffusion's defaults
    ours = _fastdiff(den, x, sigmas, seeds, **kw)
    step = iter(range(len(sigmas)))
    noise = lambda s, s_next: fastdiff.ops.randn(seeds, draw_stream(next(step)), x.shape[1:])  # noqa: E731
    theirs = kd.sample_euler_ancestral(den, x, sigmas, disable=True, noise_sampler=noise, **kw)
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * scale)  # fp32: 1e-5 of max |x|


def test_is_ddim_with_scaled_noise_and_samples_the_mixture():
    """On an analytic mixture (exact x0 predictions, VP path, 100 steps): eta = s_noise = 1 is DDIM(eta = 1)
    bit for bit, eta = 0 is deterministic DDIM, and the samples have the mixture's mode weights, means and
    covariances (z-scores within statistical error)."""
    from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, "vp", "x0")
    kw = dict(shape=(2,), seed=3, path="vp", prediction="x0", batch_size=N, timesteps=_quadratic_grid(100))  # ancestral: more steps than DDIM(0) for the covariances
    x = fastdiff.sample(model, None, method="euler_ancestral", **kw)
    assert torch.equal(x, fastdiff.sample(model, None, method="ddim", eta=1.0, **kw))
    assert torch.equal(fastdiff.sample(model, None, method="euler_ancestral", eta=0.0, **kw),
                       fastdiff.sample(model, None, method="ddim", **kw))
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0
    # s_noise scales the added noise only: s_noise = 0 keeps DDIM(eta)'s step to sigma_down, no noise
    quiet = fastdiff.sample(model, None, method="euler_ancestral", s_noise=0.0, **kw)
    assert not torch.equal(quiet, x) and torch.isfinite(quiet).all()


def test_options_are_checked():
    den = Denoiser()
    sigmas = torch.tensor([10.0, 2.0, 0.0])
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="s_noise must be a finite number"):
        _fastdiff(den, x, sigmas, [0], s_noise=-1.0)
    model = DenoiserModel(den, sigmas)
    with pytest.raises(ValueError, match="s_noise applies to method=.*'euler_ancestral'.*; method='ddim' does not take it"):
        fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method="ddim",
                        timesteps=model.timesteps, s_noise=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'churn'"):
        fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method="ddim",
                        timesteps=model.timesteps, churn=0.5)
