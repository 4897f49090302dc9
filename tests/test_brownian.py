"""sample(step_noise="brownian"): the truncated Lévy–Ciesielski path (its algebra in float64), the kernels'
sums against the reference (fastdiff.sampling.features.brownian.brownian_increment) on every backend, k-diffusion's
samplers fed the same path through noise_sampler, and the property it exists for: a seed's samples
converge as the number of steps grows (strong convergence of Euler–Maruyama), which independent draws
do not."""

import math

import pytest
import torch

import fastdiff
from fastdiff.sampling.features import brownian
from fastdiff.sampling.features.brownian import DEPTH, brownian_increment, increment, normalized
from conftest import BACKENDS


def _dot(u: dict, v: dict) -> float:
    return sum(c * v.get(n, 0.0) for n, c in u.items())


def test_increments_add_up_and_have_the_bridge_variances():
    a, b, c = 0.1, 0.3517, 0.8
    ab, bc, ac = increment(a, b), increment(b, c), increment(a, c)
    summed = {n: ab.get(n, 0.0) + bc.get(n, 0.0) for n in set(ab) | set(bc)}
    assert max(abs(summed.get(n, 0.0) - ac.get(n, 0.0)) for n in set(summed) | set(ac)) < 1e-15
    # on the dyadic grid the increments are exact Brownian ones: variance b - a, disjoint ones uncorrelated
    for lo, hi in [(0.0, 1.0), (0.25, 0.75), (3 / 64, 5 / 64), (0.5, 0.5 + 2.0 ** -DEPTH)]:
        assert _dot(increment(lo, hi), increment(lo, hi)) == pytest.approx(hi - lo, rel=1e-12)
    assert _dot(increment(0.25, 0.5), increment(0.5, 0.625)) == pytest.approx(0.0, abs=1e-15)
    # off the grid: the normalized draw is a standard normal; neighbours are nearly uncorrelated
    assert _dot(normalized(0.1, 0.12), normalized(0.1, 0.12)) == pytest.approx(1.0, rel=1e-12)
    assert abs(_dot(normalized(0.1, 0.12), normalized(0.12, 0.14))) < 2.0 ** -DEPTH / 0.02
    assert len(increment(0.1, 0.12)) <= 2 * DEPTH + 1 and len(increment(0.0, 1.0)) == 1


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"flow times in \[0, 1\]"):
        increment(-0.1, 0.5)
    with pytest.raises(ValueError, match="a < b"):
        normalized(0.5, 0.5)
    with pytest.raises(ValueError, match="step_noise must be None, 'brownian'"):
        fastdiff.sample(lambda x, t, y: x, 2, shape=(2,), batch_size=2, step_noise="tree")


def test_reference_draws_are_standard_normal_and_independent():
    seeds = torch.arange(20000)
    z1 = brownian_increment(seeds, (2,), 0.1, 0.12).double().flatten()
    z2 = brownian_increment(seeds, (2,), 0.12, 0.3).double().flatten()
    n = z1.numel()
    assert abs(z1.mean().item()) < 5 / math.sqrt(n) and abs(z1.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z1 * z2).mean().item()) < 5 / math.sqrt(n)
    # the increment over the union is the sum of the parts (each normalized by its own exact deviation,
    # sqrt(b - a) up to the leaf interpolation: 0.02 off by 5e-4 relative here)
    sd = [math.sqrt(_dot(increment(a, b), increment(a, b))) for a, b in [(0.1, 0.12), (0.12, 0.3), (0.1, 0.3)]]
    assert sd[0] == pytest.approx(math.sqrt(0.02), rel=1e-3)
    z12 = brownian_increment(seeds, (2,), 0.1, 0.3).double().flatten()
    torch.testing.assert_close(z12, (sd[0] * z1 + sd[1] * z2) / sd[2], rtol=0, atol=1e-5)
    # a sample's path does not depend on its batch
    torch.testing.assert_close(brownian_increment(seeds[7:9], (2,), 0.1, 0.12), z1.view(-1, 2)[7:9].float())


def _step_noise_from_reference(method_stages, grid, seeds, shape):
    """step_noise(step, j) computing each noisy stage's Brownian noise with the reference op."""
    noisy = {}
    for st in method_stages:
        if st.streams():
            noisy.setdefault(st.step, []).append(st)

    def noise(step, j):
        st = noisy[step][j]
        out = torch.zeros((len(seeds), *shape), dtype=torch.float64)
        for node, c in brownian.stage_nodes(st, grid).items():
            out += c * fastdiff.ops.randn(seeds, brownian.STREAM_BASE + node, shape).double()
        return out.float()

    return noise


METHOD_CASES = [("euler", {"sigma": 0.7}), ("ddim", {"eta": 1.0}), ("euler_ancestral", {}), ("dpmpp_2m_sde", {}),
                ("dpmpp_3m_sde", {}), ("dpmpp_sde", {}), ("dpm_2_ancestral", {})]
# The sums run through one code path for every method: the Triton interpreter checks two
KERNEL_CASES = [pytest.param(b.values[0], m, o, id=f"{b.id}-{m}", marks=b.marks) for b in BACKENDS for m, o in METHOD_CASES
                if b.id in ("reference", "cpu", "cuda") or m in ("euler", "dpmpp_sde")]


