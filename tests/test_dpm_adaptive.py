"""method "dpm_adaptive" (fastdiff/sampling/adaptive.py): DPM-Solver-12 / 23 with a PID step-size controller per
sample. One sample is k-diffusion's sample_dpm_adaptive (same evaluations, accepts and rejects); a sample's result is
the same alone and in any batch; finished samples leave the batch; the samples of a mixture; option errors."""

import math

import pytest
import torch

import fastdiff
from fastdiff.mixtures import GaussianMixture, MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import VE
from conftest import BACKENDS
from test_adapter_k_diffusion import Denoiser, _kd
from test_sample import _zmax


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("options", [{}, dict(rtol=0.01, atol=0.001, pcoeff=0.1, dcoeff=0.05)])
def test_one_sample_is_k_diffusion(order, options):
    """The batch-wide controller of k-diffusion and the per-sample one coincide for one sample."""
    kd = _kd()
    den = Denoiser()
    smax, smin = 20.0, 0.05
    path = VE(smax)
    from fastdiff.adapters.k_diffusion import DenoiserModel

    model = DenoiserModel(den, [smax, 0.0])
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * smax
    ours, info = fastdiff.sample(model, None, noise=x, path=path, prediction="x0", method="dpm_adaptive",
                                 timesteps=[0.0, path.time(smin)], order=order, return_info=True, **options)
    theirs, kinfo = kd.sample_dpm_adaptive(den, x, smin, smax, order=order, disable=True, return_info=True, **options)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    assert (int(info.nfe[0]), int(info.n_accept[0]), int(info.n_reject[0])) == \
        (kinfo["nfe"], kinfo["n_accept"], kinfo["n_reject"])


def _two_class_model(path):
    """Class 0: one broad Gaussian (a nearly linear flow); class 1: eight sharp modes on a ring."""
    angles = torch.arange(8) * 2 * math.pi / 8
    means = torch.cat([torch.zeros(1, 2), torch.stack([4 * angles.cos(), 4 * angles.sin()], 1)])
    mixture = GaussianMixture(means, stds=torch.tensor([2.0] + [0.05] * 8), labels=torch.tensor([0] + [1] * 8))
    return MixtureModel(mixture, path, "x0")


@pytest.mark.parametrize("eta, h_max", [(0.0, math.inf), (1.0, math.inf), (0.0, 1.0)])
def test_a_sample_is_the_same_alone_and_in_any_batch(eta, h_max):
    path = VE(80.0)
    model = _two_class_model(path)
    y = torch.tensor([0, 1, 1, 0, 1, 1])
    kw = dict(path=path, prediction="x0", method="dpm_adaptive", timesteps=[0.0, path.time(0.002)], eta=eta,
              shape=(2,), return_info=True, h_max=h_max)
    batch, info = fastdiff.sample(model, None, y=y, seed=[7, 8, 9, 10, 11, 12], **kw)
    for b in (1, 3, 5):
        alone, one = fastdiff.sample(model, None, y=y[b:b + 1], seed=[7 + b], **kw)
        torch.testing.assert_close(alone[0], batch[b], rtol=1e-6, atol=1e-6)
        assert int(one.nfe[0]) == int(info.nfe[b])
    pair, _ = fastdiff.sample(model, None, y=y[[5, 1]], seed=[12, 8], **kw)
    torch.testing.assert_close(pair, batch[[5, 1]], rtol=1e-6, atol=1e-6)
    # samples differ in their evaluations; the model saw finished samples only until the next check
    assert int(info.nfe.min()) < int(info.nfe.max())
    assert info.model_rows <= int(info.nfe.max()) * len(y)


