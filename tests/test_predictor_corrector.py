"""Score-based sampling in fastdiff.sample: NCSN's annealed Langevin dynamics, score_sde's reverse-diffusion
predictor and Langevin corrector (against hand loops on every backend, diffusers' ScoreSdeVeScheduler on the same
noise, and the mixtures' exact statistics)."""

import math

import pytest
import torch
from conftest import BACKENDS

import fastdiff
from fastdiff.mixtures import GaussianMixture, MixtureModel, class_conditional_mixture, mode_zscores, ring_mixture
from fastdiff.ops import randn
from fastdiff.paths import affine_coefficients, get_path
from fastdiff.sampling import get_method
from fastdiff.sampling.core.stage import langevin_stream
from fastdiff.sampling.core.stage import draw_stream
from fastdiff.schedules import exponential_sigmas, ve_grid


def _mixture_64d():
    """Four modes in 64 dimensions: the signal-to-noise rule needs many elements per sample (its norms then
    concentrate; in 2-D a sample near a mode centre gets a huge step)."""
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(6.0 * torch.randn(4, 64, generator=g) / 8.0, stds=torch.tensor([0.3, 0.5, 0.4, 0.6]),
                           weights=[0.1, 0.2, 0.3, 0.4])


def test_annealed_langevin_stages_are_algorithm_1():
    """Per level i, n_steps_each steps x + (a_i/2) s + sqrt(a_i) ξ with a_i = step_lr σ_i² / σ_L² (VE, score
    model), streams langevin_stream(i, j), then Tweedie's x0 = x + σ_L² s."""
    path, grid = ve_grid(exponential_sigmas(4, 0.1, 10.0))
    stages = get_method("annealed_langevin").stages(path, grid, "score", n_steps_each=3, step_lr=1e-3, denoise=True)
    sigmas = [path.coefficients(t)[1] for t in grid[:-1]]
    assert len(stages) == 4 * 3 + 1
    for k, st in enumerate(stages[:-1]):
        i, j = divmod(k, 3)
        a = 1e-3 * sigmas[i] ** 2 / sigmas[-1] ** 2
        assert (st.step, st.t, st.stream) == (i, grid[i], langevin_stream(i, j))
        assert st.c_x == 1.0 and st.c_pred == pytest.approx(a / 2, rel=1e-12)
        assert st.c_noise == pytest.approx(math.sqrt(a), rel=1e-12) and st.final == (j == 2 and i < 3)
    last = stages[-1]
    assert (last.c_x, last.c_pred, last.c_noise, last.final) == (1.0, pytest.approx(sigmas[-1] ** 2), 0.0, True)
    assert len(get_method("annealed_langevin").stages(path, grid, "score", n_steps_each=3, denoise=False)) == 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_annealed_langevin_is_the_hand_loop(backend):
    """sample(method="annealed_langevin") on a VP path with an eps model equals the algorithm written out
    with fastdiff's noise (score = −ε/β), on every backend."""
    name, device = backend
    mix = ring_mixture()
    model = MixtureModel(mix, "vp", "eps")
    path, grid = get_path("vp"), [0.2, 0.5, 0.8, 0.95]
    seeds, n, lr = [3, 4], 2, 0.01
    got = fastdiff.sample(model, None, timesteps=grid, path="vp", prediction="eps", method="annealed_langevin",
                          shape=(2,), seed=seeds, batch_size=2, n_steps_each=n, step_lr=lr, backend=name, device=device)
    beta_last = path.coefficients(grid[-2])[1]
    x = path.coefficients(grid[0])[1] * randn(seeds, 0, (2,), dtype=torch.float64)
    for i, t in enumerate(grid[:-1]):
        al, be = path.coefficients(t)[:2]
        a = lr * (be / beta_last) ** 2
        for j in range(n):
            s = -model(x.float(), torch.full((2,), t)).double() / be
            x = x + a / 2 * s + math.sqrt(a) * randn(seeds, langevin_stream(i, j), (2,), dtype=torch.float64)
    al, be = path.coefficients(grid[-2])[:2]
    x = (x - be * model(x.float(), torch.full((2,), grid[-2])).double()) / al  # Tweedie
    torch.testing.assert_close(got.cpu().double(), x, rtol=0, atol=2e-5 * x.abs().max().item())


def test_annealed_langevin_reproduces_the_mixture():
    """NCSN's sampler with the exact noise-conditional score of the ring mixture on VE levels 20 → 0.01
    (geometric): the mixture's mode weights, means and covariances within statistical error."""
    mix = ring_mixture()
    path, grid = ve_grid(exponential_sigmas(10, 0.01, 20.0))
    x = fastdiff.sample(MixtureModel(mix, path, "score"), None, timesteps=grid, path=path, prediction="score",
                        method="annealed_langevin", shape=(2,), batch_size=2000, n_steps_each=60, step_lr=2e-4)
    z = mode_zscores(x, mix)
    assert z.weights.abs().max() < 4 and z.means.abs().max() < 4 and z.covs.abs().max() < 4, z


