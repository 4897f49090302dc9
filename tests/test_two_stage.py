"""methods "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral" and "dpmpp_sde" (fastdiff/sampling/methods/two_stage.py):
k-diffusion's samplers of the same names on the same denoiser, sigma grid (Karras and VP), initial state
and noise (fastdiff's streams fed through k-diffusion's noise_sampler); the samples of an analytic
mixture on other paths; the midpoint times."""

import math

import pytest
import torch

import fastdiff
from fastdiff.adapters import k_diffusion as fk
from fastdiff.sampling.methods.coefficients import draw_stream
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.sigma_space import noise_level, time_at
from test_adapter_k_diffusion import Denoiser, _kd

ANCESTRAL = ["dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"]


def _sigmas(kd, grid):
    if grid == "karras":
        return kd.get_sigmas_karras(10, 0.02, 30.0)
    return kd.get_sigmas_vp(10)


def _noise_feed(sigmas, seeds, shape, draws_per_step):
    """k-diffusion's noise_sampler(sigma, sigma_next) answering with fastdiff's draws: step i from
    sigma == sigmas[i] draws draw_stream(i); dpmpp_sde's two calls of step i, (sigma, sigma_s) then
    (sigma, sigma'), get xi_0 and rho xi_0 + sqrt(1 - rho^2) xi_1 (Brownian increments over nested
    intervals of sigma, rho^2 = (sigma - sigma_s) / (sigma - sigma'))."""
    calls, first = [], {}

    def noise(s, s_next):
        i = int(torch.nonzero(torch.isclose(sigmas, s.to(sigmas.dtype), rtol=1e-6, atol=0))[0])
        d = sum(1 for c in calls if c == i)
        calls.append(i)
        assert d < draws_per_step
        xi = fastdiff.ops.randn(seeds, draw_stream(i, 0), shape)
        if d == 0:
            first[i] = float(s_next)
            return xi
        rho = math.sqrt((float(s) - first[i]) / (float(s) - float(s_next)))
        return rho * xi + math.sqrt(1 - rho * rho) * fastdiff.ops.randn(seeds, draw_stream(i, 1), shape)

    return noise, calls


@pytest.mark.parametrize("grid", ["karras", "vp"])
@pytest.mark.parametrize("method,kw", [
    ("dpm_2", {}), ("dpm_2_ancestral", {}), ("dpm_2_ancestral", dict(eta=0.6, s_noise=1.1)),
    ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", dict(eta=0.5, s_noise=0.9)),
    ("dpmpp_2s_ancestral", dict(eta=0.0)), ("dpmpp_sde", {}), ("dpmpp_sde", dict(eta=0.7, s_noise=1.2, r=0.3)),
    ("dpmpp_sde", dict(eta=0.0, r=0.5))])
def test_matches_k_diffusion_on_the_same_noise(grid, method, kw):
    kd = _kd()
    den = Denoiser()
    sigmas = _sigmas(kd, grid)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    seeds = [5, 6, 7]
    ours = getattr(fk, f"sample_{method}")(den, x, sigmas, disable=True, seed=seeds, **kw)
    ours_calls = [c.clone() for c in den.calls]
    den.calls.clear()
    extra = {}
    if method in ANCESTRAL:
        noise, calls = _noise_feed(sigmas, seeds, x.shape[1:], 2 if method == "dpmpp_sde" else 1)
        extra["noise_sampler"] = noise
    theirs = getattr(kd, f"sample_{method}")(den, x, sigmas, disable=True, **kw, **extra)
    # the same noise levels handed to the denoiser, in the same order (k-diffusion computes sigma_down in
    # float32, with cancellation in sigma^2 - sigma'^2 between close levels: up to ~3e-5 relative)
    assert len(ours_calls) == len(den.calls) == 2 * (len(sigmas) - 1) - 1
    for a, b in zip(ours_calls, den.calls):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=0)
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * scale)  # fp32: 2e-5 of max |x|


@pytest.mark.parametrize("method,path,prediction", [
    ("dpm_2", "vp", "eps"), ("dpm_2", "condot", "velocity"), ("dpm_2_ancestral", "vp", "x0"),
    ("dpmpp_2s_ancestral", "vp", "eps"), ("dpmpp_2s_ancestral", "vp-cosine", "velocity"), ("dpmpp_sde", "vp", "x0"),
    ("dpmpp_sde", "condot", "velocity")])
def test_samples_the_mixture(method, path, prediction):
    """On an analytic mixture (exact predictions), on paths other than k-diffusion's: the samples have the
    mixture's mode weights, means and covariances (z-scores within statistical error)."""
    from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    grid = _quadratic_grid(30)  # on condot from t = 0: the first step from sigma = inf is DDIM's limit
    x = fastdiff.sample(model, None, method=method, shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=grid)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_midpoints_sit_at_the_geometric_mean_noise_level():
    path, grid = fastdiff.paths.get_path("vp"), [0.05, 0.3, 0.7, 1.0]
    stages = get_method("dpm_2").stages(path, grid, "eps")
    assert [st.step for st in stages] == [0, 0, 1, 1, 2]  # the last step, to sigma = 0, is Euler's
    for i in range(2):
        mid = stages[2 * i + 1].t
        want = math.sqrt(noise_level(path, grid[i]) * noise_level(path, grid[i + 1]))
        assert grid[i] < mid < grid[i + 1]
        assert math.isclose(noise_level(path, mid), want, rel_tol=1e-12)


