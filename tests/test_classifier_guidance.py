"""Classifier guidance (fastdiff.sampling.features.classifier) on the analytic mixture, whose class posterior and its
gradient are exact (fastdiff.mixture_conditionals.MixtureClassifier): at scale 1 an unconditional model has the
class-conditional field, so it samples what the conditional model samples, on every backend."""

import math

import pytest
import torch

import fastdiff
from fastdiff.mixture_conditionals import MixtureClassifier
from fastdiff.mixtures import MixtureModel, class_conditional_mixture
from fastdiff.paths import affine_coefficients
from conftest import BACKENDS

MIX = class_conditional_mixture(4, 2, std=0.6)
GRID = [1e-3 + (1 - 1e-3) * i / 40 for i in range(41)]
SHORT = GRID[::4]  # the identities hold on any grid: a short one keeps the Triton interpreter's runs brief


def _unconditional(model):
    return lambda x, t, y: model(x, t, None)


@pytest.mark.parametrize("path", ["condot", "vp"])
def test_classifier_gradient_is_exact(path):
    """Autograd through the mixture's class log-posterior = the closed form s_y - s (float64)."""
    clf = MixtureClassifier(MIX, path)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.rand(64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=g)
    logp = clf(x, t)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(64, dtype=torch.float64))
    grad, = torch.autograd.grad(logp.gather(1, y[:, None]).sum(), x)
    torch.testing.assert_close(grad, clf.gradient(x.detach(), t, y), rtol=1e-9, atol=1e-10)


