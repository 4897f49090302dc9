"""fastdiff.adapters.k_diffusion against k-diffusion's own samplers, and the VE path / schedules they
rest on. k-diffusion comes from fastdiff.bench.peers (its samplers without its package import)."""


import pytest
import torch

import fastdiff
from fastdiff import schedules
from fastdiff.adapters import k_diffusion as fk
from fastdiff.paths import VE, affine_coefficients


def _kd():
    from fastdiff.bench.peers import k_diffusion_sampling

    try:
        return k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion not installed: {exc}")


def _kd_case(grid: str, steps: int = 10):
    """(k-diffusion's sampling module, a Denoiser, a Karras or VP sigma grid of ``steps`` steps ending at 0,
    a batch of 3 initial states at sigmas[0]): the setting of the parity tests."""
    kd = _kd()
    sigmas = kd.get_sigmas_karras(steps, 0.02, 30.0) if grid == "karras" else kd.get_sigmas_vp(steps)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    return kd, Denoiser(), sigmas, x


class Denoiser(torch.nn.Module):
    """A small random conv denoiser D(x, sigma, cond=...) in EDM's preconditioned form."""

    def __init__(self, channels=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(channels + 1, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.calls = []

    def forward(self, x, sigma, cond=None):
        self.calls.append(sigma.detach().clone())
        s = sigma.view(-1, 1, 1, 1)
        c_skip, c_out, c_in = 1 / (s**2 + 1), s / (s**2 + 1).sqrt(), 1 / (s**2 + 1).sqrt()
        h = torch.cat([x * c_in, (s.log() / 4).expand(-1, 1, *x.shape[2:])], 1)
        out = self.conv(h).tanh()
        if cond is not None:
            out = out + cond.view(-1, 1, 1, 1)
        return c_skip * x + c_out * out


def test_ve_path_coefficients_and_time():
    p = VE(80.0)
    assert p.coefficients(0.25) == (1.0, 60.0, 0.0, -80.0)
    assert p.time(60.0) == 0.25 and p.sigma(1.0) == 0.0
    assert fastdiff.paths.get_path("ve").sigma_max == 80.0
    # x0 -> velocity on VE: u = -sigma_max (x - x0) / sigma
    a, b = affine_coefficients(p, 0.5, "x0", "velocity")
    assert (a, b) == pytest.approx((-2.0, 2.0))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(p.beta(t), torch.tensor([80.0, 40.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_max"):
        VE(0.0)
    with pytest.raises(ValueError, match="sigma must lie"):
        p.time(81.0)


def test_karras_sigmas_match_k_diffusion():
    kd = _kd()
    ours = torch.tensor(schedules.karras_sigmas(12, 0.03, 14.6, rho=7.0), dtype=torch.float64)
    theirs = kd.get_sigmas_karras(12, 0.03, 14.6, rho=7.0).double()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(schedules.exponential_sigmas(9, 0.1, 10.0), dtype=torch.float64),
                               kd.get_sigmas_exponential(9, 0.1, 10.0).double(), rtol=1e-6, atol=0)


def test_schedules_grids_and_errors():
    sig = schedules.karras_sigmas(5, 0.002, 80.0)
    path, grid = schedules.ve_grid(sig)
    assert path.sigma_max == 80.0 and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(b > a for a, b in zip(grid, grid[1:]))
    assert [path.sigma(t) for t in grid] == pytest.approx(sig, rel=1e-10, abs=1e-15)
    g = schedules.shifted_timesteps(4, shift=3.0)
    assert g[0] == 0.0 and g[-1] == 1.0 and all(b > a for a, b in zip(g, g[1:]))
    assert g[2] == pytest.approx(1 - 3 * 0.5 / (1 + 2 * 0.5))  # SD3: sigma' = shift s / (1 + (shift - 1) s)
    assert schedules.shifted_timesteps(4, shift=1.0) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedules.ve_timesteps([1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="sigma_min"):
        schedules.karras_sigmas(5, 1.0, 0.5)
    with pytest.raises(ValueError, match="shift"):
        schedules.shifted_timesteps(5, shift=0.0)


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_samplers_match_k_diffusion(method):
    kd = _kd()
    den = Denoiser()
    sigmas = kd.get_sigmas_karras(15, 0.002, 80.0, rho=7.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    extra = {"cond": torch.tensor([0.3, -0.2])}
    seen = {"kd": [], "fd": []}
    theirs = getattr(kd, f"sample_{method}")(den, x, sigmas, extra_args=extra, disable=True,
                                              callback=lambda d: seen["kd"].append(d["denoised"].clone()))
    kd_sigmas = torch.cat(den.calls)
    den.calls.clear()
    ours = getattr(fk, f"sample_{method}")(den, x, sigmas, extra_args=extra, disable=True,
                                          callback=lambda d: seen["fd"].append(d["denoised"].clone()))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the denoiser saw the same noise levels, float32 for float32
    assert torch.equal(torch.cat(den.calls), kd_sigmas)
    assert len(seen["fd"]) == len(seen["kd"]) == 15
    for a, b in zip(seen["fd"], seen["kd"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_denoiser_model_runs_in_fastdiff_sample():
    """The wrapped denoiser is an ordinary fastdiff model: fastdiff.sample on the VE grid gives the
    adapter's result (and so k-diffusion's)."""
    den = Denoiser()
    sigmas = schedules.karras_sigmas(10, 0.002, 80.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 80.0
    model = fk.DenoiserModel(den, sigmas)
    with torch.no_grad():
        direct = fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method="dpmpp_2m",
                                 timesteps=model.timesteps)
    torch.testing.assert_close(direct, fk.sample_dpmpp_2m(den, x, sigmas, disable=True), rtol=0, atol=0)
    # off-grid times fall back to sigma_max (1 - t)
    s = model.sigma(torch.tensor([0.5, model.timesteps[3]], dtype=torch.float32))
    assert s[0].item() == pytest.approx(40.0) and s[1].item() == pytest.approx(sigmas[3], rel=1e-6)


def test_euler_ancestral_is_k_diffusion_step_with_fastdiff_noise():
    """sample_euler_ancestral steps to sigma_down and adds sigma_up noise from fastdiff's stream: with
    k-diffusion fed that same noise through its noise_sampler, the trajectories agree; and image b of
    a batch is image b alone with the same seed."""
    kd = _kd()
    den = Denoiser()
    sigmas = kd.get_sigmas_karras(8, 0.01, 20.0)
    B = 3
    x = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    seeds = [11, 12, 13]
    ours = fk.sample_euler_ancestral(den, x, sigmas, disable=True, seed=seeds)
    step = iter(range(len(sigmas)))
    noise = lambda s, s_next: fastdiff.ops.randn(seeds, 1 + next(step), x.shape[1:])  # noqa: E731
    theirs = kd.sample_euler_ancestral(den, x, sigmas, disable=True, noise_sampler=noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    alone = fk.sample_euler_ancestral(den, x[1:2], sigmas, disable=True, seed=[12])
    # same noise; the conv's float32 sums depend on the batch size (oneDNN), hence not bit for bit
    torch.testing.assert_close(alone, ours[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("sample_euler_ancestral", dict(eta=0.8, s_noise=1.1)),
                                     ("sample_dpmpp_2m_sde", dict(eta=1.0, s_noise=0.9, solver_type="heun")),
                                     ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_3m_sde", dict(eta=0.8))])
def test_stochastic_samplers_take_k_diffusion_keywords(name, kw):
    """The adapter's stochastic samplers take k-diffusion's keywords (eta, s_noise, solver_type) and match
    k-diffusion fed fastdiff's noise (one draw of step i's stream per step with sigma' > 0)."""
    kd = _kd()
    den = Denoiser()
    sigmas = kd.get_sigmas_karras(8, 0.01, 20.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    seeds = [21, 22]
    ours = getattr(fk, name)(den, x, sigmas, disable=True, seed=seeds, **kw)
    step = iter(range(len(sigmas)))
    noise = lambda s, s_next: fastdiff.ops.randn(seeds, 1 + next(step), x.shape[1:])  # noqa: E731
    theirs = getattr(kd, name)(den, x, sigmas, disable=True, noise_sampler=noise, **kw)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("call,exc,match", [
    (lambda d, x: fk.sample_dpmpp_2m_sde(d, x, torch.tensor([5.0, 1.0, 0.0]), noise_sampler=lambda a, b: a),
     ValueError, r"noise_sampler returned \(\) at step 0; it must return noise of x's shape"),
    (lambda d, x: fk.sample_dpmpp_2m_sde(d, x, torch.tensor([5.0, 0.0]), solver_type="x"), ValueError, "solver_type"),
    (lambda d, x: fk.sample_euler_ancestral(d, x, torch.tensor([5.0, 0.0]), s_noise=-1.0), ValueError, "s_noise"),
    (lambda d, x: fk.sample_euler(d, x, torch.tensor([5.0, 6.0, 0.0])), ValueError, "sigmas: .*decreasing"),
    (lambda d, x: fk.sample_euler(d, x, torch.tensor([5.0, 1.0])), ValueError, "end at 0"),
    (lambda d, x: fk.sample_euler(d, x, torch.zeros(2, 2)), ValueError, "1-D"),
    (lambda d, x: fk.sample_heun(d, x, torch.tensor([5.0, 0.0]), s_churn=-1.0), ValueError, "s_churn must be a finite"),
    (lambda d, x: fk.sample_dpmpp_sde(d, x, torch.tensor([5.0, 1.0, 0.0]), noise_sampler=lambda a, b: None),
     ValueError, "noise_sampler returned NoneType at step 0"),
    (lambda d, x: fk.sample_euler_ancestral(d, x, torch.tensor([5.0, 1.0, 0.0]), noise_sampler=3),
     TypeError, "noise_sampler must be .brownian. or callable"),
    (lambda d, x: fk.sample_euler(d, x.long(), torch.tensor([5.0, 0.0])), TypeError, "floating-point"),
    (lambda d, x: fk.sample_euler(d, x, torch.tensor([5.0, 0.0]), extra_args=[1]), TypeError, "extra_args"),
])
def test_errors_name_the_problem(call, exc, match):
    with pytest.raises(exc, match=match):
        call(Denoiser(), torch.randn(1, 3, 4, 4))


def test_every_fixed_grid_sampler_of_k_diffusion_has_a_counterpart_with_its_keywords():
    """Each k_diffusion.sampling.sample_* that takes a sigma grid has a function of the same name here that
    takes all of its parameters, with the same defaults (fastdiff adds ``seed``)."""
    import inspect

    kd = _kd()
    theirs = {n: f for n, f in vars(kd).items() if n.startswith("sample_") and callable(f)
              and "sigmas" in inspect.signature(f).parameters}
    assert {"sample_euler", "sample_dpmpp_sde", "sample_dpm_2_ancestral"} <= set(theirs)
    for name, f in theirs.items():
        assert hasattr(fk, name) and name in fk.__all__, name
        ours = inspect.signature(getattr(fk, name)).parameters
        for p in inspect.signature(f).parameters.values():
            assert p.name in ours, f"{name}: {p.name}"
            assert ours[p.name].default == p.default, f"{name}: {p.name} = {ours[p.name].default} vs {p.default}"


def test_a_schedule_is_planned_once_and_holds_no_denoiser():
    """A call's plan (noise levels, stage table, fastdiff.Sampler) is kept for the next call with the same schedule,
    method, options and x layout: the same samples bit for bit with this call's extra_args, callback and seed; the
    denoiser is held weakly (its plan goes with it)."""
    import gc
    import weakref

    from fastdiff.adapters import k_diffusion_plans as plans

    plans.clear_plans()
    den = Denoiser()
    sigmas = schedules.karras_sigmas(6, 0.02, 30.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    seen = []
    first = fk.sample_euler_ancestral(den, x, sigmas, extra_args={"cond": torch.tensor([0.1, 0.2])}, disable=True,
                                      seed=3, callback=lambda d: seen.append(d["i"]))
    assert len(plans._plans) == 1 and seen == list(range(6))
    again = fk.sample_euler_ancestral(den, x, sigmas, extra_args={"cond": torch.tensor([0.1, 0.2])}, disable=True,
                                      seed=3, callback=lambda d: seen.append(-d["i"]))
    assert torch.equal(first, again) and len(plans._plans) == 1 and seen[6:] == [-i for i in range(6)]
    other = fk.sample_euler_ancestral(den, x, sigmas, extra_args={"cond": torch.tensor([0.5, 0.2])}, disable=True,
                                      seed=4)
    assert not torch.equal(first, other)
    plans.clear_plans()
    fresh = fk.sample_euler_ancestral(den, x, sigmas, extra_args={"cond": torch.tensor([0.5, 0.2])}, disable=True,
                                      seed=4)
    assert torch.equal(other, fresh)
    ref = weakref.ref(den)
    del den
    gc.collect()
    assert ref() is None and not len(plans._plans)


def test_noise_levels_of_a_time_tensor_are_remembered_by_identity_and_version():
    model = fk.DenoiserModel(Denoiser(), schedules.karras_sigmas(10, 0.002, 80.0))
    t = torch.tensor([0.5, model.timesteps[3]], dtype=torch.float32)
    s = model.sigma(t)
    assert model.sigma(t) is s
    t[0] = model.timesteps[2]  # an in-place change: looked up again
    s2 = model.sigma(t)
    assert s2 is not s and s2[0].item() == pytest.approx(model._sigmas64[2], rel=1e-6)
    with torch.inference_mode():  # no version counter: looked up every time
        u = torch.tensor([0.25])
        assert model.sigma(u).item() == pytest.approx(60.0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_is_k_diffusions_with_its_noise_sampler(eta):
    kd = _kd()
    den = Denoiser()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 20.0
    draws = torch.randn(8, *x.shape, generator=torch.Generator().manual_seed(2))
    calls, ours_calls = [], []

    def sampler(into):
        return lambda s, s_next: into.append((float(s), float(s_next))) or draws[len(into) - 1]

    ours = fk.sample_dpm_fast(den, x, 0.05, 20.0, 10, eta=eta, noise_sampler=sampler(ours_calls), disable=True)
    theirs = kd.sample_dpm_fast(den, x, 0.05, 20.0, 10, eta=eta, noise_sampler=sampler(calls), disable=True)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 2e-5
    if eta:  # asked for the same noise levels, in the same order (k-diffusion also asks on the last step, whose
        # sigma_down is capped at sigma_min: its noise is scaled by 0 there)
        assert len(ours_calls) == len(calls) - 1
        flat = [s for pair in calls[:-1] for s in pair]
        assert [s for pair in ours_calls for s in pair] == pytest.approx(flat, rel=1e-6)
    seen = []
    fk.sample_dpm_fast(den, x, 0.05, 20.0, 10, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == [0, 1, 2, 3] and {"x", "sigma", "denoised"} <= set(seen[0])


def test_dpm_adaptive_one_sample_is_k_diffusions_and_a_batch_counts_per_sample():
    kd = _kd()
    den = Denoiser()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 20.0
    ours, info = fk.sample_dpm_adaptive(den, x[:1], 0.05, 20.0, return_info=True, disable=True)
    theirs, kinfo = kd.sample_dpm_adaptive(den, x[:1], 0.05, 20.0, return_info=True, disable=True)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    assert {k: info[k] for k in ("steps", "nfe", "n_accept", "n_reject")} == kinfo
    batch, binfo = fk.sample_dpm_adaptive(den, x, 0.05, 20.0, return_info=True, disable=True)
    assert binfo["nfe_per_sample"].shape == (3,) and int(binfo["nfe_per_sample"][0]) == kinfo["nfe"]
    with pytest.raises(ValueError, match="noise_sampler and callback are k-diffusion's per batch-wide step"):
        fk.sample_dpm_adaptive(den, x, 0.05, 20.0, callback=print)
    with pytest.raises(ValueError, match="sigma_min must be a finite number > 0"):
        fk.sample_dpm_adaptive(den, x, 0.0, 20.0)


def test_the_end_point_samplers_take_k_diffusions_keywords():
    import inspect

    kd = _kd()
    for name in ("sample_dpm_fast", "sample_dpm_adaptive"):
        ours = inspect.signature(getattr(fk, name)).parameters
        for p in inspect.signature(getattr(kd, name)).parameters.values():
            assert p.name in ours and ours[p.name].default == p.default, (name, p.name)
