"""fastdiff.adapters.diffusers: dynamic thresholding (``thresholding=True``) in the fused DPM-Solver multistep and
UniPC schedulers, and UniPC's noise-prediction form (``predict_x0=False``), against diffusers' own schedulers on the
tiny random UNet of tests/test_adapter_diffusers.py and the same initial latents (the SDE variants on the same
noise). Samples agree to TOL relative to max |x|."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.adapters.diffusers import FastDiffDPMSolverMultistepScheduler, FastDiffUniPCMultistepScheduler  # noqa
from test_adapter_diffusers import _dpm_loop, tiny_unet  # noqa: E402

TOL = 1e-5
# the random UNet's x0 predictions reach far past 1.5 at high noise and spread below it late: the threshold s
# (the 0.9 quantile of |x0|, clamped to [1, 1.5]) clips at nearly every step (the tests count them)
THRESHOLD = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
PREDICTIONS = ("epsilon", "v_prediction", "sample")
STEPS = (6, 12, 20)  # 20: past lower_order_final's n < 15, the others within it


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _latents(batch=2):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def _clip_counter(sched):
    """Counts the steps at which diffusers' thresholding changed its x0 prediction (so a test can tell that
    thresholding was at work)."""
    seen = {"clipped": 0, "calls": 0}
    threshold = sched._threshold_sample

    def counted(x0):
        out = threshold(x0)
        seen["calls"] += 1
        seen["clipped"] += int(not torch.equal(out, x0))
        return out

    sched._threshold_sample = counted
    return seen


def _relative(got, want) -> float:
    assert torch.isfinite(want).all()
    return ((got - want).abs().max() / want.abs().max()).item()


def _parity(unet, theirs_cls, ours_cls, config, steps, noises=None):
    """Both schedulers in a pipeline's loop from the same latents: the relative difference of the samples, and the
    count of diffusers' thresholding calls."""
    x = _latents()
    theirs = theirs_cls(**config)
    seen = _clip_counter(theirs)
    want = _dpm_loop(unet, theirs, x, steps, noises)
    ours = ours_cls.from_config(theirs.config)
    got = _dpm_loop(unet, ours, x, steps, noises)
    return _relative(got, want), seen


def _forced_parity(unet, theirs_cls, ours_cls, config, steps):
    """Each step of ours from diffusers' state with diffusers' model output (the histories then hold the same
    predictions): the largest relative difference of a step's result. For loops that amplify rounding (a 1e-7
    change of the initial latents moves diffusers' own samples by 3e-5 in UniPC's noise form on sample predictions:
    eps = (x - alpha x0) / sigma of a random model grows as sigma -> 0), where comparing two free runs measures the
    loop rather than the step."""
    theirs, ours = theirs_cls(**config), ours_cls(**config)
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    x = _latents() * theirs.init_noise_sigma
    worst = 0.0
    with torch.no_grad():
        for t in theirs.timesteps:
            out = unet(theirs.scale_model_input(x, t), t).sample
            want = theirs.step(out, t, x).prev_sample
            worst = max(worst, _relative(ours.step(out, t, x).prev_sample, want))
            x = want
    return worst


def _name(config):
    """The test id: the config without the thresholding settings that are THRESHOLD's."""
    return "-".join(f"{k}={v}" for k, v in config.items() if k == "steps" or THRESHOLD.get(k, object()) != v)


def _dpm_configs():
    configs = []
    for algo in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"):
        for order in (1, 2, 3):
            if algo == "sde-dpmsolver" and order == 3:  # not defined (diffusers)
                continue
            for k, prediction in enumerate(PREDICTIONS):
                config = dict(algorithm_type=algo, solver_order=order, prediction_type=prediction, **THRESHOLD)
                config["steps"] = STEPS[(order + k) % 3]
                if not algo.endswith("++"):  # (diffusers refuses final_sigmas_type="zero" for them)
                    config["final_sigmas_type"] = "sigma_min"
                configs.append(config)
    configs += [
        dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="heun", use_karras_sigmas=True, steps=12,
             **THRESHOLD),
        dict(algorithm_type="dpmsolver", solver_order=2, solver_type="heun", final_sigmas_type="sigma_min", steps=12,
             **THRESHOLD),
        dict(algorithm_type="dpmsolver++", solver_order=3, lower_order_final=False, euler_at_final=True, steps=10,
             **THRESHOLD),
        dict(algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
             flow_shift=3.0, steps=12, **THRESHOLD),
        dict(algorithm_type="dpmsolver++", solver_order=2, **dict(THRESHOLD, dynamic_thresholding_ratio=0.995,
                                                                  sample_max_value=1.0), steps=12),
    ]
    return configs


