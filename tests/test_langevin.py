"""fastdiff.langevin: unadjusted Langevin (ULA) and MALA chains against the lectures' update, analytic targets
(a Gaussian, a 1-D mixture by a Kolmogorov–Smirnov test, the oracle module's 2-D mixture) and themselves (any
batch, any backend)."""

import math

import pytest
import torch
from conftest import BACKENDS

import fastdiff
from fastdiff.mixtures import ring_mixture, mode_zscores
from fastdiff.ops import randn
from fastdiff.sampling.core.stage import draw_stream


def _gaussian_score(x):  # p = N(3, 1), the lectures' example
    return -(x - 3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_are_the_lectures_update(backend):
    """x_{i+1} = x_i + (h/2) s(x_i) + sqrt(h) ξ_i with ξ_i the normals of stream draw_stream(i): from X_0 = −2,
    h = 0.01, step 1 drifts by h/2 · 5 = 0.025 (the chapter's table), on every backend; per-sample step sizes."""
    name, device = backend
    seeds = [5, 9, 11]
    x0 = torch.tensor([[-2.0, 0.5], [-2.0, 4.0], [1.0, -1.0]], device=device)
    h = torch.tensor([0.01, 0.04, 0.2])
    chain = fastdiff.langevin(_gaussian_score, x0, steps=4, step_size=h, seed=seeds, thin=1, backend=name)
    assert chain.shape == (4, 3, 2) and chain.device.type == device
    x = x0.cpu().double()
    for i in range(4):
        xi = randn(seeds, draw_stream(i), (2,), dtype=torch.float64)
        x = x + (h[:, None] / 2) * (3.0 - x) + h.double().sqrt()[:, None] * xi
        torch.testing.assert_close(chain[i].cpu().double(), x, rtol=0, atol=2e-6)
    drift = (chain[0, 0, 0].item() - (-2.0)) - math.sqrt(0.01) * randn(seeds[:1], draw_stream(0), (2,))[0, 0].item()
    assert drift == pytest.approx(0.025, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mala_backends_agree(backend):
    """MALA's proposal (the fused step), its reduction pass and its draws on every backend: the chains equal the
    reference backend's (the decisions too, at these margins)."""
    name, device = backend
    kw = dict(steps=6, step_size=[0.3, 0.6, 0.9], log_prob=_log_prob_1d, seed=[4, 8, 15], thin=1,
              return_acceptance=True)
    x0 = torch.tensor([[0.0], [2.0], [-1.5]])
    want, acc = fastdiff.langevin(None, x0, backend="reference", **kw)
    got, acc_got = fastdiff.langevin(None, x0.to(device), backend=name, **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)
    assert torch.equal(acc_got.cpu(), acc)


def test_gaussian_target_mean_3_variance_1():
    """The N(3, 1) example from X_0 = −2: the chains' law converges to N(3, 1/(1 − h/4)) (ULA's stationary law
    on a unit Gaussian; 1.0025 at h = 0.01)."""
    n, h = 4000, 0.05
    x = fastdiff.langevin(_gaussian_score, torch.full((n, 1), -2.0), steps=600, step_size=h, seed=1)[:, 0].double()
    var = 1.0 / (1.0 - h / 4)
    assert abs(x.mean().item() - 3.0) < 4 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 4 * var * math.sqrt(2.0 / n)


# a 1-D target with unequal, unequally wide modes: 0.3 N(−1, 0.5²) + 0.7 N(1.5, 0.8²)
_W, _MU, _SD = torch.tensor([0.3, 0.7]), torch.tensor([-1.0, 1.5]), torch.tensor([0.5, 0.8])


def _log_prob_1d(x):
    z = (x - _MU.to(x)) / _SD.to(x)  # [B, 2] from [B, 1]
    return torch.logsumexp(torch.log(_W.to(x)) - 0.5 * z * z - torch.log(_SD.to(x)), dim=1)


def _cdf_1d(v):  # v: a numpy array
    from scipy.special import ndtr

    return sum(w * ndtr((v - m) / s) for w, m, s in zip(_W.tolist(), _MU.tolist(), _SD.tolist()))


def test_mala_is_exact_in_one_dimension():
    """MALA with a large step (h = 0.6) samples the target exactly (KS test on independent chains); the same
    chains without the adjustment are visibly biased; the acceptance rate is reported per chain."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 2000
    x, acceptance = fastdiff.langevin(None, shape=(1,), batch_size=n, steps=200, step_size=0.6, log_prob=_log_prob_1d,
                                      seed=3, return_acceptance=True)
    assert acceptance.shape == (n,) and 0.5 < acceptance.mean().item() < 1.0
    assert scipy_stats.kstest(x[:, 0].double().numpy(), _cdf_1d).pvalue > 1e-3
    ula = fastdiff.langevin(None, shape=(1,), batch_size=n, steps=200, step_size=0.6, log_prob=_log_prob_1d,
                            metropolis=False, seed=3)
    assert scipy_stats.kstest(ula[:, 0].double().numpy(), _cdf_1d).pvalue < 1e-4


@pytest.mark.parametrize("metropolis", [False, True])
def test_mixture_is_stationary(metropolis):
    """The oracle module's 8-mode ring, started from its own samples: after 300 steps the chains still hold
    its mode weights, means and covariances within statistical error (MALA: the log-density by autograd)."""
    mix = ring_mixture()
    x0 = mix.sample(3000, torch.Generator().manual_seed(0))[0].float()
    if metropolis:
        x = fastdiff.langevin(None, x0, steps=300, step_size=0.02, log_prob=mix.log_prob, seed=7)
    else:
        x = fastdiff.langevin(lambda x: mix.score(x, 1.0), x0, steps=300, step_size=0.002, seed=7)
    z = mode_zscores(x, mix)
    assert z.weights.abs().max() < 4.5 and z.means.abs().max() < 4.5 and z.covs.abs().max() < 4.5, z


def test_a_chain_is_the_same_alone_and_in_any_batch():
    """Chain b is a function of its seed, x0 and step size alone: the same bits in a batch of 3 as alone, MALA
    decisions included."""
    seeds, h = [4, 8, 15], [0.3, 0.6, 0.9]
    x0 = torch.tensor([[0.0], [2.0], [-1.5]])
    kw = dict(steps=40, log_prob=_log_prob_1d, thin=10)
    batch, acc = fastdiff.langevin(None, x0, step_size=h, seed=seeds, return_acceptance=True, **kw)
    for b in range(3):
        alone, acc_b = fastdiff.langevin(None, x0[b:b + 1], step_size=h[b], seed=[seeds[b]], return_acceptance=True,
                                         **kw)
        assert torch.equal(alone[:, 0], batch[:, b]) and acc_b.item() == acc[b].item()


def test_thin_and_burn_in_keep_every_kth_state_after_the_burn_in():
    full = fastdiff.langevin(_gaussian_score, shape=(3,), batch_size=2, steps=10, step_size=0.1, thin=1, seed=2)
    kept = fastdiff.langevin(_gaussian_score, shape=(3,), batch_size=2, steps=10, step_size=0.1, thin=3, burn_in=1,
                             seed=2)
    assert torch.equal(kept, full[[3, 6, 9]])  # the states after steps 4, 7, 10
    last = fastdiff.langevin(_gaussian_score, shape=(3,), batch_size=2, steps=10, step_size=0.1, seed=2)
    assert torch.equal(last, full[-1])
    start = randn([2, 3], 0, (3,))  # without x0: the normals of stream 0
    one = fastdiff.langevin(_gaussian_score, shape=(3,), batch_size=2, steps=1, step_size=0.1, seed=2)
    torch.testing.assert_close(one, start + 0.05 * (3 - start) + math.sqrt(0.1) * randn([2, 3], draw_stream(0), (3,)))


def test_errors_name_the_argument():
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        fastdiff.langevin(_gaussian_score, x0, steps=0, step_size=0.1)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        fastdiff.langevin(_gaussian_score, x0, steps=2, step_size=-0.1)
    with pytest.raises(ValueError, match=r"step_size holds \(3,\) values"):
        fastdiff.langevin(_gaussian_score, x0, steps=2, step_size=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="give score"):
        fastdiff.langevin(None, x0, steps=2, step_size=0.1)
    with pytest.raises(ValueError, match="give x0"):
        fastdiff.langevin(_gaussian_score, steps=2, step_size=0.1)
    with pytest.raises(ValueError, match="burn_in needs thin"):
        fastdiff.langevin(_gaussian_score, x0, steps=5, step_size=0.1, burn_in=2)
    with pytest.raises(ValueError, match="exceeds steps"):
        fastdiff.langevin(_gaussian_score, x0, steps=5, step_size=0.1, burn_in=3, thin=3)
    with pytest.raises(ValueError, match="metropolis=True needs log_prob"):
        fastdiff.langevin(_gaussian_score, x0, steps=2, step_size=0.1, metropolis=True)
    with pytest.raises(ValueError, match="return_acceptance needs"):
        fastdiff.langevin(_gaussian_score, x0, steps=2, step_size=0.1, return_acceptance=True)
    with pytest.raises(ValueError, match=r"score\(x\) must return a floating-point tensor shaped like x"):
        fastdiff.langevin(lambda x: x[:, :1], x0, steps=2, step_size=0.1)
    with pytest.raises(ValueError, match=r"log_prob\(x\) must return one value per sample"):
        fastdiff.langevin(None, x0, steps=2, step_size=0.1, log_prob=lambda x: x.sum())
    with pytest.raises(FloatingPointError, match="not finite at step 2"):
        calls = []

        def score(x):
            calls.append(1)
            return torch.full_like(x, math.nan) if len(calls) == 3 else -x
        fastdiff.langevin(score, x0, steps=4, step_size=0.1)
