"""fastdiff.schedules: every named schedule against its peer's own grid (k-diffusion and diffusers called here;
ComfyUI, which does not install, as an independent float64 reference of its formulas written in this file), the
published tables (Align Your Steps, GITS), the map to flow time on several paths, sample(schedule=...) against
sample(timesteps=...) bit for bit, the option errors, the CLI flag and the diffusers Denoiser's helper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import schedules as fs
from fastdiff.paths import VE, VP, CondOT, DiscreteVP, VPCosine
from fastdiff.schedules.levels import level

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _sd_alphas() -> torch.Tensor:
    """SD 1.x's alphas_cumprod in float64 (scaled_linear betas), independent of diffusers."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


SD_PATH = DiscreteVP(_sd_alphas())


def _close(ours, ref, rtol=1e-6, atol=1e-9):
    torch.testing.assert_close(torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64),
                               rtol=rtol, atol=atol)


class _float64:  # k-diffusion's get_sigmas_* build their ramps in the default dtype
    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def _k_diffusion():
    """k-diffusion's sampling module alone (a full ``import k_diffusion`` needs its training dependencies)."""
    from fastdiff.bench.peers import k_diffusion_sampling

    try:
        return k_diffusion_sampling()
    except ImportError as e:
        pytest.skip(f"k-diffusion: {e}")


# ---- k-diffusion (installed: called) -----------------------------------------------------------------------------
def test_k_diffusion_schedules_equal_its_functions():
    ks = _k_diffusion()
    for path in (VP(), SD_PATH, CondOT(), VE(80.0)):
        lv = fs.Levels(path)
        lo, hi = lv.sigma_min, lv.sigma_max
        for n in (1, 7, 30):
            with _float64():
                refs = {"karras": ks.get_sigmas_karras(n, lo, hi, rho=7.0),
                        "exponential": ks.get_sigmas_exponential(n, lo, hi),
                        "polyexponential": ks.get_sigmas_polyexponential(n, lo, hi, rho=1.0)}
                vp_ref = ks.get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3)
                poly2 = ks.get_sigmas_polyexponential(n, lo, hi, rho=2.5)
            for name, ref in refs.items():
                _close(fs.sigmas(name, n, path), ref, rtol=1e-12)  # measured: 3e-13
            _close(fs.sigmas(fs.PolyExponential(rho=2.5), n, path), poly2, rtol=1e-12)
            _close(fs.sigmas("vp", n, path), vp_ref, rtol=1e-12)
    # k-diffusion's vp levels are the VP path's own (beta_d = 19.9, beta_min = 0.1): the grid is uniform in t
    _close(fs.schedule_grid("vp", 10, VP()), [1.0 - u for u in np.linspace(1, 1e-3, 10)] + [1.0], rtol=0,
           atol=1e-12)


