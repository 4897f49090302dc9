"""The benchmark cases compute what they claim: fused and eager sides agree when the eager side is
given fastdiff's noise, and the report writes its table and CSV rows."""

import csv
import math

import pytest
import torch

import fastdiff
from fastdiff.bench import harness as bm


def _spec_noise(seeds, stream):
    return lambda like: fastdiff.ops.randn(seeds, stream, like.shape[1:])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("op", ["step_sde", "step_ode"])
def test_step_cases_agree(op, dtype):
    n = 16 * 37
    cases = {c.impl: c for c in bm.step_cases(op, n, dtype, impls=["fastdiff", "eager", "reference"],
                                                         inplace=False)}
    fused = cases["fastdiff"].fn().clone()
    ref = cases["reference"].fn().clone()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    x, out2b, seeds = bm._inputs(n, bm._dtype(dtype), "cpu")
    if op == "step_sde":
        eager = bm.eager_sde_step(x, out2b, noise_like=_spec_noise(seeds, 1))
    else:
        eager = bm.eager_ode_step(x, out2b)
        assert torch.equal(bm.eager_ode_step(x, out2b), cases["eager"].fn())
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert cases["fastdiff"].bytes == n * (8 + 2 * bm._dtype(dtype).itemsize)


def test_inplace_step_case_updates_x():
    (case,) = bm.step_cases("step_ode", 16 * 5, impls=["fastdiff"])
    x, out2b, _ = bm._inputs(16 * 5, torch.float32, "cpu")
    torch.testing.assert_close(case.fn(), bm.eager_ode_step(x, out2b), rtol=1e-5, atol=1e-5)  # x, updated