@pytest.mark.parametrize("backend,method,options", KERNEL_CASES)
def test_kernel_sums_match_the_reference(backend, method, options):
    """The loop's Brownian noise (sums of in-kernel draws) equals the reference's, per stage."""
    from fastdiff.paths import get_path

    name, device = backend

    def model(x, t, y):  # an x0 prediction, smooth in x
        return 0.8 * torch.tanh(x + t.view(-1, 1, 1))

    # the interpreter pays per program (launches x samples: 89 s for dpmpp_sde at 8 times x 3 samples): 2 steps,
    # 2 samples (two programs a launch) there
    n = 3 if name == "triton" else 8
    grid = [0.05 + 0.9 * (i / (n - 1)) ** 1.5 for i in range(n)]
    seeds, shape = ([3, 11] if name == "triton" else [3, 11, 12]), (5, 3)
    record = fastdiff.sampling.get_method(method)
    values = record.option_values(**options)
    if "sigma" in options:
        values["sigma"] = lambda t: options["sigma"]  # the builders' form
    stages = record.stages(get_path("vp"), grid, "x0", **{k: v for k, v in values.items() if k in record.options})
    kw = dict(shape=shape, seed=seeds, batch_size=len(seeds), path="vp", prediction="x0", method=method, timesteps=grid, **options)
    ours = fastdiff.sample(model, None, step_noise="brownian", backend=name, device=device, **kw)
    ref = fastdiff.sample(model, None, step_noise=_step_noise_from_reference(stages, grid, seeds, shape),
                          backend="reference", **kw)
    torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


def test_churn_draws_come_from_the_path():
    """EDM churn's draws are the path's increments too (step 0's in the initial write): with churn at every
    step, Heun on the same seed differs from the independent draws and is batch-independent."""
    from fastdiff.mixtures import MixtureModel, ring_mixture

    model = MixtureModel(ring_mixture(), "vp", "x0")
    kw = dict(shape=(2,), path="vp", prediction="x0", method="heun", timesteps=[0.05, 0.3, 0.6, 0.9], s_churn=10.0)
    ours = fastdiff.sample(model, None, seed=[4, 5, 6], batch_size=3, step_noise="brownian", **kw)
    alone = fastdiff.sample(model, None, seed=[5], batch_size=1, step_noise="brownian", **kw)
    torch.testing.assert_close(alone[0], ours[1], rtol=0, atol=1e-6)
    assert not torch.allclose(ours, fastdiff.sample(model, None, seed=[4, 5, 6], batch_size=3, **kw))
    # no churn, no noise: brownian changes nothing
    kw["s_churn"] = 0.0
    assert torch.equal(fastdiff.sample(model, None, seed=[4, 5, 6], batch_size=3, step_noise="brownian", **kw),
                       fastdiff.sample(model, None, seed=[4, 5, 6], batch_size=3, **kw))


@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_sde", "euler_ancestral"])
def test_matches_k_diffusion_fed_the_same_path(method):
    """k-diffusion's sampler with noise_sampler(sigma, sigma') = fastdiff's normalized path increment between
    the flow times of sigma and sigma': the same samples (fp32: 2e-5 of max |x|)."""
    from fastdiff.adapters import k_diffusion as fk
    from fastdiff.adapters.k_diffusion import DenoiserModel
    from test_adapter_k_diffusion import Denoiser, _kd

    kd = _kd()
    den = Denoiser()
    sigmas = kd.get_sigmas_karras(10, 0.02, 30.0)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    seeds = [5, 6, 7]
    model = DenoiserModel(den, sigmas)
    ours = fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method=method,
                           timesteps=model.timesteps, seed=seeds, step_noise="brownian")

    def noise(s, s_next):
        a, b = model.path.time(float(s)), model.path.time(float(s_next))
        return brownian_increment(seeds, x.shape[1:], a, b)

    theirs = getattr(kd, f"sample_{method}")(den, x, sigmas, disable=True, noise_sampler=noise)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
    # the adapter's noise_sampler="brownian" is the same in-kernel path
    adapter = getattr(fk, f"sample_{method}")(den, x, sigmas, disable=True, seed=seeds, noise_sampler="brownian")
    torch.testing.assert_close(adapter, ours, rtol=0, atol=1e-6 * theirs.abs().max().item())


def test_samples_converge_as_steps_grow():
    """Euler–Maruyama on the mixture's SDE (exact model, sigma = 1): with the Brownian path the samples of a
    seed approach the finest grid's as steps double (strong order 1/2); with independent draws they stay
    as far apart as two different samples."""
    from fastdiff.mixtures import MixtureModel, ring_mixture

    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), seed=0, batch_size=512, method="euler", sigma=1.0, path="condot",
              prediction="velocity", timesteps=None)

    def grid(n):  # t in [0, 0.98]: the SDE's drift grows like 1 / (1 - t) near the data end
        return [0.98 * i / n for i in range(n + 1)]

    def run(n, step_noise):
        return fastdiff.sample(model, None, **dict(kw, timesteps=grid(n)), step_noise=step_noise).double()

    fine = run(1024, "brownian")
    errors = [(run(n, "brownian") - fine).norm(dim=1).mean().item() for n in (16, 64, 256)]
    independent = (run(256, None) - run(1024, None)).norm(dim=1).mean().item()
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25 * independent, (errors, independent)


@pytest.mark.parametrize("method,path,prediction", [("dpmpp_2m_sde", "vp", "x0"), ("euler_ancestral", "condot", "velocity"),
                                                    ("dpmpp_sde", "vp", "x0")])
def test_samples_the_mixture(method, path, prediction):
    """With the Brownian path's noise the samplers still sample the analytic mixture: mode weights, means and
    covariances within statistical error (z-scores)."""
    from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    x = fastdiff.sample(model, None, method=method, shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=_quadratic_grid(60), step_noise="brownian")
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0
