"""method "dpm_fast" (fastdiff/sampling/methods/dpm_fast.py): k-diffusion's DPM-Solver-fast on any path. Against
k-diffusion's sample_dpm_fast on the same denoiser, ends and noise; its budget split; its convergence order on the
exact flow map of a Gaussian; the samples of a mixture; the plan's grid (its own steps); backends; option errors."""

import math

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import VE, get_path
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.dpm_fast import budget_orders, step_grid
from conftest import BACKENDS
from test_adapter_k_diffusion import Denoiser, _kd
from convergence import flow_map_errors, slopes
from test_sample import N, _zmax


def _exact_model(den, path):
    """The denoiser as an "x0" model on the VE path, handed the exact sigma of every time the plan evaluates."""
    from fastdiff.adapters.k_diffusion import DenoiserModel

    sigmas = [path.coefficients(t)[1] for t in (0.0, 1.0)]
    return DenoiserModel(den, sigmas)


@pytest.mark.parametrize("nfe", [3, 4, 5, 6, 10, 11])
def test_budget_is_k_diffusions_split(nfe):
    orders = budget_orders(nfe)
    assert sum(orders) == nfe and len(orders) == nfe // 3 + 1 and all(o in (1, 2, 3) for o in orders)
    assert orders[:-2] == [3] * (len(orders) - 2)


@pytest.mark.parametrize("eta,s_noise", [(0.0, 1.0), (1.0, 1.0), (0.6, 0.9)])
@pytest.mark.parametrize("nfe", [6, 7, 11])
def test_matches_k_diffusion(nfe, eta, s_noise):
    """sample_dpm_fast(model, x, sigma_min, sigma_max, nfe) with its ancestral noise fed from fastdiff's draws (the
    noise of step i is the caller's step_noise(i, 0) here and the i-th noise_sampler call there)."""
    kd = _kd()
    den = Denoiser()
    sigma_max, sigma_min = 20.0, 0.05
    path = VE(sigma_max)
    grid = [0.0] + [path.time(sigma_max * (1 - k / nfe) + sigma_min * k / nfe) for k in range(1, nfe)] + [1.0]
    grid[-2] = path.time(sigma_min)  # ComfyUI's reading: sigma_min = the last nonzero level
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma_max
    draws = torch.randn(nfe, *x.shape, generator=torch.Generator().manual_seed(5))
    model = _exact_model(den, path)
    times = step_grid(path, grid, eta)
    stages = get_method("dpm_fast").stages(path, grid, "x0", eta=eta, s_noise=s_noise)
    model.exact_at(sorted({st.t for st in stages} | set(times)))
    ours = fastdiff.sample(model, None, noise=x, path=path, prediction="x0", method="dpm_fast", timesteps=grid,
                           eta=eta, s_noise=s_noise, step_noise=lambda i, j: draws[i])
    calls = iter(range(nfe))
    theirs = kd.sample_dpm_fast(den, x, sigma_min, sigma_max, nfe, disable=True, eta=eta, s_noise=s_noise,
                                noise_sampler=lambda a, b: draws[next(calls)])
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < 2e-5, err


# budgets whose steps double (m = nfe // 3 + 1 = 8, 16, 32): nfe = 3k + 2 ends with an order-2 step (third order
# overall), nfe = 3k with [.., 2, 1] (the last, first-order step of full length: second order). Slopes measured on
# one AMD EPYC: 3k + 2: condot 3.47, 3.26; vp 3.42, 3.23; vp-cosine 3.42, 3.22. 3k: condot 0.48, 1.95; vp 1.93,
# 2.02; vp-cosine 1.69, 2.04.
@pytest.mark.parametrize("budgets,order", [((23, 47, 95), 3.0), ((21, 45, 93), 2.0)])
@pytest.mark.parametrize("path,prediction", [("condot", "velocity"), ("vp", "eps"), ("vp-cosine", "x0")])
def test_convergence_order(path, prediction, budgets, order):
    """Error at the grid's last time against the exact flow map of a Gaussian, as the steps halve."""
    errors = flow_map_errors("dpm_fast", path, prediction, budgets)
    slope = slopes(errors)[1]  # the finer pair (the coarse one is pre-asymptotic for 3k on condot)
    assert order - 0.15 < slope < order + 0.6, (errors, slope)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samples_the_mixture(eta):
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, "vp", "eps")
    x = fastdiff.sample(model, 40, method="dpm_fast", shape=(2,), seed=3, path="vp", prediction="eps", batch_size=N,
                        timesteps=[1e-3 + (1 - 2e-3) * i / 40 for i in range(41)], eta=eta)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_plan_steps_on_its_own_grid():
    """The plan's grid is the method's m + 1 times (uniform in lambda): the callback sees m steps at those times,
    ending at the last nonzero level; the stages of a step evaluate between its ends."""
    path = get_path("vp")
    grid = [0.01 + 0.99 * i / 10 for i in range(11)]  # nfe 10: orders [3, 3, 3, 1]
    times = step_grid(path, grid)
    lam = [math.log(a / b) for a, b in (path.coefficients(t)[:2] for t in times)]
    assert len(times) == 5 and times[0] == grid[0] and times[-1] == pytest.approx(grid[-2], abs=1e-12)
    assert [b - a for a, b in zip(lam, lam[1:])] == pytest.approx([(lam[-1] - lam[0]) / 4] * 4, rel=1e-9)
    stages = get_method("dpm_fast").stages(path, grid, "eps")
    assert [st.step for st in stages] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert all(times[st.step] <= st.t < times[st.step + 1] for st in stages)
    seen = []
    model = MixtureModel(ring_mixture(), "vp", "eps")
    fastdiff.sample(model, None, shape=(2,), batch_size=4, path="vp", prediction="eps", method="dpm_fast",
                    timesteps=grid, callback=lambda i, t, x, x0: seen.append((i, t)))
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t in seen] == pytest.approx(times[1:], abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_the_reference(backend):
    name, device = backend
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), seed=[4, 5, 6], batch_size=3, path="vp", prediction="eps", method="dpm_fast", eta=1.0,
              timesteps=[0.3 + 0.69 * i / 8 for i in range(9)], device=device)  # (long ancestral steps from t = 0.01
    # amplify float32 rounding: 8e-5 of max |x| between two correct backends there)
    ref = fastdiff.sample(model, None, backend="reference", **kw)
    ours = fastdiff.sample(model, None, backend=name, **kw)
    torch.testing.assert_close(ours.cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


def test_errors():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps", method="dpm_fast")
    with pytest.raises(ValueError, match="needs a last nonzero noise level below the first one"):
        fastdiff.sample(model, None, timesteps=[0.1, 1.0], **kw)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got -1.0"):
        fastdiff.sample(model, 4, eta=-1.0, **kw)
    with pytest.raises(ValueError, match="s_noise must be a finite number >= 0"):
        fastdiff.sample(model, 4, s_noise=-1.0, **kw)
