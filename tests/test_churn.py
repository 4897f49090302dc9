"""EDM's churn (s_churn, s_tmin, s_tmax, s_noise) of "euler", "heun" and "dpm_2" (fastdiff/sampling/methods/churn.py):
k-diffusion's sample_euler / sample_heun / sample_dpm_2 with the same churn on the same denoiser, grid,
initial state and noise (fastdiff's streams in place of k-diffusion's torch.randn_like); the raised level
on any path; the samples of an analytic mixture."""

import contextlib
import math

import pytest
import torch

import fastdiff
from fastdiff.adapters import k_diffusion as fk
from fastdiff.sampling.methods import churn
from fastdiff.sampling.methods.coefficients import draw_stream
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.sigma_space import noise_level
from conftest import BACKENDS
from test_adapter_k_diffusion import _kd_case


@contextlib.contextmanager
def _randn_like_from_streams(seeds, shape):
    """k-diffusion's churn samplers call torch.randn_like(x) once per step, churn or not: the i-th call
    answers with fastdiff's draw of step i (stream draw_stream(i)), the draw fastdiff's churn uses."""
    original, count = torch.randn_like, [0]

    def randn_like(x, *args, **kwargs):
        count[0] += 1
        return fastdiff.ops.randn(seeds, draw_stream(count[0] - 1), shape).to(x.dtype)

    torch.randn_like = randn_like
    try:
        yield count
    finally:
        torch.randn_like = original


@pytest.mark.parametrize("method", ["euler", "heun", "dpm_2"])
@pytest.mark.parametrize("churn_kw", [
    dict(s_churn=2.0), dict(s_churn=2.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003), dict(s_churn=40.0),
    dict(s_churn=1.0, s_tmax=5.0, s_noise=0.9)])
@pytest.mark.parametrize("grid", ["karras", "vp"])
def test_matches_k_diffusion_on_the_same_noise(method, churn_kw, grid):
    kd, den, sigmas, x = _kd_case(grid, 10)
    seeds = [5, 6, 7]
    ours = getattr(fk, f"sample_{method}")(den, x, sigmas, disable=True, seed=seeds, **churn_kw)
    ours_sigmas = [c.clone() for c in den.calls]
    den.calls.clear()
    with _randn_like_from_streams(seeds, x.shape[1:]) as count:
        theirs = getattr(kd, f"sample_{method}")(den, x, sigmas, disable=True, **churn_kw)
    assert count[0] == len(sigmas) - 1
    assert len(ours_sigmas) == len(den.calls)  # the same raised noise levels handed to the denoiser
    for a, b in zip(ours_sigmas, den.calls):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * scale)  # fp32: 2e-5 of max |x|


@pytest.mark.parametrize("name", ["vp", "vp-cosine", "condot", "ve"])
def test_the_raised_level_is_the_paths_forward_kernel(name):
    """x_hat = scale x + c xi with x = alpha z + beta eps has alpha_hat = scale alpha and variance
    (scale beta)^2 + c^2 = beta_hat^2: the path's own marginal at t_hat, whose level is (1 + gamma) sigma."""
    path = fastdiff.paths.get_path(name)
    grid = [0.1, 0.2, 0.5, 0.8, 1.0]  # VP's level at t = 0.1 raised 1.4x stays below its level at t = 0
    gamma = min(1.6 / 4, churn.GAMMA_MAX)
    plan = churn.plan(path, grid, s_churn=1.6, s_tmax=50.0 if name == "ve" else math.inf, s_noise=1.0)
    for t, (t_hat, scale, c) in zip(grid, plan):
        sigma = noise_level(path, t)
        if name == "ve" and sigma > 50.0:
            assert (t_hat, scale, c) == (t, 1.0, 0.0)  # above s_tmax: no churn
            continue
        assert t_hat < t and math.isclose(noise_level(path, t_hat), (1 + gamma) * sigma, rel_tol=1e-10)
        al, be = path.coefficients(t)[:2]
        al_hat, be_hat = path.coefficients(t_hat)[:2]
        assert math.isclose(scale * al, al_hat, rel_tol=1e-12)
        assert math.isclose((scale * be) ** 2 + c * c, be_hat ** 2, rel_tol=1e-10)


