"""The seed lectures' score-matching objectives: NCSN's multi-level DSM (levels, λ(σ) = σ²), implicit (Hyvärinen)
and sliced score matching, against hand formulas and by training a small score model through the Trainer."""

import math

import pytest
import torch
from conftest import BACKENDS
from torch import nn

from fastdiff.mixtures import GaussianMixture
from fastdiff.ops import randn
from fastdiff.training import (STREAM_EPS, STREAM_PROJECTION, ScoreMatchingObjective, Trainer, ncsn_grid,
                               ncsn_objective, ncsn_sigmas, training_seeds)


def test_ncsn_levels_and_weights():
    """Times are the levels' flow times, each drawn ~1/L of the time; the weight is λ(σ) = σ² on the score error
    (β² for a score model, 1 for an eps model, SNR for an x0 model)."""
    sigmas = ncsn_sigmas(0.01, 1.0, 10)
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.01)
    assert all(b / a == pytest.approx(sigmas[1] / sigmas[0]) for a, b in zip(sigmas, sigmas[1:]))
    path, grid = ncsn_grid(0.01, 1.0, 10)
    assert [path.coefficients(t)[1] for t in grid[:-1]] == pytest.approx(sigmas, rel=1e-9) and grid[-1] == 1.0
    objective = ncsn_objective(0.01, 1.0, 10)
    t = objective.sample_t(training_seeds(0, 0, 5000))
    counts = torch.stack([(t == v).sum() for v in torch.tensor(grid[:-1], dtype=torch.float64)])
    assert counts.sum() == 5000 and (counts - 500).abs().max() < 4 * math.sqrt(500 * 0.9)
    beta = path.coefficients(t)[1]
    torch.testing.assert_close(objective.weights(t), (beta * beta).float())
    assert bool((ncsn_objective(prediction="eps").weights(t) == 1).all())
    al = path.coefficients(t)[0]
    torch.testing.assert_close(ncsn_objective(prediction="x0").weights(t), ((al / beta) ** 2).float())
    assert objective.config()["levels"] == grid[:-1] and objective.config()["weighting"] == "ncsn"
    from fastdiff.paths import get_path

    assert repr(get_path(objective.config()["path"])) == repr(path)  # VE(sigma_max=...), not the default "ve"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ncsn_loss_is_sigma_s_plus_eps_squared(backend):
    """For a score model the loss is E_i ‖σ_i s(z + σ_i ε) + ε‖² / d, ε the training stream's normals, on every
    backend of the fused loss."""
    name, device = backend
    objective = ncsn_objective(0.05, 2.0, 6, backend=name)
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    seeds = training_seeds(1, 0, 7)

    def model(x, t, y):
        return -x / (1.0 + t.view(-1, 1))

    loss = objective(model, z.to(device), None, seeds.to(device), reduction="none").cpu()
    t = objective.sample_t(seeds)
    sigma = objective.path.coefficients(t)[1].view(-1, 1)
    eps = randn(seeds, STREAM_EPS, (3,), dtype=torch.float64)
    x = z.double() + sigma * eps
    want = ((sigma * model(x, t.view(-1), None) + eps) ** 2).mean(1)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


class _Linear(nn.Module):  # s(x) = A x + b: trace A exactly
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, t, y=None):
        return self.lin(x)


def test_implicit_and_sliced_losses_are_the_formulas():
    torch.manual_seed(0)
    model = _Linear(4)
    A, b = model.lin.weight.detach().double(), model.lin.bias.detach().double()
    z = torch.randn(5, 4)
    seeds = training_seeds(2, 0, 5)
    s = z.double() @ A.T + b
    ism = ScoreMatchingObjective("implicit")(model, z, None, seeds, reduction="none")
    torch.testing.assert_close(ism.double(), (0.5 * s.square().sum(1) + torch.trace(A)) / 4, rtol=1e-5, atol=1e-6)
    v = randn(seeds, STREAM_PROJECTION, (3 * 4,), dtype=torch.float64).view(5, 3, 4)
    for kind, proj in (("rademacher", torch.where(v >= 0, 1.0, -1.0).double()), ("gaussian", v)):
        quad = torch.einsum("bki,ij,bkj->bk", proj, A, proj)  # vᵀ A v
        for vr in (True, False):
            got = ScoreMatchingObjective("sliced", projections=3, projection_kind=kind, variance_reduced=vr)(
                model, z, None, seeds, reduction="none")
            second = 0.5 * s.square().sum(1, keepdim=True) if vr else 0.5 * torch.einsum("bki,bi->bk", proj, s) ** 2
            torch.testing.assert_close(got.double(), (quad + second).mean(1) / 4, rtol=1e-5, atol=1e-5)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, t, y=None):
        return self.net(x)