def test_reverse_diffusion_stages():
    """x' = (2 − r) x + v s + sqrt(v) ξ, r = α/α', v = β² − r² β'²: on VE x + (σ² − σ'²) s + sqrt(σ² − σ'²) ξ, on
    VP score_sde's (2 − sqrt(1 − β_i)) x + β_i s; the last step returns its mean."""
    grid = [0.0, 0.3, 0.7, 1.0]
    ve = get_path("ve")
    for i, st in enumerate(get_method("reverse_diffusion").stages(ve, grid, "score")):
        s0, s1 = ve.coefficients(grid[i])[1], ve.coefficients(grid[i + 1])[1]
        assert st.c_x == pytest.approx(1.0) and st.c_pred == pytest.approx(s0 ** 2 - s1 ** 2, rel=1e-12)
        assert st.c_noise == (pytest.approx(math.sqrt(s0 ** 2 - s1 ** 2)) if i < 2 else 0.0)
    vp, grid = get_path("vp"), [0.1, 0.4, 0.7, 0.9]
    for i, st in enumerate(get_method("reverse_diffusion").stages(vp, grid, "eps")):
        (al, be), al1 = vp.coefficients(grid[i])[:2], vp.coefficients(grid[i + 1])[0]
        beta_i = 1 - (al / al1) ** 2  # the discrete β of the step: α_t / α_t' = sqrt(1 − β_i)
        # eps model: s = −ε/β
        assert st.c_x == pytest.approx(2 - math.sqrt(1 - beta_i), rel=1e-12)
        assert st.c_pred == pytest.approx(-beta_i / be, rel=1e-10)
        assert (st.c_noise > 0) == (i < 2) and st.stream == draw_stream(i)


def _pc_hand_loop(model, path, grid, prediction, seeds, shape, n, snr, cfg=1.0, y=None, null_y=None):
    """score_sde's PC sampler with fastdiff's noise, per sample (its norms are the sample's own)."""
    B = len(seeds)
    x = path.coefficients(grid[0])[1] * randn(seeds, 0, shape, dtype=torch.float64)

    def pred(x, t):
        tt = torch.full((B,), t)
        if cfg == 1.0:
            return model(x.float(), tt, y).double()
        p_null, p_y = model(x.float(), tt, torch.full_like(y, null_y)).double(), model(x.float(), tt, y).double()
        return p_null + cfg * (p_y - p_null)

    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        a_s, b_s = affine_coefficients(path, t, prediction, "score")
        for j in range(n):
            s = a_s * x + b_s * pred(x, t)
            xi = randn(seeds, langevin_stream(i, j), shape, dtype=torch.float32).double()
            eps = 2 * (snr * xi.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)) ** 2
            eps = eps.view((B,) + (1,) * len(shape))
            x = x + eps * s + (2 * eps).sqrt() * xi
        (al, be), (al1, be1) = path.coefficients(t)[:2], path.coefficients(t1)[:2]
        r = al / al1
        v = be * be - (r * be1) ** 2
        s = a_s * x + b_s * pred(x, t)
        x = (2 - r) * x + v * s
        if i < len(grid) - 2:
            x = x + math.sqrt(v) * randn(seeds, draw_stream(i), shape, dtype=torch.float32).double()
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_predictor_corrector_is_the_hand_loop(backend):
    """reverse_diffusion + 2 Langevin corrector steps per step on a VP path with a guided eps model (the
    corrector's score is the guided one), on every backend."""
    name, device = backend
    mix = class_conditional_mixture()
    model = MixtureModel(mix, "vp", "eps")
    path, grid = get_path("vp"), [0.2, 0.5, 0.8, 0.95]
    seeds, y = [3, 4, 5], torch.tensor([0, 1, 2])
    want = _pc_hand_loop(model, path, grid, "eps", seeds, (2,), 2, 0.2, cfg=2.0, y=y, null_y=-1)
    got = fastdiff.sample(model, None, 2.0, timesteps=grid, path="vp", prediction="eps", method="reverse_diffusion",
                          shape=(2,), seed=seeds, y=y.to(device), null_y=-1, corrector_steps=2, snr=0.2, backend=name,
                          device=device)
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_predictor_corrector_matches_diffusers_score_sde_ve(monkeypatch):
    """diffusers' ScoreSdeVeScheduler (score_sde's ReverseDiffusionPredictor + LangevinCorrector, VE) fed
    fastdiff's noise through its randn_tensor: the same samples as sample(method="reverse_diffusion",
    corrector_steps=1), one sample per batch (its step size takes batch means of the norms)."""
    sde_ve = pytest.importorskip("diffusers.schedulers.scheduling_sde_ve")
    N, snr, shape = 12, 0.16, (64,)
    sched = sde_ve.ScoreSdeVeScheduler(num_train_timesteps=N, snr=snr, sigma_min=0.01, sigma_max=20.0)
    sched.set_timesteps(N)
    sched.set_sigmas(N)
    # timesteps whose index long(t (N − 1)) is N − 1 − i exactly: sigma_i = discrete_sigmas[N − 1 − i]
    sched.timesteps = (torch.arange(N - 1, -1, -1, dtype=torch.float64) + 0.5) / (N - 1)
    sigmas = [float(sched.discrete_sigmas[N - 1 - i]) for i in range(N)] + [0.0]
    path, grid = ve_grid(sigmas)
    mix = _mixture_64d()
    model = MixtureModel(mix, path, "score")
    for seed in (5, 6):
        queue = [randn([seed], 0, shape)]
        for i in range(N):
            queue += [randn([seed], langevin_stream(i, 0), shape), randn([seed], draw_stream(i), shape)]
        monkeypatch.setattr(sde_ve, "randn_tensor", lambda *a, **k: queue.pop(0).clone())
        x = sde_ve.randn_tensor((1, *shape)) * sigmas[0]
        for i in range(N):
            t = torch.full((1,), grid[i])
            x = sched.step_correct(model(x, t), x).prev_sample
            x, x_mean = sched.step_pred(model(x, t), sched.timesteps[i], x, return_dict=False)
        ours = fastdiff.sample(model, None, timesteps=grid, path=path, prediction="score", method="reverse_diffusion",
                               shape=shape, seed=[seed], batch_size=1, corrector_steps=1, snr=snr)
        assert not queue
        torch.testing.assert_close(ours, x_mean, rtol=0, atol=2e-4 * x_mean.abs().max().item())