def test_no_churn_is_the_plain_table_and_churn_is_per_sample():
    path, grid = fastdiff.paths.get_path("vp"), [0.05, 0.3, 0.6, 1.0]
    for method in ("euler", "heun", "dpm_2"):
        m = get_method(method)
        assert m.stages(path, grid, "eps", s_churn=0.0) == m.build(path, grid, "eps")
        assert m.stages(path, grid, "eps", s_churn=5.0, s_tmax=1e-9) == m.build(path, grid, "eps")
    from fastdiff.mixtures import MixtureModel, ring_mixture

    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), path="vp", prediction="eps", method="heun", timesteps=grid, s_churn=1.0)
    a = fastdiff.sample(model, None, seed=[11, 12, 13], batch_size=3, **kw)
    b = fastdiff.sample(model, None, seed=[12], batch_size=1, **kw)
    assert torch.equal(a[1:2], b) and not torch.equal(a, fastdiff.sample(model, None, seed=[11, 12, 13], batch_size=3,
                                                                         **dict(kw, s_churn=0.0)))
    # the first step's churn rides in the initial write: drawn z or the same noise given are one sample
    beta0 = fastdiff.paths.get_path("vp").coefficients(grid[0])[1]
    z = fastdiff.ops.randn([11, 12, 13], 0, (2,))
    torch.testing.assert_close(fastdiff.sample(model, None, noise=beta0 * z, seed=[11, 12, 13], **kw), a,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,path,prediction,steps", [
    ("heun", "vp", "eps", 80), ("euler", "vp", "x0", 160), ("dpm_2", "vp", "eps", 40), ("heun", "condot", "velocity", 40)])
def test_samples_the_mixture(method, path, prediction, steps):
    """Churn keeps the sampled distribution (it re-noises along the path's own kernel; each step then
    integrates from the raised level, a longer step: the bias of s_churn = 5 is that of fewer steps, e.g.
    Euler's mean z-score 14 / 10 / 5 at 25 / 40 / 80 steps): the mixture's modes within statistical error;
    on condot from t = 0 the first step (sigma infinite) has none."""
    from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    grid = _quadratic_grid(steps)
    if path == "vp":
        grid[0] = 1e-3
    x = fastdiff.sample(model, None, method=method, shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=grid, s_churn=5.0, s_tmin=0.01, s_tmax=50.0, s_noise=1.0)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_options_are_checked():
    from fastdiff.mixtures import MixtureModel, ring_mixture

    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps", timesteps=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="s_churn must be a finite number >= 0"):
        fastdiff.sample(model, None, method="heun", s_churn=-1.0, **kw)
    with pytest.raises(ValueError, match="s_tmax must be a number >= 0"):
        fastdiff.sample(model, None, method="heun", s_churn=1.0, s_tmax=float("nan"), **kw)
    with pytest.raises(ValueError, match="churn .* applies to the deterministic steps"):
        fastdiff.sample(model, None, method="euler", sigma=0.5, s_churn=1.0, **kw)
    with pytest.raises(ValueError, match="s_churn applies to method='euler' or 'heun' or 'dpm_2'"):
        fastdiff.sample(model, None, method="ddim", s_churn=1.0, **kw)
    ve = fastdiff.paths.VE(10.0)  # no room above sigma_max = sigma(t = 0) for the first step's churn
    with pytest.raises(ValueError, match="above the path's at t = 0"):
        fastdiff.sample(fastdiff.mixtures.MixtureModel(ring_mixture(), ve, "x0"), 5, shape=(2,), batch_size=2,
                        path=ve, prediction="x0", method="heun", s_churn=1.0)


