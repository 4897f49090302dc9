"""methods "dpmpp_2m_sde" and "dpmpp_3m_sde": k-diffusion's sample_dpmpp_2m_sde (eta, s_noise, solver_type)
and sample_dpmpp_3m_sde on the same denoiser, sigma grid (Karras and VP), initial state and noise
(fastdiff's stream fed through k-diffusion's noise_sampler); eta = 0 of the 2M SDE is DPM-Solver++(2M);
the samples of an analytic mixture."""

import math

import pytest
import torch

import fastdiff
from fastdiff.adapters.k_diffusion import DenoiserModel
from fastdiff.sampling.methods.coefficients import draw_stream
from fastdiff.sampling.methods import get_method
from test_adapter_k_diffusion import Denoiser, _kd


def _fastdiff(den, x, sigmas, seeds, method="dpmpp_2m_sde", **options):
    model = DenoiserModel(den, sigmas)
    return fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method=method,
                           timesteps=model.timesteps, seed=seeds, **options)


def _sigmas(kd, grid):
    if grid == "karras":
        return kd.get_sigmas_karras(12, 0.02, 30.0)
    return kd.get_sigmas_vp(12)  # the VP-SDE's sigmas (beta_d = 19.9, beta_min = 0.1), ending at 0


@pytest.mark.parametrize("grid", ["karras", "vp"])
@pytest.mark.parametrize("method,eta,s_noise,solver_type", [
    ("dpmpp_2m_sde", 1.0, 1.0, "midpoint"), ("dpmpp_2m_sde", 1.0, 1.0, "heun"), ("dpmpp_2m_sde", 0.5, 0.8, "midpoint"),
    ("dpmpp_2m_sde", 0.7, 1.2, "heun"), ("dpmpp_2m_sde", 0.0, 1.0, "midpoint"),
    ("dpmpp_3m_sde", 1.0, 1.0, None), ("dpmpp_3m_sde", 0.6, 1.1, None), ("dpmpp_3m_sde", 0.0, 1.0, None)])
def test_matches_k_diffusion_on_the_same_noise(grid, method, eta, s_noise, solver_type):
    kd = _kd()
    den = Denoiser()
    sigmas = _sigmas(kd, grid)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    seeds = [5, 6, 7]
    kw = dict(eta=eta, s_noise=s_noise, **({"solver_type": solver_type} if solver_type else {}))
    ours = _fastdiff(den, x, sigmas, seeds, method, **kw)
    calls = []

    def noise(s, s_next):  # k-diffusion asks for one draw per step with sigma' > 0: step i's stream
        i = int(torch.nonzero(sigmas == s)[0])
        calls.append(i)
        return fastdiff.ops.randn(seeds, draw_stream(i), x.shape[1:])

    theirs = getattr(kd, f"sample_{method}")(den, x, sigmas, disable=True, noise_sampler=noise, **kw)
    assert calls == (list(range(len(sigmas) - 2)) if eta else [])
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * scale)  # fp32: 2e-5 of max |x|


def test_eta_zero_is_dpmpp_2m():
    """eta = 0 (either solver type's midpoint form) is the deterministic DPM-Solver++(2M): the same
    coefficients to float64 rounding and the same samples to float32 rounding."""
    from fastdiff.mixtures import MixtureModel, ring_mixture

    path, grid = fastdiff.paths.get_path("vp"), [0.0] + [1 - (1 - u / 20) ** 2 for u in range(1, 21)]
    sde = get_method("dpmpp_2m_sde").stages(path, grid, "x0", eta=0.0, s_noise=1.0, solver_type="midpoint")
    ode = get_method("dpmpp_2m").stages(path, grid, "x0")
    for a, b in zip(sde, ode):
        assert a.c_noise == 0.0 and (a.extra is None) == (b.extra is None)
        for name in ("c_x", "c_pred", "c_extra", "s_x", "s_pred"):
            assert math.isclose(getattr(a, name), getattr(b, name), rel_tol=1e-13, abs_tol=1e-300), name
    model = MixtureModel(ring_mixture(), "vp", "x0")
    kw = dict(shape=(2,), seed=1, path="vp", prediction="x0", batch_size=512, timesteps=grid)
    torch.testing.assert_close(fastdiff.sample(model, None, method="dpmpp_2m_sde", eta=0.0, **kw),
                               fastdiff.sample(model, None, method="dpmpp_2m", **kw), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,solver_type,path,prediction", [
    ("dpmpp_2m_sde", "midpoint", "vp", "x0"), ("dpmpp_2m_sde", "heun", "vp", "x0"),
    ("dpmpp_2m_sde", "midpoint", "condot", "velocity"), ("dpmpp_3m_sde", None, "vp", "x0"),
    ("dpmpp_3m_sde", None, "condot", "velocity")])
def test_samples_the_mixture(method, solver_type, path, prediction):
    """On an analytic mixture (exact predictions): the samples have the mixture's mode weights, means and
    covariances (z-scores within statistical error)."""
    from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    x = fastdiff.sample(model, None, method=method, shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=_quadratic_grid(60),
                        **({"solver_type": solver_type} if solver_type else {}))
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_condot_from_pure_noise(method):
    """From t = 0 on the CondOT path (alpha = 0: lambda = -inf) the first step is a full re-noising of the
    x0 prediction (alpha' D + beta' xi); the sampler is finite and seeded per sample."""
    from fastdiff.mixtures import MixtureModel, ring_mixture

    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), path="condot", prediction="velocity", method=method)
    a = fastdiff.sample(model, 30, seed=[11, 12, 13], batch_size=3, **kw)
    b = fastdiff.sample(model, 30, seed=[12], batch_size=1, **kw)
    assert torch.isfinite(a).all() and torch.equal(a[1:2], b)


def test_options_are_checked():
    den = Denoiser()
    sigmas = torch.tensor([10.0, 2.0, 0.0])
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun'"):
        _fastdiff(den, x, sigmas, [0], solver_type="euler")
    with pytest.raises(ValueError, match="s_noise must be a finite number"):
        _fastdiff(den, x, sigmas, [0], s_noise=float("nan"))
    model = DenoiserModel(den, sigmas)
    with pytest.raises(ValueError, match="solver_type applies to method='dpmpp_2m_sde'"):
        fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method="dpmpp_2m",
                        timesteps=model.timesteps, solver_type="heun")