def _oracle_error(x, mix) -> float:
    z = mode_zscores(x, mix)
    return float(z.weights.pow(2).mean() + z.means.pow(2).mean() + torch.diagonal(z.covs, dim1=1, dim2=2).pow(2).mean())


def test_correctors_improve_on_the_predictor_alone():
    """At equal predictor steps (20, geometric VE levels 20 → 0.01), Langevin corrector steps lower the error
    against the exact mixture (mean squared z-score of its mode weights, means and variances) by a factor of > 1.5
    per corrector step (64 dimensions; measured: 119 → 60 → 39)."""
    mix = _mixture_64d()
    path, grid = ve_grid(exponential_sigmas(20, 0.01, 20.0))
    model = MixtureModel(mix, path, "score")
    kw = dict(timesteps=grid, path=path, prediction="score", method="reverse_diffusion", shape=(64,), batch_size=2000)
    errors = [_oracle_error(fastdiff.sample(model, None, corrector_steps=n, **kw), mix) for n in (0, 1, 2)]
    assert errors[1] < errors[0] / 1.5 and errors[2] < errors[1] / 1.2, errors


def test_a_corrected_sample_is_the_same_in_any_batch():
    """Each sample's step size comes from its own norms: a sample alone equals it in a batch, bit for bit."""
    mix = ring_mixture()
    kw = dict(path="vp", prediction="eps", method="reverse_diffusion", shape=(2,), corrector_steps=2, snr=0.1)
    model = MixtureModel(mix, "vp", "eps")
    batch = fastdiff.sample(model, 6, seed=[1, 2, 3], batch_size=3, **kw)
    for b, s in enumerate([1, 2, 3]):
        assert torch.equal(fastdiff.sample(model, 6, seed=[s], batch_size=1, **kw)[0], batch[b])


def test_low_precision_predictions():
    """A bfloat16 model: the corrector's reduction pass widens its predictions; the samples stay within bfloat16's
    rounding of the float32 model's."""
    model = MixtureModel(_mixture_64d(), "vp", "eps")
    kw = dict(path="vp", prediction="eps", method="reverse_diffusion", shape=(64,), batch_size=16, corrector_steps=1)
    full = fastdiff.sample(model, 8, **kw)
    half = fastdiff.sample(lambda x, t, y: model(x, t, y).to(torch.bfloat16), 8, **kw)
    assert half.isfinite().all() and (half - full).abs().max().item() < 0.05 * full.abs().max().item()


def test_errors_name_the_argument():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(path="vp", prediction="eps", shape=(2,), batch_size=2)
    with pytest.raises(ValueError, match="corrector_steps must be an int in"):
        fastdiff.sample(model, 4, corrector_steps=-1, **kw)
    with pytest.raises(ValueError, match="snr must be a finite number > 0"):
        fastdiff.sample(model, 4, corrector_steps=1, snr=0.0, **kw)
    with pytest.raises(ValueError, match="n_steps_each must be an int in"):
        fastdiff.sample(model, 4, method="annealed_langevin", n_steps_each=1000, **kw)
    with pytest.raises(ValueError, match="step_lr must be a finite number > 0"):
        fastdiff.sample(model, 4, method="annealed_langevin", step_lr=-1.0, **kw)
    with pytest.raises(ValueError, match="n_steps_each applies to method='annealed_langevin'"):
        fastdiff.sample(model, 4, method="euler", n_steps_each=3, **kw)
