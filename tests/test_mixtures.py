"""Tests of the Gaussian-mixture oracles in fastdiff.mixtures (docs/design.md §6)."""

import itertools
import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from fastdiff.paths import PREDICTIONS, UserPath, convert, get_path
from fastdiff.mixtures import (
    GaussianMixture,
    MixtureModel,
    assign_modes,
    class_conditional_mixture,
    mode_standard_errors,
    mode_statistics,
    mode_zscores,
    ring_mixture,
)

F64 = torch.float64
PATHS = ["condot", "vp", "vp-cosine"]


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=F64)


def random_mixture(k=3, d=3, seed=0):
    """A mixture with full (non-diagonal) covariances and unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    covs = a @ a.transpose(-1, -2) / d + 0.2 * torch.eye(d, dtype=F64)
    weights = torch.rand(k, generator=g, dtype=F64) + 0.2
    return GaussianMixture(means, covs, weights)


def torch_marginal(mix, t, path):
    """An independent construction of p_t with torch.distributions."""
    alpha, beta = get_path(path).coefficients(float(t))[:2]
    cov = alpha ** 2 * mix.covs + beta ** 2 * torch.eye(mix.dim, dtype=F64)
    return MixtureSameFamily(Categorical(probs=mix.weights), MultivariateNormal(alpha * mix.means, cov))


# ----------------------------------------------------------------------------- construction

def test_construction_forms_agree():
    means = randn(3, 2)
    a = GaussianMixture(means, stds=0.5)
    b = GaussianMixture(means, stds=[0.5, 0.5, 0.5])
    c = GaussianMixture(means, stds=torch.full((3, 2), 0.5))
    d = GaussianMixture(means, covs=0.25 * torch.eye(2).expand(3, 2, 2))
    for m in (b, c, d):
        assert torch.allclose(m.covs, a.covs)
        assert torch.allclose(m.weights, torch.full((3,), 1 / 3, dtype=F64))
    assert GaussianMixture(means, stds=[0.1, 0.2, 0.3], weights=[1, 1, 2]).weights.tolist() == [0.25, 0.25, 0.5]


@pytest.mark.parametrize("kwargs", [
    dict(),  # neither covs nor stds
    dict(stds=0.0),
    dict(stds=[0.1, 0.2]),
    dict(covs=torch.tensor([[[1.0, 2.0], [2.0, 1.0]]] * 3)),  # not positive definite
    dict(covs=torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 3)),  # not symmetric
    dict(stds=0.3, weights=[1.0, -1.0, 1.0]),
    dict(stds=0.3, labels=[0.0, 1.0, 2.0]),
])
def test_construction_rejects(kwargs):
    with pytest.raises(ValueError):
        GaussianMixture(randn(3, 2), **kwargs)


def test_sample_reproducible_and_log_prob():
    mix = random_mixture()
    z1, c1 = mix.sample(1000, torch.Generator().manual_seed(3))
    z2, c2 = mix.sample(1000, torch.Generator().manual_seed(3))
    assert z1.dtype == F64 and z1.shape == (1000, 3) and c1.shape == (1000,)
    assert torch.equal(z1, z2) and torch.equal(c1, c2)
    ref = torch_marginal(mix, 1.0, "condot").log_prob(z1)
    assert torch.allclose(mix.log_prob(z1), ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- exact fields

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", [0.0, 0.02, 0.3, 0.5, 0.85, 0.999, 1.0])
def test_score_is_gradient_of_marginal_log_density(path, t):
    mix = random_mixture()
    x = randn(64, 3, seed=1, scale=2.5)
    dist = torch_marginal(mix, t, path)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dist.log_prob(xg).sum(), xg)
    assert torch.allclose(mix.score(x, t, path), grad, rtol=1e-9, atol=1e-9)
    assert torch.allclose(mix.marginal_log_prob(x, t, path), dist.log_prob(x), rtol=1e-12, atol=1e-10)
    # and autograd through the module's own log-density
    xg = x.clone().requires_grad_(True)
    (grad2,) = torch.autograd.grad(mix.marginal_log_prob(xg, t, path).sum(), xg)
    assert torch.allclose(grad2, grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", [0.05, 0.3, 0.6, 0.95])
def test_predictions_consistent_through_convert(path, t):
    mix = random_mixture(seed=2)
    x = randn(50, 3, seed=4, scale=2.0)
    preds = {p: mix.prediction(x, t, path, p) for p in PREDICTIONS}
    for src, dst in itertools.permutations(PREDICTIONS, 2):
        got = convert(preds[src], x, t, path, src, dst)
        assert torch.allclose(got, preds[dst], rtol=1e-8, atol=1e-8), (src, dst)
    # also with a [B] tensor t of mixed times
    tt = torch.linspace(0.05, 0.95, 50, dtype=F64)
    preds = {p: mix.prediction(x, tt, path, p) for p in PREDICTIONS}
    for src, dst in itertools.permutations(PREDICTIONS, 2):
        assert torch.allclose(convert(preds[src], x, tt, path, src, dst), preds[dst], rtol=1e-8, atol=1e-8)


def test_tensor_t_matches_float_t_and_keeps_dtype():
    mix = random_mixture()
    x = randn(8, 3, seed=5)
    tt = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.5, 0.7, 0.99, 1.0], dtype=torch.float32)
    for p in PREDICTIONS:
        batched = mix.prediction(x, tt, "condot", p)
        rows = torch.cat([mix.prediction(x[i:i + 1], float(tt[i]), "condot", p) for i in range(8)])
        assert torch.allclose(batched, rows, rtol=1e-12, atol=1e-12)
    x32 = x.float()
    out = mix.velocity(x32, tt, "condot")
    assert out.dtype == torch.float32 and out.shape == x32.shape
    # [B, *S] inputs with prod(S) = D
    x4 = randn(8, 1, 3, seed=6)
    assert torch.allclose(mix.score(x4, 0.4).reshape(8, 3), mix.score(x4.reshape(8, 3), 0.4))
    with pytest.raises(ValueError):
        mix.score(x, 1.5)
    with pytest.raises(ValueError):
        mix.score(x, torch.full((8,), -0.1))
    with pytest.raises(ValueError):
        mix.score(randn(8, 2), 0.5)


@pytest.mark.parametrize("path", ["condot", "vp-cosine"])
def test_alpha_zero_is_standard_normal_and_prior_mean(path):
    alpha, beta = get_path(path).coefficients(0.0)[:2]
    assert alpha == 0.0
    mix = random_mixture(seed=7)
    x = randn(40, 3, seed=8, scale=3.0)
    ref = MultivariateNormal(torch.zeros(3, dtype=F64), beta ** 2 * torch.eye(3, dtype=F64))
    assert torch.allclose(mix.marginal_log_prob(x, 0.0, path), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    assert torch.allclose(mix.x0(x, 0.0, path), mix.mean.expand(40, 3), rtol=1e-12, atol=1e-12)
    assert torch.allclose(mix.score(x, 0.0, path), -x / beta ** 2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(mix.eps(x, 0.0, path), x / beta, rtol=1e-12, atol=1e-12)
    assert torch.allclose(mix.posterior(x, 0.0, path), mix.weights.expand(40, 3))
    m = mix.marginal(0.0, path)
    assert torch.allclose(m.means, torch.zeros(3, 3, dtype=F64))


def test_condot_velocity_finite_at_ends():
    mix = ring_mixture(heterogeneous=True)
    x = randn(100, 2, seed=9, scale=4.0)
    u0 = mix.velocity(x, 0.0, "condot")
    u1 = mix.velocity(x, 1.0, "condot")
    assert torch.isfinite(u0).all() and torch.isfinite(u1).all()
    assert torch.allclose(u0, mix.mean - x, rtol=1e-12, atol=1e-12)  # E[z] - E[eps | x] with eps = x
    assert torch.allclose(u1, x, rtol=1e-12, atol=1e-12)  # x0 = x, eps = 0 at beta = 0
    assert torch.allclose(mix.x0(x, 1.0, "condot"), x) and torch.equal(mix.eps(x, 1.0, "condot"), torch.zeros_like(x))
    # continuity into the ends
    assert torch.allclose(mix.velocity(x, 1.0 - 1e-9, "condot"), u1, atol=1e-6)
    assert torch.allclose(mix.velocity(x, 1e-9, "condot"), u0, atol=1e-6)


@pytest.mark.parametrize("path", ["vp", "vp-cosine"])
def test_vp_velocity_limit_at_t1(path):
    assert math.isinf(get_path(path).coefficients(1.0)[3])  # d_beta = -inf there
    mix = random_mixture(seed=10)
    x = randn(30, 3, seed=11, scale=2.0)
    u1 = mix.velocity(x, 1.0, path)
    assert torch.isfinite(u1).all()
    near = mix.velocity(x, 1.0 - 1e-9, path)
    assert torch.allclose(u1, near, rtol=1e-5, atol=1e-5)


def test_user_path_velocity_limit_uses_finite_difference():
    # a VP-like user path (beta = sqrt(1 - t^2)): d_beta(1) = -inf
    path = UserPath(lambda t: t, lambda t: torch.sqrt(1 - t * t), lambda t: torch.ones_like(t),
                    lambda t: -t / torch.sqrt(1 - t * t))
    mix = random_mixture(seed=12)
    x = randn(20, 3, seed=13)
    u1 = mix.velocity(x, 1.0, path)
    assert torch.isfinite(u1).all()
    assert torch.allclose(u1, mix.velocity(x, 1.0 - 1e-10, path), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_single_gaussian_closed_form(path, t):
    g = torch.Generator().manual_seed(14)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    sigma = a @ a.T + 0.3 * torch.eye(3, dtype=F64)
    mu = torch.randn(3, generator=g, dtype=F64)
    mix = GaussianMixture(mu[None], sigma[None])
    x = randn(25, 3, seed=15, scale=2.0)
    alpha, beta = get_path(path).coefficients(t)[:2]
    c = alpha ** 2 * sigma + beta ** 2 * torch.eye(3, dtype=F64)
    expected_x0 = mu + alpha * torch.linalg.solve(c, (x - alpha * mu).T).T @ sigma  # sigma symmetric
    assert torch.allclose(mix.x0(x, t, path), expected_x0, rtol=1e-10, atol=1e-10)
    expected_score = -torch.linalg.solve(c, (x - alpha * mu).T).T
    assert torch.allclose(mix.score(x, t, path), expected_score, rtol=1e-10, atol=1e-10)


def test_flow_map_solves_the_ode():
    g = torch.Generator().manual_seed(16)
    a = torch.randn(2, 2, generator=g, dtype=F64)
    mix = GaussianMixture(torch.tensor([[1.0, -2.0]], dtype=F64), (a @ a.T + 0.1 * torch.eye(2, dtype=F64))[None])
    x0 = randn(10, 2, seed=17)
    n = 400
    x = x0.clone()
    h = 1.0 / n
    for i in range(n):  # RK4 on the exact velocity
        t = i * h
        k1 = mix.velocity(x, t)
        k2 = mix.velocity(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = mix.velocity(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = mix.velocity(x + h * k3, min(t + h, 1.0))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert torch.allclose(x, mix.flow_map(x0, 0.0, 1.0), rtol=1e-9, atol=1e-9)
    # the flow map pushes N(0, I) onto the data distribution
    z = mix.flow_map(randn(200000, 2, seed=18), 0.0, 1.0)
    assert torch.allclose(z.mean(0), mix.means[0], atol=0.02)
    assert torch.allclose(torch.cov(z.T), mix.covs[0], atol=0.03)
    with pytest.raises(ValueError):
        ring_mixture().flow_map(x0, 0.0, 1.0)


# ----------------------------------------------------------------------------- model and classes

def test_mixture_model_matches_mixture_fields():
    mix = random_mixture(seed=19)
    x = randn(16, 3, seed=20).float()
    t = torch.rand(16, generator=torch.Generator().manual_seed(21))
    for path, pred in itertools.product(PATHS, PREDICTIONS):
        model = MixtureModel(mix, path=path, prediction=pred)
        out = model(x, t, None)
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert torch.equal(out, mix.prediction(x, t, path, pred))
    # unlabelled mixture: y is ignored
    model = MixtureModel(mix)
    assert torch.equal(model(x, t, torch.arange(16)), model(x, t))
    assert model.nfe == 2 and model.batch_sizes == [16, 16]
    model.reset()
    assert model.nfe == 0
    assert MixtureModel(mix, prediction="epsilon").prediction == "eps"


def test_class_conditional_model_selects_components():
    mix = class_conditional_mixture(num_classes=4, modes_per_class=2, heterogeneous=True)
    assert mix.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.allclose(mix.class_weights().sum(), torch.tensor(1.0, dtype=F64))
    x = randn(12, 2, seed=22, scale=4.0)
    t = torch.linspace(0.0, 1.0, 12, dtype=F64)
    for path, pred in itertools.product(PATHS, PREDICTIONS):
        tt = t  # includes t = 0 and t = 1
        model = MixtureModel(mix, path=path, prediction=pred)
        for c in range(4):
            sub = mix.conditional(c)
            assert sub.num_components == 2 and (sub.labels == c).all()
            assert torch.allclose(model(x, tt, torch.full((12,), c)), sub.prediction(x, tt, path, pred),
                                  rtol=1e-12, atol=1e-12)
        assert torch.allclose(model(x, tt, torch.full((12,), -1)), mix.prediction(x, tt, path, pred),
                              rtol=1e-12, atol=1e-12)
        assert torch.allclose(model(x, tt, None), mix.prediction(x, tt, path, pred), rtol=1e-12, atol=1e-12)
    # a mixed batch of labels, including the null label, equals row-wise evaluation
    model = MixtureModel(mix, prediction="velocity")
    y = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, -1, 2, 2])
    out = model(x, t, y)
    for i in range(12):
        ref = mix if y[i] == -1 else mix.conditional(int(y[i]))
        assert torch.allclose(out[i], ref.velocity(x[i:i + 1], float(t[i]))[0], rtol=1e-12, atol=1e-12)
    # CFG helper: p_null + w (p_y - p_null); w = 1 is the conditional prediction
    w = 3.0
    yc = torch.full((12,), 1)
    g = model.guided(x, t, yc, w)
    p_y, p_n = model(x, t, yc), model(x, t, torch.full((12,), -1))
    assert torch.allclose(g, p_n + w * (p_y - p_n), rtol=1e-12, atol=1e-12)
    assert torch.allclose(model.guided(x, t, yc, 1.0), p_y, rtol=1e-12, atol=1e-12)
    # the guided score is the score of p_null^(1-w) p_y^w (autograd of the tilted log-density)
    smodel = MixtureModel(mix, prediction="score")
    xg = x.clone().requires_grad_(True)
    logp = (1 - w) * mix.marginal_log_prob(xg, 0.4) + w * mix.conditional(1).marginal_log_prob(xg, 0.4)
    (grad,) = torch.autograd.grad(logp.sum(), xg)
    assert torch.allclose(smodel.guided(x, 0.4, 1, w), grad, rtol=1e-9, atol=1e-9)
    # bad labels
    with pytest.raises(ValueError):
        model(x, t, torch.full((12,), 7))
    with pytest.raises(ValueError):
        model(x, t, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        MixtureModel(mix, null_label=0)


# ----------------------------------------------------------------------------- factories and statistics

def test_ring_mixture_geometry():
    mix = ring_mixture(k=8, radius=4.0, std=[[0.5, 0.2]] * 8)
    assert mix.means.shape == (8, 2)
    assert torch.allclose(mix.means.norm(dim=-1), torch.full((8,), 4.0, dtype=F64))
    for k in range(8):
        radial = mix.means[k] / 4.0
        tangential = torch.stack([-radial[1], radial[0]])
        assert math.isclose(float(radial @ mix.covs[k] @ radial), 0.25, rel_tol=1e-12)
        assert math.isclose(float(tangential @ mix.covs[k] @ tangential), 0.04, rel_tol=1e-12)
    het = ring_mixture(heterogeneous=True)
    assert len(set(het.weights.tolist())) == 4
    assert not torch.allclose(het.covs[1], het.covs[1].diagonal().mean() * torch.eye(2, dtype=F64))
    with pytest.raises(ValueError):
        ring_mixture(std=[0.1, 0.2])


def test_assign_modes_recovers_components_of_separated_mixture():
    mix = ring_mixture(heterogeneous=True)
    z, comp = mix.sample(20000, torch.Generator().manual_seed(23))
    assert (assign_modes(z, mix) == comp).float().mean() > 0.9999


@pytest.mark.parametrize("factory", [lambda: ring_mixture(heterogeneous=True),
                                     lambda: class_conditional_mixture(heterogeneous=True),
                                     lambda: ring_mixture(k=5, std=0.4, weights=[0.1, 0.3, 0.2, 0.25, 0.15])])
def test_mode_statistics_recover_mixture(factory):
    mix = factory()
    n = 200000
    z, _ = mix.sample(n, torch.Generator().manual_seed(24))
    stats = mode_statistics(z, mix)
    assert int(stats.counts.sum()) == n
    se = mode_standard_errors(mix, n)
    assert ((stats.weights - mix.weights).abs() < 4 * se.weights).all()
    assert ((stats.means - mix.means).abs() < 4 * se.means).all()
    assert ((stats.covs - mix.covs).abs() < 4 * se.covs).all()
    zs = mode_zscores(z, mix)
    for q in (zs.weights, zs.means, zs.covs):
        assert torch.isfinite(q).all() and q.abs().max() < 4


def test_mode_zscores_detect_wrong_distribution():
    mix = ring_mixture(heterogeneous=True)
    n = 200000
    # samples from the mixture with equal weights, and with covariances inflated by 10%
    wrong_w = GaussianMixture(mix.means, mix.covs)
    z, _ = wrong_w.sample(n // 4, torch.Generator().manual_seed(25))
    assert mode_zscores(z, mix).weights.abs().max() > 10
    wrong_c = GaussianMixture(mix.means, 1.1 * mix.covs, mix.weights)
    z, _ = wrong_c.sample(n, torch.Generator().manual_seed(26))
    zc = mode_zscores(z, mix)
    assert zc.covs.abs().max() > 6 and zc.weights.abs().max() < 4
    # non-finite samples are assigned to no mode and lower the weights
    z[:1000] = float("nan")
    stats = mode_statistics(z, mix)
    assert int(stats.counts.sum()) == n - 1000