@pytest.mark.slow
@pytest.mark.parametrize("objective", [ScoreMatchingObjective("implicit"), ScoreMatchingObjective("sliced"),
                                       ScoreMatchingObjective("sliced", projection_kind="gaussian",
                                                              variance_reduced=False)],
                         ids=["implicit", "sliced-vr", "sliced-gaussian"])
def test_learned_score_is_close_to_the_exact_one(objective):
    """A small MLP trained by the Trainer on 4096 samples of a 3-mode 2-D mixture, without its score: the
    learned score's relative L2 error against the exact score on fresh samples is < 0.3 (measured after 500
    steps: implicit 0.18, sliced (variance-reduced, Rademacher) 0.19, sliced (plain, Gaussian) 0.21)."""
    mix = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]]), stds=torch.tensor([0.7, 0.8, 0.6]))
    data = mix.sample(4096, torch.Generator().manual_seed(0))[0].float()
    torch.manual_seed(0)
    model = _MLP()
    Trainer(model, data, objective=objective, steps=500, batch_size=256, lr=5e-3, warmup=50, lr_schedule="cosine",
            ema_decay=0.0, progress=False, seed=0).fit()
    test = mix.sample(2000, torch.Generator().manual_seed(1))[0].float()
    exact = mix.score(test.double(), 1.0)
    with torch.no_grad():
        learned = model(test, None).double()
    rel = ((learned - exact).square().sum() / exact.square().sum()).sqrt().item()
    assert rel < 0.3, rel


def test_a_sample_loss_is_the_same_alone_and_in_a_batch():
    torch.manual_seed(0)
    model = _MLP()
    z = torch.randn(4, 2)
    seeds = training_seeds(3, 10, 4)
    objective = ScoreMatchingObjective("sliced", projections=2, noise_std=0.1)
    batch = objective(model, z, None, seeds, reduction="none")
    for b in range(4):
        torch.testing.assert_close(objective(model, z[b:b + 1], None, seeds[b:b + 1], reduction="none")[0], batch[b])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="kind must be one of"):
        ScoreMatchingObjective("denoising")
    with pytest.raises(ValueError, match="projections must be an int >= 1"):
        ScoreMatchingObjective(projections=0)
    with pytest.raises(ValueError, match="projection_kind must be"):
        ScoreMatchingObjective(projection_kind="sphere")
    with pytest.raises(ValueError, match="noise_std must be"):
        ScoreMatchingObjective(noise_std=-1.0)
    with pytest.raises(ValueError, match="num_levels must be an int >= 2"):
        ncsn_sigmas(0.01, 1.0, 1)
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        ncsn_objective(1.0, 0.5)
    with pytest.raises(ValueError, match="levels .* go with"):
        from fastdiff.training import DiffusionObjective

        DiffusionObjective(time_sampling="levels")
    with pytest.raises(ValueError, match="the model returned shape"):
        ScoreMatchingObjective()(lambda x, t, y: x[:, :1], torch.zeros(2, 3), None, training_seeds(0, 0, 2))


def test_ncsn_trains_on_the_digits():
    """NCSN's objective through the Trainer on the demo's UNet and digits (eps parameterization, 10 levels σ 2 →
    0.02): the loss falls from ~1 to below 0.6 in 100 steps (the full run and its samples:
    docs/scripts/score_based_pictures.py, docs/score_based.md)."""
    pytest.importorskip("sklearn")
    from fastdiff.demo import data
    from fastdiff.demo.run import digits_model

    torch.manual_seed(0)
    trainer = Trainer(digits_model(), data.digits(), objective=ncsn_objective(0.02, 2.0, 10, prediction="eps"),
                      steps=100, batch_size=128, lr=2e-3, warmup=10, ema_decay=0.0, progress=False, log_every=10, seed=0)
    trainer.fit()
    losses = [loss for _, loss in trainer.history]  # the mean of every 10 steps
    assert losses[0] > 0.8 and losses[-1] < 0.6, losses
