"""methods "heunpp2" and "gradient_estimation" (fastdiff/sampling/methods/heunpp2.py, gradient_estimation.py):
ComfyUI's sample_heunpp2 and sample_gradient_estimation against float64 torch loops of ComfyUI's formulas written
here (ComfyUI does not install) on the same mixture model, VE Karras grid and (churn) noise; measured convergence
orders; the steps from t = 0; stage layout; backends; option errors; CFG++ refused for gradient_estimation."""

import math

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, ring_mixture
from fastdiff.paths import get_path
from fastdiff.sampling.methods import get_method
from conftest import BACKENDS
from test_er_sde import assert_close, denoiser, draws, ours, start, ve_case


def comfy_heunpp2(den, x, sigmas, noises, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """ComfyUI's sample_heunpp2 (EPS model, sigma = beta / alpha) in float64; the churn noise of step i is noises[i - 1]
    (fastdiff folds it into step i - 1's last stage, which asks step_noise(i - 1, 0) for it)."""
    sigmas = torch.tensor(sigmas, dtype=torch.float64)
    x, s_end, n = x.double(), sigmas[-1], len(sigmas) - 1
    to_d = lambda x, s, D: (x - D) / s  # noqa: E731
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + noises[i - 1].double() * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        d = to_d(x, sigma_hat, den(x, sigma_hat))
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], den(x_2, sigmas[i + 1]))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], den(x_2, sigmas[i + 1]))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], den(x_3, sigmas[i + 2]))
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def comfy_gradient_estimation(den, x, sigmas, ge_gamma=2.0):
    """ComfyUI's sample_gradient_estimation (cfg_pp=False) in float64."""
    sigmas = torch.tensor(sigmas, dtype=torch.float64)
    x, old_d = x.double(), None
    for i in range(len(sigmas) - 1):
        denoised = den(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("options", [{}, dict(s_churn=2.0, s_tmax=30.0, s_noise=1.1),
                                     dict(s_churn=0.5, s_tmin=0.5, s_tmax=10.0)])
def test_heunpp2_matches_comfyui(prediction, options):
    path, grid, sigmas = ve_case()
    x, noises = start(path, grid), draws(len(grid) - 1)
    got = ours("heunpp2", path, grid, prediction, x, noises, **options)
    assert_close(got, comfy_heunpp2(denoiser(path), x, sigmas, noises, **options))  # measured: <= 2.3e-6 of max |x|


@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("ge_gamma", [2.0, 1.5, 3.0])
def test_gradient_estimation_matches_comfyui(prediction, ge_gamma):
    path, grid, sigmas = ve_case()
    x = start(path, grid)
    got = ours("gradient_estimation", path, grid, prediction, x, [], ge_gamma=ge_gamma)
    assert_close(got, comfy_gradient_estimation(denoiser(path), x, sigmas, ge_gamma))  # measured: <= 4.0e-7 of max |x|


@pytest.mark.parametrize("method,options,order,ns", [
    ("heunpp2", {}, 1.0, (8, 16, 32, 64)),  # 0.94, 0.97, 0.99 (VP: the same)
    ("gradient_estimation", {}, 1.0, (16, 32, 64, 128)),  # 0.76, 0.89, 0.94 (from 8 steps: 0.46 first)
    ("gradient_estimation", dict(ge_gamma=1.5), 2.0, (8, 16, 32, 64))])  # 1.90, 1.95, 1.97: Adams–Bashforth 2
def test_convergence_order(method, options, order, ns):
    """Error against the exact flow map of a Gaussian on CondOT [0.05, 0.95]: Heun++ is first order (its weights sum
    to 1 but are not Heun's halves); gradient estimation is first order at ge_gamma = 2 and second at 1.5 (which
    needs the history term right)."""
    from test_sample import _single_gaussian

    g = _single_gaussian()
    model = MixtureModel(g, "condot", "velocity")
    t0, t1 = 0.05, 0.95
    x0 = (0.95 * torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).double()
          + 0.05 * torch.tensor([1.0, -2.0], dtype=torch.float64))
    exact = g.flow_map(x0, t0, t1, "condot")
    errors = []
    for n in ns:
        grid = [t0 + (t1 - t0) * i / n for i in range(n + 1)]
        x = fastdiff.sample(model, None, noise=x0.float(), method=method, timesteps=grid, **options)
        errors.append(float((x.double() - exact).norm(dim=1).mean()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(len(ns) - 1)]
    assert all(order - 0.3 < s < order + 0.4 for s in slopes), (errors, slopes)


def test_heunpp2_stage_layout():
    """Three evaluations per step (the third at the next grid point), two on the step before the last, one on the
    last; from sigma_0 = inf (CondOT's t = 0) every step is Euler's (the weights sigma / sigma_0 vanish), the first
    one DDIM's limit x' = alpha' D + (beta' / beta) x."""
    path, grid = get_path("vp"), [0.05, 0.3, 0.5, 0.7, 0.9, 1.0]
    stages = get_method("heunpp2").stages(path, grid, "eps")
    assert [s.step for s in stages] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4]
    assert [s.t for s in stages[:3]] == [0.05, 0.3, 0.5]
    assert get_method("heunpp2").evals() == 3
    condot = get_path("condot")
    stages = get_method("heunpp2").stages(condot, [0.0, 0.2, 0.5, 0.8, 1.0], "velocity")
    assert [s.step for s in stages] == [0, 1, 2, 3] and all(s.final for s in stages)
    assert (stages[0].c_x, stages[0].c_pred) == pytest.approx((0.2 + 0.8, 0.2))  # x0 = x + v at t = 0


def test_gradient_estimation_from_pure_noise():
    """From t = 0 the first step is DDIM's limit and its slope d = (x - alpha D) / beta = x is the history of step 1
    (k-diffusion's d = (x - D) / sigma at sigma -> inf)."""
    path = get_path("condot")
    first, second = get_method("gradient_estimation").stages(path, [0.0, 0.2, 0.5, 1.0], "velocity")[:2]
    assert (first.c_x, first.c_pred) == pytest.approx((1.0, 0.2)) and (first.s_x, first.s_pred) == (1.0, 0.0)
    assert second.extra == "side0" and second.c_extra == pytest.approx(-0.5 * (0.5 / 0.5 - 0.8 / 0.2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,options", [("heunpp2", dict(s_churn=1.0, s_tmax=0.9)), ("gradient_estimation", {})])
def test_backends_agree(backend, method, options):
    name, device = backend
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=32, seed=9, method=method, path="vp", prediction="eps",
              timesteps=[0.02 + 0.98 * i / 8 for i in range(9)], **options)
    ref = fastdiff.sample(model, None, backend="reference", **kw)
    got = fastdiff.sample(model, None, backend=name, device=device, **kw).cpu()
    torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_options_are_checked():
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), batch_size=2, timesteps=[0.1, 0.5, 0.7, 1.0])
    with pytest.raises(ValueError, match=r"ge_gamma must be a finite number for method='gradient_estimation'"):
        fastdiff.sample(model, None, method="gradient_estimation", ge_gamma=math.inf, **kw)
    with pytest.raises(ValueError, match=r"s_churn must be a finite number >= 0, got -1.0 \(method='heunpp2'\)"):
        fastdiff.sample(model, None, method="heunpp2", s_churn=-1.0, **kw)
    with pytest.raises(ValueError, match="ge_gamma applies to method='gradient_estimation'; method='heunpp2'"):
        fastdiff.sample(model, None, method="heunpp2", ge_gamma=1.5, **kw)