def test_sde_coefficients_are_the_condot_sde_step():
    c_x, c_p, c_n = bm._sde_coefficients(t=0.3, dt=0.1, sigma=0.7)
    x, u = 1.3, -0.4
    score = (0.3 * u - x) / 0.7
    assert c_x * x + c_p * u == pytest.approx(x + 0.1 * (u + 0.5 * 0.49 * score))
    assert c_n == pytest.approx(0.7 * math.sqrt(0.1))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gram_cases_agree(dtype):
    n = 16 * 29
    cases = {c.impl: c for c in bm.gram_cases(n, dtype, impls=["fastdiff", "eager", "reference"])}
    G = cases["fastdiff"].fn()
    sums, products = cases["eager"].fn()
    torch.testing.assert_close(G[:, 0, 1:], sums, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(G[:, 1:, 1:], products, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(cases["reference"].fn(), G, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("rule", ["rescale", "apg"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rescale_cases_agree(dtype, rule):
    """The fused CFG-rescale / APG step computes the eager formula (diffusers' rescale_noise_cfg or
    normalized_guidance, then Euler)."""
    n = 16 * 29
    cases = {c.impl: c for c in bm.rescale_cases(n, dtype, impls=["fastdiff", "eager", "reference"], rule=rule)}
    eager = cases["eager"].fn()
    torch.testing.assert_close(cases["fastdiff"].fn().clone(), eager, rtol=0, atol=1e-5 * eager.abs().max().item())
    torch.testing.assert_close(cases["reference"].fn().clone(), eager, rtol=0, atol=1e-5 * eager.abs().max().item())


def test_loss_cases_agree():
    n = 16 * 41
    cases = {c.impl: c for c in bm.loss_cases(n, impls=["fastdiff", "eager", "reference"])}
    x_f, loss_f = cases["fastdiff"].fn()
    x_r, loss_r = cases["reference"].fn()
    torch.testing.assert_close(x_f, x_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    # eager with fastdiff's ε gives the same x_t and loss
    g = torch.Generator().manual_seed(1)
    z = torch.randn((bm.BATCH, n // bm.BATCH), generator=g)
    p = torch.randn((bm.BATCH, n // bm.BATCH), generator=g)
    t = torch.rand(bm.BATCH, generator=g, dtype=torch.float64)
    seeds = torch.arange(bm.BATCH)
    x_e, loss_e = bm.eager_loss(p, z, t.float(), noise_like=_spec_noise(seeds, 0))
    torch.testing.assert_close(x_f, x_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-5)
    assert all(c.op == "loss" for c in cases.values())


def test_randn_case_is_the_stream():
    (case,) = bm.randn_cases(16 * 8, impls=["fastdiff"])
    assert torch.equal(case.fn(), fastdiff.ops.randn(list(range(16)), 0, (8,)))


def test_report_prints_ratios_and_writes_csv(tmp_path):
    lines = []
    rows = bm.report(ops=("step_ode", "randn"), log2_sizes=(10,), dtypes=("fp32",), repeat=3, compile=False,
                     csv_dir=tmp_path, log=lines.append)
    assert {r["backend"] for r in rows if r["op"] == "step_ode"} == {"fastdiff", "eager", "reference"}
    eager = next(r for r in rows if r["op"] == "step_ode" and r["backend"] == "eager")
    assert eager["x_vs_baseline"] == 1.0
    assert all(r["median_ms"] > 0 and r["GB/s"] > 0 for r in rows)
    (path,) = tmp_path.glob("*.csv")
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows) and read[0]["device"] == bm.device_name("cpu")
    assert any("x base" in line for line in lines)


def test_loop_cases_run_every_installed_peer():
    cases = {c.impl: c for c in bm.loop_cases(4096 * 3)}
    assert "fastdiff" in cases
    for impl, c in cases.items():
        out = c.fn()
        assert out.numel() == 3 * 4096 and torch.isfinite(out).all(), impl


def test_loop_ode_matches_flow_matching():
    """The peers' loops do the same work: fastdiff's Euler ODE with cfg 4 from the same initial state
    equals flow_matching's ODESolver (Euler, same grid) on the same model."""
    pytest.importorskip("flow_matching")
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    model = bm.CheapModel()
    y = torch.arange(3)
    x0 = torch.randn(3, *bm.LOOP_SHAPE, generator=torch.Generator().manual_seed(0))

    class Velocity(ModelWrapper):
        def forward(self, x, t, **extras):
            tt = t.float().expand(6)
            cond, uncond = model(torch.cat([x, x]), tt, torch.cat([y, torch.full_like(y, 10)])).chunk(2)
            return uncond + 4.0 * (cond - uncond)

    ref = ODESolver(velocity_model=Velocity(model)).sample(x0, step_size=1 / 50, method="euler",
                                                            time_grid=torch.tensor([0.0, 1.0]))
    with torch.no_grad():
        ours = fastdiff.sample(model, 50, 4.0, y=y, null_y=10, noise=x0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_k_diffusion_loop_is_ddim_in_sigma_space():
    """The k-diffusion row runs the same model through condot_denoiser: with eta = 0 (sample_euler) on
    the σ-grid of the flow-time grid it is DDIM, so it equals fastdiff's DDIM from the same state."""
    from fastdiff.bench.peers import k_diffusion_sampling

    try:
        kd = k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion not installed: {exc}")
    model = bm.CheapModel()
    y = torch.arange(3)
    y2 = torch.cat([y, torch.full_like(y, 10)])
    x0 = torch.randn(3, *bm.LOOP_SHAPE, generator=torch.Generator().manual_seed(1))

    def velocity(xt, t):
        cond, uncond = model(torch.cat([xt, xt]), torch.cat([t, t]).float(), y2).chunk(2)
        return uncond + 4.0 * (cond - uncond)

    t_grid = torch.linspace(0.02, 1.0, 51, dtype=torch.float64)
    sigmas = ((1.0 - t_grid) / t_grid).float()
    with torch.no_grad():
        theirs = kd.sample_euler(bm.condot_denoiser(velocity), x0 * sigmas[0], sigmas, disable=True)
        ours = fastdiff.sample(model, 50, 4.0, y=y, null_y=10, noise=x0 * (1.0 - 0.02), timesteps=t_grid,
                               method="ddim")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # and the benchmark's row (ancestral, eta 1) runs and stays finite
    (case,) = bm.loop_cases(3 * 4096, impls=("k_diffusion",))
    assert torch.isfinite(case.fn()).all()


def test_method_cases_run_every_registered_method():
    """One case per registered method with a stage table: 50 evaluations' fused steps, and the whole loop around them
    ("<method> loop": a reused Sampler with a free model; euler, heun, dpmpp_2m also with step caching); Euler moves 12
    bytes per element and evaluation (x and the prediction read, x written), a method with history buffers more."""
    from fastdiff.bench.methods import method_cases

    n = 16 * 64
    cases = {c.impl: c for c in method_cases(n)}
    tables = [m.name for m in fastdiff.sampling.methods() if m.run is None]  # (dpm_adaptive: no table)
    cached = ("loop fresh", "loop cached o0", "loop cached o2")  # the step-caching cases (issue 34), each beside
    # the kernel calls it makes ("... calls": the loop's own time is the loop's over theirs)
    assert list(cases) == [*(name for m in tables for name in (m, f"{m} loop", *(
        f"{m} {c}{part}" for c in cached for part in ("", " calls") if m in ("euler", "heun", "dpmpp_2m")))),
        "brownian_noise"]
    assert cases["euler"].bytes == 50 * 12 * n
    # step_noise="brownian": ~7 calls of 4 draws per step, each 12 bytes per element
    assert 50 * 5 * 12 * n < cases["brownian_noise"].bytes < 50 * 10 * 12 * n
    assert cases["dpmpp_3m_sde"].bytes > cases["dpmpp_2m"].bytes > cases["euler"].bytes
    for case in cases.values():
        case.fn()
    # a loop's recorded calls are what it runs: replayed, they leave the loop's result (the state they write)
    from fastdiff.bench.methods import _loop, _recorded_calls
    from fastdiff.sampling.features.caching import EasyCache

    for cache in (None, EasyCache(max_skips=1, order=2, start_percent=0.0, end_percent=1.0)):
        sampler, _ = _loop(fastdiff.sampling.get_method("heun"), n, "cpu", cache=cache, rotation=8)
        replay = _recorded_calls(sampler)
        expected = sampler(seed=0).clone()
        replay()
        assert torch.equal(sampler._plan.result, expected)


def test_loop_cases_include_the_method_rows():
    from fastdiff.bench.loops import loop_cases

    impls = {c.impl for c in loop_cases(1 << 12, impls=["fastdiff_ea", "fastdiff_2m_sde", "fastdiff_2m_sde_bt"])}
    assert impls == {"fastdiff_ea", "fastdiff_2m_sde", "fastdiff_2m_sde_bt"}


def test_langevin_cases_run_the_same_chains():
    """The Langevin benchmark's implementations run the same chains up to their noise: from the same start, 20
    steps of drift toward 3 move every implementation's mean alike (ULA and MALA, fastdiff and eager)."""
    cases = {c.impl: c for c in bm.langevin_cases(16 * 4096, impls=["eager", "eager_mala"])}
    assert set(cases) == {"fastdiff", "fastdiff_mala", "eager", "eager_mala"}
    means = {impl: case.fn().mean().item() for impl, case in cases.items()}
    start = 0.0  # x0 ~ N(0, 1); each step moves the mean by h/2 (3 − mean)
    want = 3.0 - (3.0 - start) * (1 - 0.5 * 0.01) ** 20
    assert all(abs(m - want) < 0.02 for m in means.values()), (want, means)


class _StandInSampler:
    """fastdiff.Sampler's announced API on top of fastdiff.sample, so the latency op's Sampler subject runs
    before (and whether or not) the class is in fastdiff: built once, ``sampler(seed=...)`` runs it."""

    def __init__(self, model, steps, cfg=1.0, **settings):
        self.model, self.steps, self.cfg, self.settings = model, steps, cfg, settings

    def __call__(self, seed=0, noise=None, y=None, null_y=None):
        given = {k: v for k, v in (("y", y), ("null_y", null_y)) if v is not None}
        return fastdiff.sample(self.model, self.steps, self.cfg, **{**self.settings, **given}, seed=seed, noise=noise)


def test_latency_report_rows_table_and_csv(tmp_path, monkeypatch):
    """The latency op at its smallest setting (batch 1, steps 1 and 2, one round): a row per subject, batch and
    cfg with the fixed and per-step figures, the peers' ratios and the targets; printed and in the CSV."""
    from fastdiff.bench import latency

    monkeypatch.setattr(fastdiff, "Sampler", _StandInSampler, raising=False)
    lines = []
    rows = bm.report(ops=("latency",), repeat=1, csv_dir=tmp_path, log=lines.append,
                     latency={"batches": (1,), "steps": (1, 2), "min_time": 1e-3})
    assert {r["op"] for r in rows} == {"latency"} and {(r["batch"], r["cfg"]) for r in rows} == {(1, 1.0), (1, 2.0)}
    ours = {"fastdiff.sample", "fastdiff.Sampler", "torch_loop", "fk.sample_euler", "fk.sample_dpmpp_2m"}
    try:
        import diffusers  # noqa: F401
    except ImportError:
        pass
    else:
        ours |= {"FastDiffEulerScheduler", "DDIMScheduler", "lerobot:DDPMScheduler", "lerobot:FastDiffDDPMScheduler"}
    for cfg in (1.0, 2.0):
        names = {r["backend"] for r in rows if r["cfg"] == cfg}
        assert ours <= names, ours - names
    by_name = {r["backend"]: r for r in rows if r["cfg"] == 2.0}
    for r in rows:
        assert math.isfinite(r["fixed_us"]) and math.isfinite(r["per_step_us"]) and r["model_us"] > 0
        assert r["exp_1000_us"] > 0  # the busy-cores probe of its case
        assert r["steps"] == "1,2" and r["shape"] == "16x2" and r["N"] == 32
        if r["peer"] is not None:
            assert r["peer"] in by_name  # each ratio's peer is a row of the same case
    assert by_name["fastdiff.sample"]["peer"] == "torch_loop"
    assert by_name["fastdiff.Sampler"]["target"].startswith(f"fixed <= {latency.SAMPLER_FIXED_US:g}, step <= ")
    assert by_name["fastdiff.sample"]["target"].startswith(f"fixed <= {latency.SAMPLE_FIXED_US:g}: ")
    assert any(line.startswith("targets: fastdiff.Sampler reused <= 30") for line in lines)
    assert any(line.startswith("free model: ") for line in lines)
    assert any(line.startswith("fastdiff.Sampler ") for line in lines)
    (path,) = tmp_path.glob("*.csv")
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows) and {"fixed_us", "per_step_us", "x_peer_step", "target"} <= set(read[0])


def test_latency_skips_an_absent_sampler_with_a_note(monkeypatch):
    from fastdiff.bench import latency

    monkeypatch.delattr(fastdiff, "Sampler", raising=False)
    found, notes = latency.subjects(1, 1.0)
    assert "fastdiff.Sampler" not in {s.name for s in found}
    assert any(n.startswith("fastdiff.Sampler: skipped") for n in notes)


def test_latency_line_fit_splits_fixed_and_per_step_costs():
    from fastdiff.bench.latency import fit_line

    # two rounds of 100 + 1 µs/step and 200 + 3 µs/step: the medians of their intercepts and slopes
    rounds = {f"loop@{s}": [1e-4 + s * 1e-6, 2e-4 + s * 3e-6] for s in (10, 30, 50)}
    fixed, per_step = fit_line([10, 30, 50], rounds, "loop")
    assert fixed == pytest.approx(1.5e-4) and per_step == pytest.approx(2e-6)


def test_ddim_with_eta_1_is_lerobots_ddpm_step():
    """The latency op sets fastdiff's DDIM scheduler (eta = 1, use_clipped_model_output) against lerobot's
    DDPMScheduler loop: with the same noise, diffusers' DDIM so configured takes DDPM's steps."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.bench.latency import LEROBOT

    ddpm, ddim = diffusers.DDPMScheduler(**LEROBOT), diffusers.DDIMScheduler(**LEROBOT)
    ddpm.set_timesteps(100)
    ddim.set_timesteps(100)
    x = torch.randn(4, 16, 2, generator=torch.Generator().manual_seed(0)) * 3
    x_ddpm, x_ddim = x.clone(), x.clone()
    for t in ddpm.timesteps:
        x_ddpm = ddpm.step(torch.sin(1.3 * x_ddpm), t, x_ddpm, generator=torch.Generator().manual_seed(int(t))
                           ).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        x_ddim = ddim.step(torch.sin(1.3 * x_ddim), t, x_ddim, eta=1.0, use_clipped_model_output=True,
                           variance_noise=noise).prev_sample
    torch.testing.assert_close(x_ddim, x_ddpm, rtol=1e-4, atol=1e-4)