CASES = [("condot", "velocity", "heun"), ("vp", "eps", "dpmpp_2m"), ("condot", "x0", "euler"), ("vp", "velocity", "ddim")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path,prediction,method", CASES)
def test_scale_one_samples_the_conditional(backend, path, prediction, method):
    """Bayes: grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x). The unconditional model guided at scale 1
    by the exact classifier runs the conditional model's field: same samples, same noise and grid."""
    name, device = backend
    if name == "triton" and device == "cpu" and (path, prediction, method) != CASES[0]:
        pytest.skip("the Triton interpreter runs one case (about 35 s each); the kernels are the same for all")
    model = MixtureModel(MIX, path, prediction)
    B = 16  # the Triton interpreter's cost grows with the batch (~5 s per sample here)
    y = (torch.arange(B) % 4).to(device)
    kw = dict(shape=(2,), y=y, path=path, prediction=prediction, method=method, seed=5, backend=name, device=device)
    guided = fastdiff.sample(_unconditional(model), None, timesteps=SHORT, classifier=MixtureClassifier(MIX, path),
                             **kw)
    conditional = fastdiff.sample(model, None, timesteps=SHORT, **kw)
    scale = conditional.abs().max().item()
    torch.testing.assert_close(guided, conditional, rtol=0, atol=2e-5 * scale)


def _bayes_classes(x):
    """The data-space Bayes class of each sample (class of its most probable component)."""
    return MIX.labels[MIX.posterior(x.double().cpu(), 1.0)[:, :].argmax(-1)]


def test_class_frequencies_follow_the_scale():
    """Class frequencies under the data-space Bayes classifier: at scale 0 the mixture's class weights, at scale 1
    those of samples of the conditional (exact, Monte Carlo), growing with the scale between and beyond."""
    model = MixtureModel(MIX, "condot", "velocity")
    B = 2000
    target = torch.zeros(B, dtype=torch.long)  # every sample asks for class 0
    hits = {}
    for s in (0.0, 0.5, 1.0, 2.0):
        x = fastdiff.sample(_unconditional(model), 40, shape=(2,), y=target, method="heun", seed=11, backend="cpu",
                            classifier=MixtureClassifier(MIX), classifier_scale=s)
        hits[s] = (_bayes_classes(x) == 0).double().mean().item()
    se = math.sqrt(0.25 / B)
    assert abs(hits[0.0] - MIX.class_weights()[0].item()) < 4 * se + 0.01
    z, _ = MIX.conditional(0).sample(200_000, torch.Generator().manual_seed(0))
    theory = (_bayes_classes(z) == 0).double().mean().item()  # < 1: the class's tails cross into its neighbours
    assert abs(hits[1.0] - theory) < 4 * math.sqrt(theory * (1 - theory) / B) + 0.01
    assert hits[0.0] < hits[0.5] < hits[1.0] <= hits[2.0]


def _hand_euler(model, clf, y, cfg, scale_at, null):
    """Euler on the CondOT velocity: p = p_null + cfg (p_y - p_null) + lambda(t) s(t) grad log p(y | x), float64."""
    x = fastdiff.ops.randn(torch.arange(len(y)), 0, (2,)).double() * (1.0 - GRID[0])  # beta z at the grid start
    for t, t1 in zip(GRID, GRID[1:]):
        tt = torch.full((len(y),), t, dtype=torch.float32)
        xf = x.float()
        p = model(xf, tt, null).double() + cfg * (model(xf, tt, y).double() - model(xf, tt, null).double())
        lam = affine_coefficients("condot", t, "score", "velocity")[1]
        p = p + lam * scale_at(t) * clf.gradient(xf.double(), tt.double(), y)
        x = x + (t1 - t) * p
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_cfg_and_a_schedule_matches_a_hand_loop(backend):
    """Classifier guidance on top of CFG (a conditional model at cfg 2) with a scale schedule s(t): the fused step
    = a hand-written Euler loop of the guided prediction plus lambda(t) s(t) times the exact gradient."""
    name, device = backend
    model = MixtureModel(MIX, "condot", "velocity")
    y = torch.arange(8) % 4
    schedule = lambda t: 0.5 + t  # noqa: E731
    ours = fastdiff.sample(model, None, 2.0, timesteps=GRID, shape=(2,), y=y.to(device), null_y=-1, seed=0,
                           backend=name, device=device, classifier=MixtureClassifier(MIX), classifier_scale=schedule)
    theirs = _hand_euler(model, MixtureClassifier(MIX), y, 2.0, schedule, torch.full((8,), -1))
    torch.testing.assert_close(ours.cpu().double(), theirs, rtol=0, atol=5e-5 * theirs.abs().max().item())


def test_cost_is_one_classifier_call_per_evaluation_and_callbacks_see_the_guided_x0():
    model = MixtureModel(MIX, "condot", "x0")
    clf = MixtureClassifier(MIX)
    seen = []
    y = torch.arange(8) % 4
    fastdiff.sample(_unconditional(model), 10, shape=(2,), y=y, prediction="x0", method="heun", backend="cpu",
                    classifier=clf, callback=lambda i, t, x, x0: seen.append(x0.clone()))
    assert clf.calls == model.nfe == 2 * 10 - 1  # Heun: 2 evaluations per step, the last step one
    # the first step's x0 estimate: the unconditional x0 moved by b * lambda * grad (x0 prediction: b = 1)
    grid = [1e-3 + (1 - 1e-3) * i / 10 for i in range(11)]
    x = fastdiff.ops.randn(torch.arange(8), 0, (2,)) * (1 - grid[0])
    lam = affine_coefficients("condot", grid[0], "score", "x0")[1]
    expect = model(x, torch.full((8,), grid[0]), None).double() + lam * clf.gradient(x.double(), grid[0], y)
    torch.testing.assert_close(seen[0].double(), expect, rtol=0, atol=1e-5)


def test_errors_name_the_argument():
    model = _unconditional(MixtureModel(MIX))
    clf = MixtureClassifier(MIX)
    kw = dict(shape=(2,), backend="cpu")
    with pytest.raises(ValueError, match="target class"):
        fastdiff.sample(model, 4, batch_size=2, classifier=clf, **kw)
    with pytest.raises(ValueError, match="target class"):
        fastdiff.sample(model, 4, y=torch.zeros(2), classifier=clf, **kw)
    with pytest.raises(TypeError, match="classifier must be a callable"):
        fastdiff.sample(model, 4, y=torch.zeros(2, dtype=torch.long), classifier=3, **kw)
    with pytest.raises(ValueError, match="classifier_scale must be a finite number"):
        fastdiff.sample(model, 4, y=torch.zeros(2, dtype=torch.long), classifier=clf, classifier_scale=math.nan, **kw)
    with pytest.raises(ValueError, match=r"logits \[B, classes\]"):
        fastdiff.sample(model, 4, y=torch.zeros(2, dtype=torch.long), classifier=lambda x, t: x[:, 0], **kw)
    with pytest.raises(ValueError, match="classes in"):
        fastdiff.sample(model, 4, y=torch.tensor([0, 7]), classifier=clf, **kw)
    with pytest.raises(ValueError, match="singular at t=0"):
        fastdiff.sample(model, None, timesteps=[0.0, 0.5, 1.0], y=torch.zeros(2, dtype=torch.long), classifier=clf, **kw)
    with pytest.raises(ValueError, match="with conditions=: give classifier_y"):
        fastdiff.sample(model, 4, 2.0, conditions=[torch.zeros(2, dtype=torch.long)] * 2, null_y=0, classifier=clf, **kw)