def test_time_at_inverts_the_noise_level():
    for name in ("vp", "vp-cosine", "condot", "ve"):
        path = fastdiff.paths.get_path(name)
        for t in (1e-3, 0.2, 0.5, 0.93, 0.999):
            assert math.isclose(time_at(path, noise_level(path, t), 0.0, 1.0), t, rel_tol=1e-12, abs_tol=1e-15)
    with pytest.raises(ValueError, match="outside"):
        time_at(fastdiff.paths.get_path("vp"), 1e-6, 0.0, 0.5)


def test_the_draws_of_dpmpp_sde():
    """dpmpp_sde draws stream draw_stream(i, 0) in step i's first stage and both draw_stream(i, 0) and
    draw_stream(i, 1) in its second (the Brownian increment over the whole step); eta = 0 draws none."""
    path, grid = fastdiff.paths.get_path("vp"), [0.1, 0.4, 0.8, 1.0]
    stages = get_method("dpmpp_sde").stages(path, grid, "x0", eta=1.0, s_noise=1.0, r=0.5)
    assert [(st.step, st.streams()) for st in stages if st.streams()] == [
        (0, [draw_stream(0, 0)]), (0, [draw_stream(0, 0), draw_stream(0, 1)]),
        (1, [draw_stream(1, 0)]), (1, [draw_stream(1, 0), draw_stream(1, 1)])]
    assert not any(st.c_noise for st in get_method("dpmpp_sde").stages(path, grid, "x0", eta=0.0, s_noise=1.0, r=0.5))
    assert all(st.side is None for st in stages)  # r = 1/2: the second stage needs no first-stage D


def test_options_are_checked():
    model = fastdiff.mixtures.MixtureModel(fastdiff.mixtures.ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps", timesteps=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"r must be in \(0, 1\]"):
        fastdiff.sample(model, None, method="dpmpp_sde", r=0.0, **kw)
    with pytest.raises(ValueError, match="s_noise must be a finite number"):
        fastdiff.sample(model, None, method="dpmpp_2s_ancestral", s_noise=-1.0, **kw)
    with pytest.raises(ValueError, match="r applies to method='dpmpp_sde'"):
        fastdiff.sample(model, None, method="dpm_2", r=0.3, **kw)


@pytest.mark.parametrize("method", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                    "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_a_noise_sampler_is_honoured(method):
    """A user's noise_sampler (k-diffusion's Brownian tree, seeded) is called as k-diffusion calls it — the
    same (sigma, sigma_next) pairs in the same order — and its noise used: the same samples as
    k-diffusion's with the same sampler."""
    kd = _kd()
    pytest.importorskip("torchsde")
    den = Denoiser()
    sigmas = kd.get_sigmas_karras(8, 0.03, 20.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]

    def recorded(calls):
        tree = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=7)

        def noise(s, s_next):
            calls.append((float(s), float(s_next)))
            return tree(s, s_next)
        return noise

    ours_calls, theirs_calls = [], []
    ours = getattr(fk, f"sample_{method}")(den, x, sigmas, disable=True, noise_sampler=recorded(ours_calls))
    theirs = getattr(kd, f"sample_{method}")(den, x, sigmas, disable=True, noise_sampler=recorded(theirs_calls))
    assert len(ours_calls) == len(theirs_calls) > 0
    for a, b in zip(ours_calls, theirs_calls):
        assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())


def test_step_noise_is_checked():
    from fastdiff.mixtures import MixtureModel, ring_mixture

    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=3, path="vp", prediction="eps", timesteps=[0.1, 0.5, 0.9], method="ddim", eta=1.0)
    with pytest.raises(ValueError, match=r"step_noise returned shape \(2, 2\) at step 0, expected \(3, 2\)"):
        fastdiff.sample(model, None, step_noise=lambda i, j: torch.zeros(2, 2), **kw)
    with pytest.raises(TypeError, match="step_noise must be None, 'brownian' or a callable"):
        fastdiff.sample(model, None, step_noise=3, **kw)
    # zero noise from the caller is the deterministic step's result (eta's noise term times 0)
    calls = []
    x = fastdiff.sample(model, None, step_noise=lambda i, j: calls.append((i, j)) or torch.zeros(3, 2), **kw)
    assert calls == [(0, 0), (1, 0)]
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("method,eta", [("dpm_2", None), ("dpm_2_ancestral", 1.0), ("dpm_2_ancestral", 0.5),
                                        ("dpmpp_2s_ancestral", 0.0), ("dpmpp_sde", 1.0)])
def test_a_step_from_pure_noise_is_ddims_limit(method, eta):
    """From sigma = inf (CondOT's t = 0) a step in sigma has one limit: DDIM's x' = alpha' D + beta' sqrt(1 -
    eta^2) x / beta + beta' eta xi — one evaluation, the draw of step 0."""
    path, grid = fastdiff.paths.get_path("condot"), [0.0, 0.3, 1.0]
    kw = {} if eta is None else dict(eta=eta, s_noise=1.0)
    first = get_method(method).stages(path, grid, "velocity", **kw)[0]
    al1, be1 = path.coefficients(0.3)[:2]
    a, b = fastdiff.paths.affine_coefficients(path, 0.0, "velocity", "x0")
    e = eta or 0.0
    assert first.final and first.step == 0 and first.input == "x"
    assert first.c_x == pytest.approx(al1 * a + be1 * math.sqrt(1 - e * e), rel=1e-12)
    assert first.c_pred == pytest.approx(al1 * b, rel=1e-12)
    assert first.c_noise == pytest.approx(be1 * e, rel=1e-12) and (first.stream == draw_stream(0) or not e)
