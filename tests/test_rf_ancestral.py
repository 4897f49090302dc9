"""methods "euler_ancestral_RF", "dpm_2_ancestral_RF", "dpmpp_2s_ancestral_RF" (fastdiff/sampling/methods/
rf_ancestral.py): ComfyUI's rectified-flow ancestral samplers against float64 torch loops of ComfyUI's formulas
written here (ComfyUI does not install) on the same mixture model, CondOT grid (ComfyUI's CONST sigma = 1 - t) and
noise; on another path the same loops in the CondOT reparametrization (noise fraction s = beta / (alpha + beta),
state x / (alpha + beta)); the step from t = 0; mixture samples; backends; option errors."""

import math

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import get_path
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.sigma_space import time_at
from conftest import BACKENDS
from test_er_sde import assert_close, condot_case, draws, ours, start

METHODS = ["euler_ancestral_RF", "dpm_2_ancestral_RF", "dpmpp_2s_ancestral_RF"]


def rf_denoiser(path):
    """ComfyUI's model(x, sigma) of a CONST model in the CondOT reparametrization of ``path``: the state y = x / (alpha
    + beta) at noise fraction sigma = beta / (alpha + beta); on CondOT y = x and t = 1 - sigma."""
    model = MixtureModel(ring_mixture(heterogeneous=True), path, "x0")

    def den(y, sigma):
        s = float(sigma)
        t = 1.0 - s if path.name == "condot" else (time_at(path, s / (1.0 - s), 0.0, 1.0) if s < 1 else 0.0)
        al, be = path.coefficients(t)[:2]
        return model(y.double() * (al + be), t)
    return den


def _ancestral(s, s1, eta):
    down = s1 * (1 + (s1 / s - 1) * eta)
    a1, ad = 1 - s1, 1 - down
    return down, a1, ad, (s1 ** 2 - down ** 2 * a1 ** 2 / ad ** 2) ** 0.5


def comfy_rf(method, den, x, sigmas, noises, eta=1.0, s_noise=1.0):
    """ComfyUI's sample_{euler,dpm_2,dpmpp_2s}_ancestral_RF in float64 (the noise_sampler answering noises[i])."""
    sigmas = torch.tensor(sigmas, dtype=torch.float64)
    x = x.double()
    lam = lambda s: ((1 - s) / s).log()  # noqa: E731
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        D = den(x, s)
        down, a1, ad, renoise = _ancestral(s, s1, eta)
        noise = noises[i].double() * s_noise * renoise
        if method == "euler_ancestral_RF":
            if s1 == 0:
                x = D
            else:
                x = down / s * x + (1 - down / s) * D
                if eta > 0:
                    x = a1 / ad * x + noise
        elif method == "dpm_2_ancestral_RF":
            d = (x - D) / s
            if down == 0:
                x = x + d * (down - s)
            else:
                mid = s.log().lerp(down.log(), 0.5).exp()
                x2 = x + d * (mid - s)
                d2 = (x2 - den(x2, mid)) / mid
                x = a1 / ad * (x + d2 * (down - s)) + noise
        else:
            if s1 == 0:
                x = x + (x - D) / s * (down - s)
            else:
                mid = torch.tensor(0.9999, dtype=torch.float64) if s == 1.0 else \
                    1 / ((lam(s) + 0.5 * (lam(down) - lam(s))).exp() + 1)
                u = mid / s * x + (1 - mid / s) * D
                x = down / s * x + (1 - down / s) * den(u, mid)
            if s1 > 0 and eta > 0:
                x = a1 / ad * x + noise
    return x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("options", [{}, dict(eta=0.5, s_noise=0.8), dict(eta=0.0)])
def test_matches_comfyui_on_the_same_noise(method, prediction, options):
    path, grid, sigmas = condot_case()
    x, noises = start(path, grid), draws(len(grid) - 1)
    got = ours(method, path, grid, prediction, x, noises, **options)
    want = comfy_rf(method, rf_denoiser(path), x, sigmas, noises, **options)
    assert_close(got, want)  # measured: at most 2.2e-7 of max |x| over these cases (float32 state)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path_name,prediction", [("vp", "eps"), ("vp-cosine", "velocity")])