@pytest.mark.parametrize("config", _dpm_configs(), ids=_name)
def test_dpm_solver_thresholding_matches_diffusers(unet, config):
    """thresholding=True in FastDiffDPMSolverMultistepScheduler: every algorithm type, orders 1-3, the three
    prediction types, several step counts (the SDE variants on the same variance_noise) give diffusers' samples."""
    config = dict(config)
    steps = config.pop("steps")
    noises = None
    if config["algorithm_type"].startswith("sde"):
        noises = torch.randn(steps, *_latents().shape, generator=torch.Generator().manual_seed(4))
    err, seen = _parity(unet, DPMSolverMultistepScheduler, FastDiffDPMSolverMultistepScheduler, config, steps, noises)
    assert seen["calls"] == steps and seen["clipped"] >= steps // 2, seen  # thresholding at work
    assert err <= TOL, err


@pytest.mark.parametrize("config", [
    dict(algorithm_type="sde-dpmsolver++", solver_order=2),
    dict(algorithm_type="sde-dpmsolver++", solver_order=3, prediction_type="sample"),
    dict(algorithm_type="sde-dpmsolver", solver_order=2, final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    dict(algorithm_type="sde-dpmsolver", solver_order=1, final_sigmas_type="sigma_min")], ids=_name)
def test_dpm_solver_thresholding_in_kernel_noise_is_diffusers_on_that_noise(unet, monkeypatch, config):
    """Thresholded SDE steps without variance_noise draw fastdiff's per-sample stream 1 + step index in the update
    pass: diffusers fed that noise through its randn_tensor gives the same samples."""
    from diffusers.schedulers import scheduling_dpmsolver_multistep as module

    config = dict(config, **THRESHOLD)
    seeds = [5, 6]
    x = _latents()
    ours_sched = FastDiffDPMSolverMultistepScheduler(**config)
    ours_sched.set_seeds(seeds)
    ours = _dpm_loop(unet, ours_sched, x, 10)
    step = iter(range(100))
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: fastdiff.ops.randn(seeds, 1 + next(step), shape[1:]).to(kw.get("dtype")))
    theirs_sched = DPMSolverMultistepScheduler(**config)
    seen = _clip_counter(theirs_sched)
    theirs = _dpm_loop(unet, theirs_sched, x, 10)
    assert seen["clipped"] >= 5, seen
    err = _relative(ours, theirs)
    assert err <= TOL, err


def _unipc_configs():
    configs = []
    for solver_type in ("bh1", "bh2"):
        for order in (1, 2, 3):
            for k, prediction in enumerate(PREDICTIONS):
                steps = STEPS[(order + k) % 3]
                # diffusers' bh1 x0-form step to sigma = 0 gives NaN (B(h) = hh = -inf): bh1 ends at sigma_min
                final = dict(final_sigmas_type="sigma_min") if solver_type == "bh1" else {}
                configs.append(dict(solver_type=solver_type, solver_order=order, prediction_type=prediction,
                                    steps=steps, **final, **THRESHOLD))
    configs += [
        dict(solver_order=2, disable_corrector=[0, 3], timestep_spacing="trailing", steps=12, **THRESHOLD),
        dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min", steps=12, **THRESHOLD),
        dict(solver_order=2, lower_order_final=False, final_sigmas_type="sigma_min", steps=12, **THRESHOLD),
        dict(solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, steps=12,
             **THRESHOLD),
    ]
    return configs