def _churn_case():
    from fastdiff.mixtures import MixtureModel, ring_mixture

    class Labelled(MixtureModel):  # a conditional model: the label shifts the x0 prediction
        def __call__(self, x, t, y=None):
            out = super().__call__(x, t, None)
            return out if y is None else out + 0.1 * y.view(-1, 1).float()

    return Labelled(ring_mixture(), "vp", "x0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "heun", "dpm_2"])
def test_per_sample_churn_is_each_sample_alone(backend, method):
    """s_churn, s_tmin, s_tmax and s_noise as one value per sample (a list or a tensor): per-sample model times
    and coefficient rows in one batch; each sample equals its run alone with its own values, bit for bit on
    the backend, with guidance, a callback's x0 and Brownian noise too."""
    name, device = backend
    if name == "triton" and method != "heun":
        pytest.skip("the Triton interpreter runs one method (the per-sample rows are the same calls)")
    model = _churn_case()
    values = dict(s_churn=[0.0, 30.0, 3.0, 30.0, 8.0], s_tmin=[0.0, 0.0, 0.0, 0.5, 0.0],
                  s_tmax=[math.inf, math.inf, 5.0, math.inf, math.inf], s_noise=torch.tensor([1.0, 1.0, 1.2, 0.9, 1.0]))
    seeds = [4, 5, 6, 7, 8]
    y = torch.tensor([0, 1, 2, 1, 0])
    kw = dict(shape=(2,), path="vp", prediction="x0", method=method, timesteps=[0.05, 0.3, 0.6, 0.8, 0.9],
              backend=name, device=device, cfg=2.0, null_y=3)
    # the interpreter runs the independent-draw pass (its Brownian pass took 73 s in CI; test_brownian.py checks the
    # Triton kernels' Brownian sums)
    for step_noise in (None,) if name == "triton" else (None, "brownian"):
        seen = []
        batch = fastdiff.sample(model, None, seed=seeds, y=y, step_noise=step_noise,
                                callback=lambda i, t, x, x0: seen.append(x0.clone()), **values, **kw)
        for b in range(len(seeds)):
            own = {k: float(v[b]) for k, v in values.items()}
            alone_x0 = []
            alone = fastdiff.sample(model, None, seed=[seeds[b]], y=y[b:b + 1], step_noise=step_noise,
                                    callback=lambda i, t, x, x0: alone_x0.append(x0.clone()), **own, **kw)
            assert torch.equal(alone[0], batch[b]), (step_noise, b)
            for mine, theirs in zip(alone_x0, seen):
                torch.testing.assert_close(mine[0], theirs[b], rtol=1e-6, atol=1e-6)


def test_per_sample_options_are_checked():
    model = _churn_case()
    kw = dict(shape=(2,), batch_size=3, path="vp", prediction="x0", timesteps=[0.05, 0.5, 0.9])
    with pytest.raises(ValueError, match=r"s_churn holds 2 values; per-sample options need one per sample \(B = 3\)"):
        fastdiff.sample(model, None, method="heun", s_churn=[1.0, 2.0], **kw)
    with pytest.raises(ValueError, match="s_churn as a tensor must be 1-D"):
        fastdiff.sample(model, None, method="heun", s_churn=torch.ones(3, 1), **kw)
    with pytest.raises(TypeError, match=r"s_noise\[1\] must be a number"):
        fastdiff.sample(model, None, method="heun", s_churn=5.0, s_noise=[1.0, "a", 1.0], **kw)
    with pytest.raises(ValueError, match=r"s_noise must be a finite number >= 0"):
        fastdiff.sample(model, None, method="heun", s_churn=5.0, s_noise=[1.0, -1.0, 1.0], **kw)
    with pytest.raises(ValueError, match="s_churn"):  # a method without churn refuses it, per sample too
        fastdiff.sample(model, None, method="ddim", s_churn=[0.0, 1.0, 0.0], **kw)
    # all samples alike: the plain table (no per-sample rows)
    torch.testing.assert_close(fastdiff.sample(model, None, method="heun", s_churn=[4.0] * 3, **kw),
                               fastdiff.sample(model, None, method="heun", s_churn=4.0, **kw), rtol=0, atol=0)