def test_other_paths_are_the_condot_reparametrization(method, path_name, prediction):
    """On a VP path: ComfyUI's loop run on y = x / (alpha + beta) at s = beta / (alpha + beta) (the paths share
    t = 1 as the data end, where alpha + beta = 1)."""
    path = get_path(path_name)
    grid = [0.05 + 0.95 * (i / 12) ** 1.5 for i in range(13)]
    grid[-1] = 1.0
    k = [sum(path.coefficients(t)[:2]) for t in grid]
    sigmas = [path.coefficients(t)[1] / k_ for t, k_ in zip(grid, k)]
    x, noises = start(path, grid), draws(len(grid) - 1)
    got = ours(method, path, grid, prediction, x, noises, eta=0.8)
    want = comfy_rf(method, rf_denoiser(path), x / k[0], sigmas, noises, eta=0.8) * k[-1]
    assert_close(got, want)  # measured: at most 1.3e-7 of max |x|


@pytest.mark.parametrize("method", METHODS)
def test_from_pure_noise(method):
    """From CondOT's t = 0 (s = 1, alpha = 0) with a velocity model: euler and dpm_2 are ComfyUI's formulas as they
    stand (finite there); dpmpp_2s takes its midpoint's limit s_m = 1, one evaluation, which is euler's step, where
    ComfyUI patches s_m = 0.9999 (a 1e-4 step: the samples differ by 2.2e-5 of max |x|; the others by 6.5e-7)."""
    path, grid, sigmas = condot_case(t0=0.0)
    x, noises = start(path, grid), draws(len(grid) - 1)
    got = ours(method, path, grid, "velocity", x, noises)
    want = comfy_rf(method, rf_denoiser(path), x, sigmas, noises)
    if method == "dpmpp_2s_ancestral_RF":
        assert (got - want).abs().max() < 2e-4 * want.abs().max()
        first = get_method(method).stages(path, grid, "velocity")[0]
        euler = get_method("euler_ancestral_RF").stages(path, grid, "velocity")[0]
        assert first.final and (first.c_x, first.c_pred, first.c_noise) == (euler.c_x, euler.c_pred, euler.c_noise)
    else:
        assert_close(got, want)


@pytest.mark.parametrize("method,path,prediction", [
    ("euler_ancestral_RF", "condot", "velocity"), ("dpm_2_ancestral_RF", "condot", "velocity"),
    ("dpmpp_2s_ancestral_RF", "condot", "velocity"), ("dpmpp_2s_ancestral_RF", "vp", "eps")])
def test_samples_the_mixture(method, path, prediction):
    """On an analytic mixture (exact predictions), eta = 1, 40 steps (100 for Euler's first-order ancestral step):
    the samples have the mixture's mode weights, means and covariances (z-scores within statistical error)."""
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    grid = _quadratic_grid(100 if method == "euler_ancestral_RF" else 40)
    if path == "vp":
        grid[0] = 1e-3
    x = fastdiff.sample(model, None, method=method, shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=grid)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_backends_agree(backend, method):
    name, device = backend
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), batch_size=32, seed=9, method=method, timesteps=condot_case(8, t0=0.0)[1], eta=0.7)
    ref = fastdiff.sample(model, None, backend="reference", **kw)
    got = fastdiff.sample(model, None, backend=name, device=device, **kw).cpu()
    torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_options_are_checked():
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), batch_size=2, timesteps=[0.1, 0.5, 1.0])
    for method in METHODS:
        with pytest.raises(ValueError, match="s_noise must be a finite number"):
            fastdiff.sample(model, None, method=method, s_noise=-1.0, **kw)
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0 for method='{method}'"):
            get_method(method).stages(get_path("condot"), [0.1, 0.5, 1.0], "x0", eta=math.nan)
        # eta > 1 (sample() keeps eta in [0, 1]; ComfyUI's node allows more) can push s_down below 0
        with pytest.raises(ValueError, match=f"eta=5.0 is too large for method='{method}'"):
            get_method(method).stages(get_path("condot"), [0.1, 0.5, 1.0], "x0", eta=5.0)
        with pytest.raises(ValueError, match=r"r applies to method=.*; method='%s' does not take it" % method):
            fastdiff.sample(model, None, method=method, r=0.3, **kw)