@pytest.mark.parametrize("config", _unipc_configs(), ids=_name)
def test_unipc_thresholding_matches_diffusers(unet, config):
    """thresholding=True in FastDiffUniPCMultistepScheduler (two passes a step): bh1 / bh2, orders 1-3, the
    prediction types, several step counts, disable_corrector, give diffusers' samples."""
    config = dict(config)
    steps = config.pop("steps")
    err, seen = _parity(unet, UniPCMultistepScheduler, FastDiffUniPCMultistepScheduler, config, steps)
    assert seen["calls"] == steps and seen["clipped"] >= steps // 2, seen
    assert err <= TOL, err


def _noise_form_configs():
    configs = []
    for solver_type in ("bh1", "bh2"):
        for order in (1, 2, 3):
            for k, prediction in enumerate(PREDICTIONS):
                configs.append(dict(predict_x0=False, solver_type=solver_type, solver_order=order,
                                    prediction_type=prediction, final_sigmas_type="sigma_min",
                                    steps=STEPS[(order + k) % 3]))
    configs += [
        dict(predict_x0=False, solver_order=2, disable_corrector=[1, 2], steps=12, final_sigmas_type="sigma_min"),
        dict(predict_x0=False, solver_order=3, use_karras_sigmas=True, steps=12, final_sigmas_type="sigma_min"),
        dict(predict_x0=False, solver_order=3, lower_order_final=False, steps=20, final_sigmas_type="sigma_min"),
        # diffusers' noise form ignores thresholding (it thresholds x0 predictions only): so does ours
        dict(predict_x0=False, solver_order=2, steps=12, final_sigmas_type="sigma_min", **THRESHOLD),
    ]
    return configs


@pytest.mark.parametrize("config", _noise_form_configs(), ids=_name)
def test_unipc_noise_prediction_form_matches_diffusers(unet, config):
    """predict_x0=False (diffusers' multistep_uni_p/c_bh_update on eps): bh1 / bh2, orders 1-3, the prediction
    types, several step counts give diffusers' samples; on sample predictions step by step (see _forced_parity:
    their free runs differ by up to 8e-5, as much as diffusers' own on latents 1e-7 apart)."""
    config = dict(config)
    steps = config.pop("steps")
    if config.get("prediction_type") == "sample":
        err = _forced_parity(unet, UniPCMultistepScheduler, FastDiffUniPCMultistepScheduler, config, steps)
    else:
        err, seen = _parity(unet, UniPCMultistepScheduler, FastDiffUniPCMultistepScheduler, config, steps)
        assert seen["calls"] == 0
    assert err <= TOL, err


@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, solver_type="bh1"),
                                    dict(solver_order=2, prediction_type="v_prediction")], ids=_name)
def test_unipc_noise_form_to_sigma_zero_is_the_first_order_limit(unet, config):
    """predict_x0=False with final_sigmas_type="zero" (diffusers' default): every step but the last is diffusers';
    the last (h = inf, where diffusers' own noise-form step gives 0 * inf = NaN) is its first-order limit
    alpha' / alpha (x^c - sigma eps) from diffusers' corrected state x^c and its eps prediction."""
    config = dict(config, predict_x0=False)
    theirs, ours = UniPCMultistepScheduler(**config), FastDiffUniPCMultistepScheduler(**config)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    assert float(theirs.sigmas[-1]) == 0.0
    x = y = _latents()
    with torch.no_grad():
        for i, t in enumerate(theirs.timesteps):
            last = i == len(theirs.timesteps) - 1
            if not last:
                assert _relative(y, x) <= TOL
            out = unet(x, t).sample
            x = theirs.step(out, t, x).prev_sample
            y = ours.step(unet(y, t).sample, t, y).prev_sample
    alpha, sigma = (float(v) for v in theirs._sigma_to_alpha_sigma_t(theirs.sigmas[-2].double()))
    alpha_end = float(theirs._sigma_to_alpha_sigma_t(theirs.sigmas[-1].double())[0])
    limit = alpha_end / alpha * (theirs.last_sample - sigma * theirs.model_outputs[-1])
    assert torch.isfinite(y).all()
    assert _relative(y, limit) <= TOL


