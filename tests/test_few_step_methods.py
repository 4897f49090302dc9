"""The few-step samplers lcm, tcd and cm_multistep (fastdiff.sampling.methods.few_step): analytic oracles on the exact
models of a Gaussian and of a Gaussian mixture, ComfyUI's sample_lcm (an independent float64 loop of its formulas:
ComfyUI does not install) on the same denoiser and noise, the identities with DDIM, every backend, option errors.
The diffusers peers (LCMScheduler, TCDScheduler, CMStochasticIterativeScheduler, FlowMatchLCMScheduler) are
compared in tests/test_adapter_diffusers_few_step.py."""

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import VE, DiscreteVP, get_path
from fastdiff.sampling.core.stage import draw_stream
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.few_step import FlowMapModel
from conftest import BACKENDS
from test_sample import N, _single_gaussian, _zmax


class ConsistencyFunction(torch.nn.Module):
    """The exact consistency function of a single Gaussian, x -> the probability-flow ODE's end point at the data
    (t = 1), as an x0 model: a consistency sampler with it samples the data exactly at any step count."""

    def __init__(self, g, path):
        super().__init__()
        self.g, self.path = g, get_path(path)

    def forward(self, x, t, y=None):
        return self.g.flow_map(x.double(), t.double(), 1.0, self.path).to(x.dtype)


@pytest.mark.parametrize("method,options,path", [
    ("lcm", {}, "condot"), ("lcm", {}, "vp"), ("lcm", dict(s_noise_end=1.0), "vp-cosine"),
    ("cm_multistep", dict(sigma_min=0.0), "vp"), ("cm_multistep", dict(sigma_min=0.0), "condot"),
    ("tcd", dict(eta=1.0), "condot"),  # eta = 1: DDIM to the data, then the forward process
])
@pytest.mark.parametrize("steps", [1, 3])
def test_exact_consistency_function_samples_the_data_at_any_step_count(method, options, path, steps):
    """x' = alpha' f(x) + beta' xi with f the exact consistency function: if x ~ p_t then f(x) ~ p_data and x' ~
    p_t' exactly, so the samples are the Gaussian's, 1 step or 3 (mean and covariance z-scores < 5, N = 20000)."""
    g = _single_gaussian()
    grid = [0.02, 0.4, 0.8, 1.0] if steps == 3 else [0.02, 1.0]
    x = fastdiff.sample(ConsistencyFunction(g, path), None, noise=_marginal(g, path, grid[0]), seed=1, path=path,
                        prediction="x0", method=method, timesteps=grid, **options)
    assert _zmax(_moments(x, g)) < 5.0


def _marginal(g, path, t):
    """N samples of x_t = alpha_t z + beta_t eps (the sampler's own start, pure noise, is p_t only at alpha = 0)."""
    al, be = get_path(path).coefficients(t)[:2]
    gen = torch.Generator().manual_seed(0)
    z = g.sample(N, generator=gen)[0].double()
    return (al * z + be * torch.randn(N, 2, generator=gen, dtype=torch.float64)).float()


def _moments(x, g):
    z = mode_zscores(x.double(), g)
    return type(z)(counts=z.counts, weights=torch.zeros_like(z.weights), means=z.means, covs=z.covs)  # K = 1: no
    # weight to test (its z-score is 0 / 0)


def test_the_oracle_catches_a_wrong_renoising_level():
    """The same check fails where the re-noising is wrong for the model: cm_multistep's sigma_min = 0.5 treats the
    exact f(x) as a sample at noise level 0.5 and re-noises too little, shrinking the covariance."""
    g = _single_gaussian()
    grid = [0.02, 0.3, 0.5, 0.7, 1.0]
    x = fastdiff.sample(ConsistencyFunction(g, "vp"), None, noise=_marginal(g, "vp", grid[0]), seed=1, path="vp",
                        prediction="x0", method="cm_multistep", timesteps=grid, sigma_min=0.5)
    assert _zmax(_moments(x, g)) > 10.0


@pytest.mark.parametrize("path", ["condot", "vp"])
def test_one_step_returns_the_posterior_mean(path):
    """With the exact denoiser of the ring mixture (x0 = E[z | x_t]) one step of lcm or cm_multistep to the data
    returns E[z | x_t0] of the initial state. (Several steps do not sample the mixture: a denoiser's posterior
    mean is not a consistency function, and the chain shrinks toward the ring's centre.)"""
    mixture = ring_mixture()
    model = MixtureModel(mixture, path, "x0")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    want = mixture.x0(noise.double(), 0.1, path)
    for method in ("lcm", "cm_multistep"):
        got = fastdiff.sample(model, None, noise=noise, path=path, prediction="x0", method=method,
                              timesteps=[0.1, 1.0], seed=2)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def _comfy_lcm(mixture, path, noise, grid, seeds, s_noise=1.0, s_noise_end=None):
    """ComfyUI's sample_lcm (comfy/k_diffusion/sampling.py) in float64, its sigma the VE path's beta (EPS
    noise_scaling: x = D + sigma' noise) or CondOT's noise fraction (CONST: x = sigma' noise + (1 - sigma') D), the
    noise its per-step multiplier s_noise -> s_noise_end of fastdiff's stream of the step."""
    n = len(grid) - 1
    end = s_noise if s_noise_end is None else s_noise_end
    x = noise.double()
    for i in range(n):
        denoised = mixture.x0(x, grid[i], path)
        sigma_next = path.coefficients(grid[i + 1])[1]
        x = denoised
        if sigma_next > 0:
            s_i = s_noise + (end - s_noise) * (i / (n - 1) if n > 1 else 0.0)
            xi = fastdiff.ops.randn(seeds, draw_stream(i), noise.shape[1:]).double() * s_i
            x = x + sigma_next * xi if isinstance(path, VE) else sigma_next * xi + (1 - sigma_next) * denoised
    return x