# ---- ComfyUI (does not install: an independent float64 reference of comfy/samplers.py and model_sampling.py) ------
class _ComfyDiscrete:
    """ComfyUI's ModelSamplingDiscrete in float64: sigmas of alphas_cumprod, sigma(t) with log sigma interpolated,
    timestep(sigma) the nearest log sigma."""

    def __init__(self, alphas):
        self.sigmas = ((1 - alphas) / alphas) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return (sigma.log() - self.log_sigmas).abs().argmin().double()

    def sigma(self, t):
        t = torch.clamp(torch.as_tensor(t, dtype=torch.float64), 0, len(self.sigmas) - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()


class _ComfyFlow:
    """ComfyUI's ModelSamplingDiscreteFlow (shift 1, multiplier 1000)."""

    def __init__(self):
        self.sigmas = torch.arange(1, 1001, dtype=torch.float64) / 1000
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * 1000

    def sigma(self, t):
        return torch.as_tensor(t, dtype=torch.float64) / 1000


def _comfy(ms, name, steps):
    """Each ComfyUI scheduler's formula, as comfy/samplers.py writes it (float64 here)."""
    sig = ms.sigmas
    if name == "simple":
        ss = len(sig) / steps
        return [float(sig[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
    if name == "ddim_uniform":
        ss = max(len(sig) // steps, 1)
        return [float(v) for v in sig[1::ss]][::-1] + [0.0]
    if name in ("normal", "sgm_uniform"):
        start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
        ts = torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1] if name == "sgm_uniform" else \
            torch.linspace(start, end, steps, dtype=torch.float64)
        return [float(ms.sigma(t)) for t in ts] + [0.0]
    if name == "beta":
        scipy_stats = pytest.importorskip("scipy.stats")
        ts = np.rint(scipy_stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (len(sig) - 1))
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(float(sig[int(t)]))
            last = t
        return out + [0.0]
    if name == "linear_quadratic":
        threshold, lin = 0.025, steps // 2
        diff, quad = lin - threshold * steps, steps - lin
        qc, lc = diff / (lin * quad ** 2), threshold / lin - 2 * diff / quad ** 2
        sched = [i * threshold / lin for i in range(lin)] + \
            [qc * i ** 2 + lc * i + qc * lin ** 2 for i in range(lin, steps)] + [1.0]
        return [(1.0 - x) * float(ms.sigma_max) for x in sched]
    if name == "kl_optimal":
        idx = torch.arange(steps, dtype=torch.float64) / (steps - 1)
        body = (idx * math.atan(ms.sigma_min) + (1 - idx) * math.atan(ms.sigma_max)).tan()
        return body.tolist() + [0.0]
    if name == "laplace":  # get_sigmas_laplace(n = steps + 1): no final 0
        x = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        lmb = 0.0 - 0.5 * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
        return torch.clamp(lmb.exp(), float(ms.sigma_min), float(ms.sigma_max)).tolist()
    raise KeyError(name)


COMFY = ("simple", "ddim_uniform", "normal", "sgm_uniform", "beta", "linear_quadratic", "kl_optimal", "laplace")


@pytest.mark.parametrize("name", COMFY)
def test_comfyui_schedulers_equal_an_independent_reference(name):
    """On SD's discrete path (ComfyUI's EPS model_sampling) and on CondOT (its CONST flow sampling)."""
    cases = [(SD_PATH, _ComfyDiscrete(_sd_alphas())), (CondOT(), _ComfyFlow())]
    for path, ms in cases:
        for steps in (3, 10, 20):
            if name == "laplace" and isinstance(path, CondOT):
                continue  # clamped repeats at sigma_max: see test_repeated_levels_are_merged
            ref = _comfy(ms, name, steps)
            ours = fs.sigmas(name, steps, path)
            _close(ours, ref, rtol=1e-9)  # measured: 1e-15
            grid = fs.schedule_grid(name, steps, path)
            _close([level(path, t) for t in grid], ref, rtol=1e-9, atol=1e-12)  # the grid holds the same levels


def test_repeated_levels_are_merged():
    """laplace on CondOT clamps its first levels to sigma_max = 1: zero-length steps, dropped from the grid."""
    levels = fs.sigmas("laplace", 10, "condot")
    grid = fs.schedule_grid("laplace", 10, "condot")
    assert levels[:3] == [1.0, 1.0, 1.0] and len(grid) == len(set(levels))
    assert grid[-1] == pytest.approx(1 - levels[-1])  # ends at its last level, as ComfyUI's does (no final 0)


def test_beta_quantile_equals_scipy():
    stats = pytest.importorskip("scipy.stats")
    from fastdiff.schedules.formulas import beta_ppf

    for a, b in ((0.6, 0.6), (0.5, 0.7), (2.0, 3.0), (1.0, 1.0)):
        q = np.linspace(0.001, 0.999, 37)
        _close([beta_ppf(v, a, b) for v in q], stats.beta.ppf(q, a, b), rtol=1e-10, atol=1e-12)


# ---- diffusers (installed: called) -------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", fs.SPACINGS)
def test_timestep_spacing_equals_diffusers_euler(spacing):
    diffusers = pytest.importorskip("diffusers")
    for offset in (0, 1):
        ref = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
        path = DiscreteVP(ref.alphas_cumprod)  # diffusers' own alphas (float32) as the path
        for steps in (4, 25, 50):
            ref.set_timesteps(steps)
            ours = fs.sigmas(fs.TimestepSpacing(spacing, steps_offset=offset), steps, path)
            _close(ours, ref.sigmas, rtol=1e-6)  # measured: 1.2e-7 (diffusers' float32 sigmas)
            grid = fs.schedule_grid(fs.TimestepSpacing(spacing, steps_offset=offset), steps, path)
            _close([level(path, t) for t in grid], ref.sigmas, rtol=1e-6)
        if offset == 0:
            ref.set_timesteps(10)
            _close(fs.sigmas(spacing, 10, path), ref.sigmas, rtol=1e-6)  # the name's defaults


def test_karras_and_exponential_equal_diffusers_use_sigmas_on_its_range():
    """diffusers' use_karras_sigmas / use_exponential_sigmas take the range of its spaced sigmas."""
    diffusers = pytest.importorskip("diffusers")
    for cls, flag in ((fs.Karras, "use_karras_sigmas"), (fs.Exponential, "use_exponential_sigmas")):
        ref = diffusers.EulerDiscreteScheduler(**SD, **{flag: True})
        plain = diffusers.EulerDiscreteScheduler(**SD)
        plain.set_timesteps(12)
        ref.set_timesteps(12)
        lo, hi = float(plain.sigmas[-2]), float(plain.sigmas[0])
        _close(fs.sigmas(cls(sigma_min=lo, sigma_max=hi), 12, SD_PATH), ref.sigmas, rtol=1e-6)


@pytest.mark.parametrize("config", [dict(shift=1.0), dict(shift=3.0), dict(use_dynamic_shifting=True),
                                    dict(use_dynamic_shifting=True, time_shift_type="linear"),
                                    dict(use_dynamic_shifting=True, shift_terminal=0.02)])
def test_shifted_equals_flow_match_euler(config):
    diffusers = pytest.importorskip("diffusers")
    flux = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    dynamic = config.get("use_dynamic_shifting", False)
    mu = flux.calculate_shift(4096) if dynamic else None
    if dynamic:
        assert fs.dynamic_shift_mu(4096) == pytest.approx(mu, rel=1e-15)
    options = dict(shift=config.get("shift", 1.0), time_shift_type=config.get("time_shift_type", "exponential"),
                   shift_terminal=config.get("shift_terminal"))
    for steps in (1, 4, 28):
        if steps == 1 and config.get("shift_terminal"):  # diffusers divides by 0 (NaN): we refuse
            with pytest.raises(ValueError, match="shift_terminal of schedule 'shifted' needs"):
                fs.sigmas(fs.Shifted(mu=1.0, shift_terminal=0.02), 1)
            continue
        ref.set_timesteps(steps, mu=mu)
        schedule = fs.Shifted(image_seq_len=4096 if dynamic else None, **options)
        _close(fs.sigmas(schedule, steps), ref.sigmas, rtol=1e-6)  # measured: 8e-8 (float32)
        _close(fs.schedule_grid(schedule, steps, "condot"), 1.0 - ref.sigmas.double(), rtol=0, atol=1e-6)
        if dynamic:  # the Flux / SD3.5 pipelines' own linspace(1, 1/steps)
            ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            _close(fs.sigmas(fs.Shifted(mu=mu, pipeline_sigmas=True, **options), steps), ref.sigmas, rtol=1e-6)


# ---- published tables --------------------------------------------------------------------------------------------
def _loglinear(levels, n):
    xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()


def test_align_your_steps_equals_the_published_tables():
    diffusers_utils = pytest.importorskip("diffusers.schedulers.scheduling_utils")
    ays = diffusers_utils.AysSchedules  # the tables in 3 decimals, the last level replaced by 0
    for model, key in (("sd15", "StableDiffusionSigmas"), ("sdxl", "StableDiffusionXLSigmas"),
                       ("svd", "StableDiffusionVideoSigmas")):
        assert fs.sigmas(fs.AlignYourSteps(model, source="sigmas"), 10) == ays[key]  # the published sigmas
        ours = fs.sigmas(fs.AlignYourSteps(model), 10)
        assert ours[:-1] == fs.tables.AYS[model][:-1] and ours[-1] == 0.0  # ComfyUI's digits
        if model != "svd":  # ComfyUI's digits: SD's levels at the published timesteps (here from the path itself)
            assert ays[key.replace("Sigmas", "Timesteps")] == fs.tables.AYS_TIMESTEPS[model][:-1]
            _close(ours[:-1], [level(SD_PATH, SD_PATH.time(k)) for k in fs.tables.AYS_TIMESTEPS[model][:-1]],
                   rtol=1e-9)
        for steps in (5, 23):  # ComfyUI's loglinear_interp to other counts, the last level 0
            ref = _loglinear(fs.tables.AYS[model], steps + 1)
            ref[-1] = 0.0
            _close(fs.sigmas(fs.AlignYourSteps(model), steps), ref, rtol=1e-12)
    # on SD's own discrete path the grid's levels are the table's
    grid = fs.schedule_grid("ays_sd15", 10, SD_PATH)
    _close([level(SD_PATH, t) for t in grid], fs.tables.AYS["sd15"][:-1] + [0.0], rtol=1e-10)


# ComfyUI comfy_extras/nodes_gits.py NOISE_LEVELS, three of its rows verbatim
GITS_ROWS = {
    (1.20, 10): [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
                 0.19894916, 0.09824532, 0.02916753],
    (0.80, 20): [14.61464119, 13.76078796, 12.96784878, 12.2308979, 11.54541874, 10.90732002, 10.31284904,
                 9.75859547, 9.24142551, 8.75849152, 8.30717278, 7.88507891, 7.49001646, 6.77309084, 5.85520077,
                 4.86714602, 3.75677586, 2.84484982, 1.78698075, 0.803307, 0.02916753],
    (1.50, 2): [14.61464119, 0.54755926, 0.02916753],
    (1.05, 8): [14.61464119, 7.49001646, 4.86714602, 2.84484982, 1.61558151, 0.95350921, 0.52423614, 0.22545385,
                0.02916753],
}


def test_gits_equals_comfyui_table():
    for (coeff, steps), row in GITS_ROWS.items():
        assert fs.sigmas(fs.GITS(coeff=coeff), steps) == row[:-1] + [0.0]
    ref = _loglinear(GITS_ROWS[(0.80, 20)], 31)  # more than 20 steps: the 20-step row interpolated
    ref[-1] = 0.0
    _close(fs.sigmas(fs.GITS(coeff=0.80), 30), ref, rtol=1e-12)
    # the stored form: each level is SD 1.5's sigma near timestep 9.99 j (ComfyUI's log-linear interpolation)
    from fastdiff.schedules.gits_table import GITS_LEVELS, LEVELS

    ms = _ComfyDiscrete(_sd_alphas())
    _close([LEVELS[j] for j in sorted(LEVELS)], [float(ms.sigma(9.99 * j)) for j in sorted(LEVELS)], rtol=3e-5)
    assert sorted(GITS_LEVELS) == [round(0.80 + 0.05 * i, 2) for i in range(15)]
    assert all(len(rows) == 19 and [len(r) for r in rows] == list(range(3, 22)) for rows in GITS_LEVELS.values())
    assert all(all(a > b for a, b in zip(r, r[1:])) for rows in GITS_LEVELS.values() for r in rows)


# ---- grids on paths, sample(schedule=...) ------------------------------------------------------------------------
PATHS = [CondOT(), VP(), VPCosine(), VE(80.0), SD_PATH]


@pytest.mark.parametrize("name", fs.SCHEDULE_NAMES)
def test_every_schedule_gives_an_increasing_grid_on_every_path(name):
    for path in PATHS:
        for steps in (2, 9):
            schedule = fs.get_schedule(name)
            if schedule.native == "sigma" and fs.sigmas(schedule, steps)[1] > level(path, 0.0, "sigma"):
                with pytest.raises(ValueError, match="does not fit the path"):  # SVD's 700 .. on SD's 14.6
                    fs.schedule_grid(schedule, steps, path)
                continue
            grid = fs.schedule_grid(name, steps, path)
            assert 0.0 <= grid[0] and grid[-1] <= 1.0 and all(b > a for a, b in zip(grid, grid[1:])), (path, grid)
            assert abs(len(grid) - (steps + 1)) <= 1 or name in ("beta", "laplace", "ddim_uniform")


def test_time_of_inverts_the_level_on_every_path():
    for path in PATHS + [fastdiff.paths.UserPath(lambda t: t ** 2, lambda t: 1 - t ** 2)]:
        for t in (0.0, 1e-3, 0.2, 0.5, 0.9, 0.999, 1.0):
            s = level(path, t)
            if math.isfinite(s):
                assert fs.time_of(path, s) == pytest.approx(t, abs=1e-9), (path, t)


def _model(x, t, y):
    return -0.7 * x + 0.1 * t.view(-1, 1)


@pytest.mark.parametrize("path,prediction,method", [("condot", "velocity", "euler"), ("vp", "eps", "dpmpp_2m"),
                                                    (VE(20.0), "x0", "heun"), ("condot", "eps", "ddim")])
def test_sample_with_a_schedule_equals_sample_with_its_grid(path, prediction, method):
    for schedule in ("karras", fs.Beta(alpha=0.5, beta=0.7), "shifted", "ays_sdxl"):
        kw = dict(shape=(3,), batch_size=4, seed=3, path=path, prediction=prediction, method=method)
        got = fastdiff.sample(_model, 6, schedule=schedule, **kw)
        start = 1e-3 if prediction == "eps" and path == "condot" else 0.0  # (the eps model cannot start at t = 0)
        grid = fs.schedule_grid(schedule, 6, path, t_start=start)
        want = fastdiff.sample(_model, None, timesteps=grid, **kw)
        assert torch.equal(got, want)
        sampler = fastdiff.Sampler(_model, 6, schedule=schedule, **kw)
        assert torch.equal(sampler(seed=3), want)


def test_invert_and_the_adaptive_method_take_a_schedule():
    """invert runs sample's grid of the same schedule backwards; dpm_adaptive reads the schedule's ends; generate's
    manifest records a schedule object by its repr."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    kw = dict(path="condot", prediction="velocity", method="heun")
    grid = fs.schedule_grid("karras", 8, fastdiff.paths.get_path("condot"))
    assert torch.equal(fastdiff.invert(_model, x, 8, schedule="karras", **kw),
                       fastdiff.invert(_model, x, None, timesteps=grid, **kw))
    grid = fs.schedule_grid("karras", 8, fastdiff.paths.get_path("vp"))
    a = fastdiff.sample(_model, 8, schedule="karras", shape=(3,), batch_size=2, path="vp", prediction="eps",
                        method="dpm_adaptive")
    b = fastdiff.sample(_model, None, timesteps=[grid[0], grid[-2]], shape=(3,), batch_size=2, path="vp",
                        prediction="eps", method="dpm_adaptive")
    assert torch.equal(a, b)
    from fastdiff.generation import _jsonable

    assert _jsonable("schedule", fs.Karras(rho=5.0)) == repr(fs.Karras(rho=5.0))


def test_schedule_errors_name_the_argument_and_the_choices():
    with pytest.raises(ValueError, match="unknown schedule='cosine'; valid schedules: normal, karras"):
        fastdiff.sample(_model, 4, schedule="cosine", shape=(2,), batch_size=1)
    with pytest.raises(ValueError, match="schedule and timesteps were both given"):
        fastdiff.sample(_model, None, schedule="karras", timesteps=[0.0, 0.5, 1.0], shape=(2,), batch_size=1)
    with pytest.raises(ValueError, match="rho of schedule 'karras' must be a finite number > 0"):
        fs.Karras(rho=-1.0)
    with pytest.raises(ValueError, match="alpha of schedule 'beta'"):
        fs.Beta(alpha=0.0)
    with pytest.raises(ValueError, match="model of schedule 'align_your_steps' must be one of sd15, sdxl, svd"):
        fs.AlignYourSteps("sd3")
    with pytest.raises(ValueError, match="source of schedule 'align_your_steps' must be one of timesteps, sigmas"):
        fs.AlignYourSteps("sdxl", source="paper")
    with pytest.raises(ValueError, match="coeff of schedule 'gits' must be one of 0.80, 0.85"):
        fs.GITS(coeff=1.23)
    with pytest.raises(ValueError, match="time_shift_type of schedule 'shifted' must be one of exponential, linear"):
        fs.Shifted(mu=1.0, time_shift_type="cubic")
    with pytest.raises(ValueError, match="timestep_spacing must be one of leading, trailing, linspace"):
        fs.TimestepSpacing("uniform")
    with pytest.raises(ValueError, match="schedule='karras'.*unexpected keyword argument 'bogus'"):
        fs.get_schedule("karras", bogus=1)
    with pytest.raises(ValueError, match="sigma_min = 5.0 is not below sigma_max"):
        fs.schedule_grid(fs.Karras(sigma_min=5.0), 4, "condot")
    with pytest.raises(ValueError, match="does not fit the path"):  # SD's levels (up to 14.6) beyond VE(2)'s
        fs.schedule_grid("ays_sd15", 4, VE(2.0))


def test_cli_sample_schedule_flag(ring_checkpoint, tmp_path, monkeypatch, capsys):
    from fastdiff import cli

    seen = []
    sample = fastdiff.sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("schedule"))
        return sample(*args, **kwargs)

    monkeypatch.setattr(fastdiff, "sample", spy)
    out = tmp_path / "x.safetensors"
    base = ["sample", "--checkpoint", str(ring_checkpoint), "--out", str(out), "--steps", "4", "--per-class", "2",
            "--method", "euler", "--no-progress"]
    assert cli.main(base + ["--schedule", "karras"]) == 0
    assert seen == ["karras"] and out.exists()
    with pytest.raises(SystemExit):
        cli.main(base + ["--schedule", "cosine"])
    assert "invalid choice: 'cosine'" in capsys.readouterr().err


def test_denoiser_timesteps_takes_a_schedule():
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.adapters.diffusers import denoiser

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()
    sched = diffusers.EulerDiscreteScheduler(**SD)
    den = denoiser(unet, sched)
    table = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()) ** 0.5
    ks = _k_diffusion()
    with _float64():
        ref = ks.get_sigmas_karras(10, float(table[0]), float(table[-1]))
    _close([den.path.sigma(t) for t in den.timesteps(10, schedule="karras")], ref, rtol=1e-6)
    grid = den.timesteps(10, schedule=fs.AlignYourSteps("sd15"))
    _close([den.path.sigma(t) for t in grid], fs.tables.AYS["sd15"][:-1] + [0.0], rtol=1e-9)
    x = fastdiff.sample(den, None, path=den.path, prediction=den.prediction, timesteps=grid,
                        noise=torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6)
    assert x.shape == (1, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="schedule: give its options"):
        den.timesteps(10, schedule="karras", sigmas="karras")
    flow = denoiser(unet, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    _close(flow.timesteps(6, schedule=fs.Shifted(shift=3.0)), 1.0 - ref.sigmas.double(), rtol=0, atol=1e-6)


def test_the_first_helpers_are_still_exported():
    for name in ("karras_sigmas", "exponential_sigmas", "ve_timesteps", "ve_grid", "shifted_timesteps", "shift_time"):
        assert callable(getattr(fs, name))
    _close(fs.karras_sigmas(5, 0.1, 10.0), fs.sigmas(fs.Karras(sigma_min=0.1, sigma_max=10.0), 5, VE(10.0)),
           rtol=1e-12)


def test_schedules_are_values():
    k = fs.Karras(rho=5.0)
    assert k == fs.Karras(rho=5.0) and hash(k) == hash(fs.Karras(rho=5.0)) and k != fs.Karras()
    with pytest.raises(AttributeError, match="the options of Karras are fixed"):
        k.rho = 3.0


def test_the_docs_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "schedules.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/schedules.md", "exec"), namespace)  # noqa: S102
    names = set(re.findall(r"^\| `(\w+)`", text, flags=re.M))
    assert names | {"ays_sd15", "ays_sdxl", "ays_svd"} == set(fs.SCHEDULE_NAMES)  # every schedule in the table