def test_h_max_caps_the_steps_of_a_narrow_class():
    """Analytic oracle: one Gaussian N(mu, s^2 I) on VE has the flow x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) /
    sqrt(s^2 + sigma_max^2). Alone, k-diffusion's controller (h_max = inf) sees its embedded pair agree until sigma
    nears s, grows h to ~4 and crosses the transition in one accepted step: 0.1 from the flow, twice the class's
    width. Every step at most h_max in log sigma: >= ceil(log(sigma_max / sigma_min) / h_max) accepted steps, and the
    flow to ~1e-4."""
    smax, smin, s = 80.0, 0.002, 0.05
    path = VE(smax)
    mu = torch.tensor([[1.0, -0.5, 0.25, 2.0]])
    model = MixtureModel(GaussianMixture(mu, stds=torch.tensor([s])), path, "x0")
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * smax
    exact = mu + (x.double() - mu) * math.sqrt(s ** 2 + smin ** 2) / math.sqrt(s ** 2 + smax ** 2)
    kw = dict(noise=x, path=path, prediction="x0", method="dpm_adaptive", timesteps=[0.0, path.time(smin)],
              return_info=True)
    runs = {h_max: fastdiff.sample(model, None, h_max=h_max, **kw) for h_max in (math.inf, 1.0, 0.5)}
    err = {h_max: float(((out.double() - exact).norm(dim=1) / 2).max()) for h_max, (out, _) in runs.items()}
    assert err[math.inf] > 0.05 and err[1.0] < 1e-3 and err[0.5] < err[1.0] / 3
    for h_max in (1.0, 0.5):
        assert int(runs[h_max][1].n_accept.min()) >= math.ceil(math.log(smax / smin) / h_max)
    default, _ = fastdiff.sample(model, None, **kw)
    assert torch.equal(default, runs[math.inf][0])  # inf: k-diffusion's controller, bit for bit


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samples_the_mixture(eta):
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, "vp", "eps")
    x = fastdiff.sample(model, None, method="dpm_adaptive", shape=(2,), seed=3, path="vp", prediction="eps",
                        batch_size=1000, timesteps=[1e-3, 1 - 1e-4], eta=eta)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_the_reference(backend):
    """The embedded pair, the accept pass and the ancestral noise are fused steps with per-sample rows on the call's
    backend (CFG's blend of the two branches inside them)."""
    name, device = backend
    model = MixtureModel(ring_mixture(labels=list(range(8))), "vp", "eps")
    kw = dict(shape=(2,), seed=[4, 5, 6, 7], y=torch.tensor([0, 3, 5, 7], device=device), null_y=-1,
              path="vp", prediction="eps", method="dpm_adaptive", eta=1.0, device=device, return_info=True,
              rtol=0.2, atol=0.03)  # fewer iterations: the Triton interpreter pays per launch (22 s at the defaults)
    ref, ref_info = fastdiff.sample(model, None, 2.0, backend="reference", **kw)
    ours, info = fastdiff.sample(model, None, 2.0, backend=name, **kw)
    torch.testing.assert_close(ours.cpu(), ref.cpu(), rtol=1e-4, atol=1e-4)
    assert torch.equal(info.nfe.cpu(), ref_info.nfe.cpu())


def test_a_sampler_hands_each_call_over():
    """fastdiff.Sampler with dpm_adaptive: no plan to keep; each call is sample()'s with the refilled seeds / labels."""
    model = MixtureModel(ring_mixture(labels=list(range(8))), "vp", "eps")
    kw = dict(shape=(2,), path="vp", prediction="eps", method="dpm_adaptive", null_y=-1)
    sampler = fastdiff.Sampler(model, None, 2.0, y=torch.tensor([1, 2]), seed=3, **kw)
    assert torch.equal(sampler(), fastdiff.sample(model, None, 2.0, y=torch.tensor([1, 2]), seed=3, **kw))
    assert torch.equal(sampler(seed=[9], y=torch.tensor([5])),
                       fastdiff.sample(model, None, 2.0, y=torch.tensor([5]), seed=[9], **kw))


def test_errors():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps", method="dpm_adaptive")
    with pytest.raises(ValueError, match="order must be 2 or 3 for method='dpm_adaptive', got 4"):
        fastdiff.sample(model, 8, order=4, **kw)
    with pytest.raises(ValueError, match="rtol must be a finite number > 0 for method='dpm_adaptive'"):
        fastdiff.sample(model, 8, rtol=0.0, **kw)
    for bad in (0.0, -1.0, math.nan, "1"):
        with pytest.raises(ValueError, match="h_max must be a number > 0 .inf: no cap. for method='dpm_adaptive'"):
            fastdiff.sample(model, 8, h_max=bad, **kw)
    with pytest.raises(ValueError, match="h_max=0.01 needs at least .* steps .* more than max_iterations=100"):
        fastdiff.sample(model, 8, h_max=0.01, max_iterations=100, **kw)
    for name in ("check_every", "max_iterations"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got 0"):
            fastdiff.sample(model, 8, **{name: 0}, **kw)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        fastdiff.sample(model, None, timesteps=[0.5, 0.4], **kw)
    with pytest.raises(TypeError, match="method='dpm_adaptive' takes"):
        fastdiff.sample(model, 8, r=0.5, **kw)
    with pytest.raises(ValueError, match="guidance_rescale does not apply to method='dpm_adaptive'"):
        fastdiff.sample(model, 8, guidance_rescale=0.5, **kw)