@pytest.mark.parametrize("path", [VE(20.0), get_path("condot")], ids=["ve", "condot"])
@pytest.mark.parametrize("options", [{}, dict(s_noise=0.7), dict(s_noise=1.2, s_noise_end=0.0)])
def test_lcm_matches_comfyui(path, options):
    mixture = ring_mixture()
    model = MixtureModel(mixture, path, "x0")
    seeds = [5, 6, 7]
    grid = [0.05, 0.3, 0.6, 0.85, 1.0]
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(1)) * path.coefficients(grid[0])[1]
    got = fastdiff.sample(model, None, noise=noise, path=path, prediction="x0", method="lcm", timesteps=grid,
                          seed=seeds, **options)
    want = _comfy_lcm(mixture, path, noise, grid, seeds, **options)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("path", ["condot", "vp"])
def test_tcd_at_eta_0_is_ddim_and_at_eta_1_is_lcm(path):
    model = MixtureModel(ring_mixture(), path, "eps" if path == "vp" else "velocity")
    kw = dict(shape=(2,), seed=4, batch_size=64, path=path, prediction=model.prediction,
              timesteps=[0.05, 0.3, 0.6, 0.9, 1.0])
    torch.testing.assert_close(fastdiff.sample(model, None, method="tcd", eta=0.0, **kw),
                               fastdiff.sample(model, None, method="ddim", **kw), rtol=0, atol=1e-5)
    torch.testing.assert_close(fastdiff.sample(model, None, method="tcd", eta=1.0, **kw),
                               fastdiff.sample(model, None, method="lcm", **kw), rtol=0, atol=1e-5)


def test_tcd_intermediate_level_on_a_discrete_schedule_is_diffusers_floor_rule():
    """On a DiscreteVP path the intermediate timestep is floor((1 - eta) tau') of the next training timestep: the
    stage of an eps model is x' = r (x - beta_t eps) alpha_s / alpha_t + r beta_s eps + sqrt(1 - r^2) xi with
    r = sqrt(abar' / abar_s), as TCDScheduler.step computes it."""
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    path = DiscreteVP(ac)
    taus = (999, 759, 499, 0)
    stages = get_method("tcd").stages(path, [path.time(tau) for tau in taus], "eps", eta=0.3)
    for st, tau, tau1 in zip(stages, taus, taus[1:]):
        tau_s = int((1 - 0.3) * tau1)  # 531, 349, 0
        a, a_s, a1 = (float(ac[k]) for k in (tau, tau_s, tau1))
        r = (a1 / a_s) ** 0.5
        assert st.c_noise == pytest.approx((1 - r * r) ** 0.5, rel=1e-12, abs=1e-15)
        assert st.c_pred == pytest.approx(r * ((1 - a_s) ** 0.5 - (a_s / a) ** 0.5 * (1 - a) ** 0.5), rel=1e-12)
        assert st.c_x == pytest.approx((a1 / a) ** 0.5, rel=1e-12)


@pytest.mark.parametrize("method,options", [("lcm", dict(s_noise_end=0.3)), ("tcd", {}),
                                            ("cm_multistep", dict(sigma_min=0.01))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_the_reference(backend, method, options):
    name, device = backend
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), seed=[4, 5, 6], batch_size=3, path="vp", prediction="eps", method=method,
              timesteps=[0.01 + 0.99 * i / 5 for i in range(6)], device=device, **options)
    ref = fastdiff.sample(model, None, backend="reference", **kw)
    ours = fastdiff.sample(model, None, backend=name, **kw)
    torch.testing.assert_close(ours.cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


def test_option_errors():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps")
    cases = [
        ("lcm", dict(s_noise=-1.0), "s_noise must be a finite number >= 0"),
        ("lcm", dict(s_noise_end=float("nan")), "s_noise_end must be a finite number >= 0 for method='lcm'"),
        ("lcm", dict(timestep_scaling=10.0), "timestep_scaling applies LCM's boundary condition .*DiscreteVP"),
        ("lcm", dict(timestep_scaling=-1.0), "timestep_scaling must be a finite number >= 0 for method='lcm'"),
        ("tcd", dict(eta=1.5), r"eta must be in \[0, 1\], got 1.5"),  # sample()'s own check
        ("cm_multistep", dict(sigma_min=-0.1), "sigma_min must be a finite number >= 0 for method='cm_multistep'"),
        ("cm_multistep", dict(sigma_data=0.0), "sigma_data must be a finite number > 0 for method='cm_multistep'"),
        ("cm_multistep", dict(sigma_data=0.5), "pass prediction='x0' .*not 'eps'"),
    ]
    for method, options, match in cases:
        with pytest.raises(ValueError, match=match):
            fastdiff.sample(model, 4, method=method, **kw, **options)
    with pytest.raises(ValueError, match="timestep_scaling applies to method='lcm'; method='tcd' does not take it"):
        fastdiff.sample(model, 4, method="tcd", timestep_scaling=10.0, **kw)
    with pytest.raises(ValueError, match="FlowMapModel needs the sampler's increasing grid"):
        FlowMapModel(lambda x, t, r, y: x, [0.0, 0.5, 0.5, 1.0])
