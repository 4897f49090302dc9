"""methods "ipndm" and "ipndm_v" (fastdiff/sampling/methods/ipndm.py): ComfyUI's published iPNDM formulas (its
sample_ipndm / sample_ipndm_v, restated below as a plain loop in sigma) on the same denoiser, Karras and
VP sigma grids and initial state; the samples of an analytic mixture on other paths."""

import pytest
import torch

import fastdiff
from fastdiff.adapters.k_diffusion import DenoiserModel
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from test_adapter_k_diffusion import _kd_case


def _reference(den, x, sigmas, max_order, variable):
    """The published iPNDM loop: d = (x - D) / sigma, Adams-Bashforth in sigma with fixed or variable-step
    weights over the last max_order - 1 derivatives; the step to sigma = 0 returns D."""
    s = [float(v) for v in sigmas]
    buf = []
    for i in range(len(s) - 1):
        d_cur = (x - den(x, sigmas[i] * x.new_ones(x.shape[0]))) / s[i]
        order = min(max_order, i + 1)
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x - s[i] * d_cur
        elif not variable:
            w = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}[order]
            x = x + dt * (w[0] * d_cur + sum(wk * bk for wk, bk in zip(w[1:], reversed(buf))))
        else:
            h = [dt] + [s[i - k + 1] - s[i - k] for k in range(1, order)]
            if order == 1:
                w = [1.0]
            elif order == 2:
                w = [(2 + h[0] / h[1]) / 2, -(h[0] / h[1]) / 2]
            else:
                t1 = (1 - h[0] / (3 * (h[0] + h[1])) * (h[0] * (h[0] + h[1])) / (h[1] * (h[1] + h[2]))) / 2
                if order == 3:
                    w = [(2 + h[0] / h[1]) / 2 + t1, -(h[0] / h[1]) / 2 - (1 + h[1] / h[2]) * t1, t1 * h[1] / h[2]]
                else:
                    t2 = ((1 - h[0] / (3 * (h[0] + h[1]))) / 2 + (1 - h[0] / (2 * (h[0] + h[1]))) * h[0] / (
                        6 * (h[0] + h[1] + h[2]))) * (h[0] * (h[0] + h[1]) * (h[0] + h[1] + h[2])) / (
                        h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3]))
                    r = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
                    w = [(2 + h[0] / h[1]) / 2 + t1 + t2,
                         -(h[0] / h[1]) / 2 - (1 + h[1] / h[2]) * t1 - (1 + h[1] / h[2] + r) * t2,
                         t1 * h[1] / h[2] + (h[1] / h[2] + r * (1 + h[2] / h[3])) * t2, -t2 * r * h[1] / h[2]]
            x = x + dt * (w[0] * d_cur + sum(wk * bk for wk, bk in zip(w[1:], reversed(buf))))
        buf = (buf + [d_cur])[-(max_order - 1):] if max_order > 1 else []
    return x


@pytest.mark.parametrize("method", ["ipndm", "ipndm_v"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("grid", ["karras", "vp"])
def test_matches_the_published_formulas(method, order, grid):
    kd, den, sigmas, x = _kd_case(grid, 12)
    model = DenoiserModel(den, sigmas)
    ours = fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method=method,
                           timesteps=model.timesteps, order=order)
    with torch.no_grad():
        want = _reference(den, x, sigmas, order, method == "ipndm_v")
    torch.testing.assert_close(ours, want, rtol=0, atol=2e-5 * want.abs().max().item())


@pytest.mark.parametrize("method,path,prediction", [("ipndm", "vp", "eps"), ("ipndm_v", "vp", "x0"),
                                                    ("ipndm_v", "vp-cosine", "velocity"), ("ipndm", "condot", "velocity")])
def test_samples_the_mixture(method, path, prediction):
    """The mixture's modes within statistical error; on condot from t = 0 the first step (sigma = inf) is
    DDIM's and the history starts after it."""
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    grid = _quadratic_grid(40)
    if path != "condot":
        grid[0] = 1e-3
    x = fastdiff.sample(model, None, method=method, shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=grid)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_options_are_checked():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    with pytest.raises(ValueError, match="order must be 1, 2, 3 or 4 for method='ipndm'"):
        fastdiff.sample(model, None, shape=(2,), batch_size=2, path="vp", prediction="eps", method="ipndm",
                        timesteps=[0.1, 0.5, 1.0], order=5)