@pytest.mark.parametrize("cls,config", [
    (UniPCMultistepScheduler, dict(solver_order=3, **THRESHOLD)),
    (UniPCMultistepScheduler, dict(solver_order=3, predict_x0=False, final_sigmas_type="sigma_min")),
    (DPMSolverMultistepScheduler, dict(solver_order=3, **THRESHOLD)),
    (DPMSolverMultistepScheduler, dict(solver_order=2, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                       **THRESHOLD))], ids=lambda v: v.__name__ if isinstance(v, type) else _name(v))
def test_a_run_started_mid_schedule_matches_diffusers(unet, cls, config):
    """img2img pipelines start at timesteps[k:] with set_begin_index(k): the thresholded and noise-form steps warm
    their orders up from there, as diffusers' history does."""
    ours_cls = FastDiffUniPCMultistepScheduler if cls is UniPCMultistepScheduler else \
        FastDiffDPMSolverMultistepScheduler

    def loop(sched):
        sched.set_timesteps(14)
        sched.set_begin_index(5)
        x = _latents() * 3.0
        with torch.no_grad():
            for t in sched.timesteps[5:]:
                x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        return x

    want = loop(cls(**config))
    assert _relative(loop(ours_cls(**config)), want) <= TOL


@pytest.mark.parametrize("name,config", [
    ("FastDiffDPMSolverMultistepScheduler", dict(solver_order=3, **THRESHOLD)),
    ("FastDiffDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min",
                                                 **THRESHOLD)),
    ("FastDiffDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3, **THRESHOLD)),
    ("FastDiffUniPCMultistepScheduler", dict(solver_order=3, **THRESHOLD)),
    ("FastDiffUniPCMultistepScheduler", dict(solver_order=3, predict_x0=False, final_sigmas_type="sigma_min"))],
    ids=lambda v: v if isinstance(v, str) else _name(v))
def test_new_steps_are_the_general_path_bit_for_bit(monkeypatch, name, config):
    """The thresholded (two-pass) and noise-form steps call the kernel directly with their kept rows: the samples
    are those of the general, fully checked sampler_step calls bit for bit, on a first and a second run."""
    import fastdiff.adapters.diffusers as fd
    from fastdiff.adapters.diffusers._fused import _FusedStep

    def loop(sched):
        sched.set_timesteps(8)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step((sched.scale_model_input(x, t) * 1.7).sin() * 3.0, t, x).prev_sample
        return x

    sched = getattr(fd, name)(**config)
    sched.set_seeds(5)
    fast = [loop(sched), loop(sched)]
    resolve = _FusedStep._resolve
    monkeypatch.setattr(_FusedStep, "_resolve", lambda self, x: (*resolve(self, x)[:2], None,
                                                                 *resolve(self, x)[3:]))  # no kernel: general path
    general = getattr(fd, name)(**config)
    general.set_seeds(5)
    for got in fast:
        assert torch.equal(got, loop(general))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: FastDiffUniPCMultistepScheduler(solver_p=DPMSolverMultistepScheduler()), NotImplementedError,
     "solver_p"),
    (lambda: FastDiffUniPCMultistepScheduler(predict_x0=False, prediction_type="flow_prediction"), ValueError,
     "prediction_type='flow_prediction'"),
    (lambda: FastDiffUniPCMultistepScheduler(thresholding=True, sample_max_value=0.5), ValueError,
     "sample_max_value must be .* got 0.5"),
    (lambda: FastDiffDPMSolverMultistepScheduler(thresholding=True, sample_max_value=float("inf")), ValueError,
     "sample_max_value must be .* got inf"),
    (lambda: FastDiffDPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=1.5), ValueError,
     "dynamic_thresholding_ratio must be .* got 1.5"),
    (lambda: FastDiffDPMSolverMultistepScheduler(algorithm_type="dpmsolver", prediction_type="flow_prediction",
                                                 final_sigmas_type="sigma_min", thresholding=True), ValueError,
     "prediction_type='flow_prediction'"),
])
def test_refusals_name_the_argument(make, exc, match):
    sched = make()
    sched.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(exc, match=match):
        sched.step(torch.randn(2, 3, 4, 4), sched.timesteps[0], x)
