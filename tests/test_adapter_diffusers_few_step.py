"""FastDiffScheduler.from_config of diffusers' few-step schedulers (LCM, TCD, consistency models, flow-matching LCM,
flow-map Euler) against the schedulers themselves on the same tiny random UNet2DModel, grid, initial latents and
noise (diffusers' randn_tensor answered with fastdiff's stream of the step), and fastdiff.sample with the same
method on the equivalent path and grid against the same diffusers loop. Tolerance: max |ours - theirs| <= 1e-5
max |theirs| in float32 (measured: see each test)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import (scheduling_consistency_models, scheduling_flow_match_lcm,  # noqa: E402
                                  scheduling_lcm, scheduling_tcd)

import fastdiff  # noqa: E402
from fastdiff.adapters.diffusers import DiffusersModel, FastDiffScheduler  # noqa: E402
from fastdiff.adapters.k_diffusion import DenoiserModel  # noqa: E402
from fastdiff.sampling.core.stage import draw_stream  # noqa: E402
from fastdiff.sampling.methods.few_step import FlowMapModel  # noqa: E402
from test_adapter_diffusers import tiny_unet  # noqa: E402
from test_adapter_diffusers_generic import _close, _feed, _x  # noqa: E402

SEEDS = [3, 4]
MODULES = {"LCMScheduler": scheduling_lcm, "TCDScheduler": scheduling_tcd,
           "CMStochasticIterativeScheduler": scheduling_consistency_models,
           "FlowMatchLCMScheduler": scheduling_flow_match_lcm}


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _loop(unet, sched, x, steps, before_step=None, **step_kw):
    """A pipeline's loop (flow matching's schedulers have no scale_model_input; step_kw: TCD's eta)."""
    sched.set_timesteps(steps)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x, t).sample
            if before_step is not None:
                before_step(sched)
            x = sched.step(out, t, x, **step_kw).prev_sample
    return x


def _theirs(unet, monkeypatch, name, config, steps, **step_kw):
    """diffusers' scheduler fed fastdiff's noise: step i draws stream draw_stream(i)."""
    ref = getattr(diffusers, name)(**config)
    hook = None
    if name in MODULES:
        hook = _feed(monkeypatch, MODULES[name], lambda s: draw_stream(s.step_index), SEEDS)
    return _loop(unet, ref, _x(), steps, before_step=hook, **step_kw), ref


def _ours(ref, unet, steps, **step_kw):
    ours = FastDiffScheduler.from_config(ref)
    ours.set_seeds(SEEDS)
    return _loop(unet, ours, _x(), steps, **step_kw), ours


CASES = [  # (scheduler, config, steps, step() keywords, method)
    ("LCMScheduler", {}, 1, {}, "lcm"),
    ("LCMScheduler", {}, 4, {}, "lcm"),
    ("LCMScheduler", dict(prediction_type="v_prediction", timestep_scaling=4.0, original_inference_steps=20), 6, {},
     "lcm"),
    ("LCMScheduler", dict(prediction_type="sample", beta_schedule="linear", beta_start=1e-4, beta_end=0.02), 3, {},
     "lcm"),
    ("TCDScheduler", {}, 1, {}, "tcd"),
    ("TCDScheduler", {}, 4, {}, "tcd"),  # step()'s default eta = 0.3
    ("TCDScheduler", {}, 4, dict(eta=0.0), "tcd"),  # deterministic
    ("TCDScheduler", dict(prediction_type="v_prediction"), 5, dict(eta=0.8), "tcd"),
    ("TCDScheduler", dict(prediction_type="sample"), 3, dict(eta=1.0), "tcd"),
    ("CMStochasticIterativeScheduler", dict(clip_denoised=False), 1, {}, "cm_multistep"),
    ("CMStochasticIterativeScheduler", dict(clip_denoised=False), 3, {}, "cm_multistep"),
    ("CMStochasticIterativeScheduler", dict(clip_denoised=False, num_train_timesteps=5, s_noise=0.7,
                                            sigma_min=0.01, sigma_data=0.7), 5, {}, "cm_multistep"),  # ends on
    # a zero-length step sigma_min -> sigma_min
    ("FlowMatchLCMScheduler", dict(shift=3.0), 4, {}, "lcm"),
    ("FlowMatchLCMScheduler", dict(use_karras_sigmas=True), 3, {}, "lcm"),
    ("FlowMapEulerDiscreteScheduler", dict(shift=3.0), 5, {}, "euler"),
]


@pytest.mark.parametrize("name,config,steps,step_kw,method", CASES,
                         ids=[f"{c[0]}-{i}-{c[2]}" for i, c in enumerate(CASES)])
def test_few_step_schedulers_match_diffusers_on_fastdiff_noise(unet, monkeypatch, name, config, steps, step_kw,
                                                               method):
    """Measured: max relative error 7e-8 to 2.5e-6 (the consistency model's from sigma_max = 80)."""
    want, ref = _theirs(unet, monkeypatch, name, config, steps, **step_kw)
    got, ours = _ours(ref, unet, steps, **step_kw)
    assert ours.config.method == method
    assert torch.equal(ours.timesteps, ref.timesteps)
    _close(got, want)


def test_lcm_pred_original_sample_is_lcms_denoised(unet):
    """LatentConsistencyModelPipeline decodes step()'s second output, LCM's denoised sample (c_skip x + c_out x0):
    the drop-in's side output is that (the last one is the result)."""
    ref = diffusers.LCMScheduler()
    ours = FastDiffScheduler.from_config(ref)
    for sched in (ref, ours):
        sched.set_timesteps(3)
    x = _x()
    with torch.no_grad():
        for t in ref.timesteps:  # both steps from diffusers' state (their noise differs)
            out = unet(x, t).sample
            prev_ours, denoised_ours = ours.step(out, t, x, return_dict=False)
            x, denoised = ref.step(out, t, x, return_dict=False)
            _close(denoised_ours, denoised)
    assert torch.equal(denoised_ours, prev_ours)


def test_tcd_eta_in_step_overrides_the_config(unet):
    """Pipelines pass eta to step() (SD's default 0.0); without it diffusers' step uses 0.3, as the drop-in's
    method_options do."""
    ref = diffusers.TCDScheduler()
    ours = FastDiffScheduler.from_config(ref)
    assert ours.config.method_options == {"eta": 0.3}
    det, _ = _loop(unet, diffusers.TCDScheduler(), _x(), 4, eta=0.0)
    got, _ = _loop(unet, ours, _x(), 4, eta=0.0)
    _close(got, det)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0 and <= 1 for method='tcd', got 1.5"):
        _loop(unet, FastDiffScheduler.from_config(ref), _x(), 2, eta=1.5)


@pytest.mark.parametrize("name,config,steps,method,options", [
    ("LCMScheduler", {}, 4, "lcm", dict(timestep_scaling=10.0)),
    ("LCMScheduler", dict(prediction_type="v_prediction", timestep_scaling=3.0), 3, "lcm",
     dict(timestep_scaling=3.0)),
    ("TCDScheduler", {}, 4, "tcd", dict(eta=0.3)),
    ("TCDScheduler", dict(prediction_type="sample"), 5, "tcd", dict(eta=0.6)),
    ("FlowMatchLCMScheduler", dict(shift=3.0), 4, "lcm", {}),
])
def test_sample_on_the_training_path_equals_the_diffusers_loop(unet, monkeypatch, name, config, steps, method,
                                                               options):
    """fastdiff.sample(method=...) with DiffusersModel (DiscreteVP at the training timesteps, CondOT for flow
    matching) on diffusers' grid: LCM's ends at the data (its last step returns the denoised sample), TCD's at
    training timestep 0."""
    eta = options.get("eta")
    want, ref = _theirs(unet, monkeypatch, name, config, steps, **({"eta": eta} if eta is not None else {}))
    model = DiffusersModel(unet, ref)
    if name == "FlowMatchLCMScheduler":
        grid = [1.0 - float(s) for s in ref.sigmas]
    else:
        end = {"LCMScheduler": -1, "TCDScheduler": 0}[name]
        grid = [model.path.time(float(tau)) for tau in [*ref.timesteps.tolist(), end]]
    got = fastdiff.sample(model, None, noise=_x(), path=model.path, prediction=model.prediction, method=method,
                          timesteps=grid, seed=SEEDS, **options)
    _close(got, want)


@pytest.mark.parametrize("boundary_in_method", [False, True])
def test_cm_multistep_sample_equals_the_diffusers_loop(unet, monkeypatch, boundary_in_method):
    """CMStochasticIterativeScheduler's loop as fastdiff.sample on the VE path of its sigmas: the denoiser
    c_skip x + c_out F(c_in x, 250 log sigma) as an x0 model, or F itself with the method's sigma_data (its
    boundary-condition scalings)."""
    want, ref = _theirs(unet, monkeypatch, "CMStochasticIterativeScheduler", dict(clip_denoised=False), 4)
    sd, smin = ref.config.sigma_data, ref.config.sigma_min

    def denoiser(x, sigma):
        s = sigma.double().reshape(-1, 1, 1, 1)
        raw = unet((x / (s * s + sd * sd).sqrt()).float(), 250.0 * torch.log(sigma.double()).float()).sample
        if boundary_in_method:
            return raw
        c_skip, c_out = sd ** 2 / ((s - smin) ** 2 + sd ** 2), (s - smin) * sd / (s * s + sd * sd).sqrt()
        return (c_skip * x + c_out * raw).float()

    model = DenoiserModel(denoiser, ref.sigmas)
    kw = dict(sigma_data=sd) if boundary_in_method else {}
    with torch.no_grad():
        got = fastdiff.sample(model, None, noise=_x() * ref.sigmas[0], path=model.path, prediction="x0",
                              method="cm_multistep", timesteps=model.timesteps, seed=SEEDS, sigma_min=smin, **kw)
    _close(got, want)


def test_flow_map_euler_with_a_two_time_model(unet):
    """FlowMapEulerDiscreteScheduler's pipeline loop (AnyFlow's: the model gets r = sigmas[i + 1] T besides t) with
    a model of both times; the drop-in (method euler, whose sigmas and num_train_timesteps the loop reads) and
    fastdiff.sample of euler on CondOT with FlowMapModel (r the grid's next time; u = -output) both give it."""
    def net(x, t, r):  # a flow map model in diffusers' convention (eps - z on x = (1 - s) z + s eps)
        return unet(x, t).sample + 1e-3 * (t - r).reshape(-1, 1, 1, 1).to(x.dtype) * x

    def anyflow_loop(sched):
        sched.set_timesteps(5)
        x = _x()
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                r = sched.sigmas[i + 1] * sched.config.num_train_timesteps
                x = sched.step(net(x, t.expand(2), r.expand(2)), t, x).prev_sample
        return x

    ref = diffusers.FlowMapEulerDiscreteScheduler(shift=3.0)
    want = anyflow_loop(ref)
    _close(anyflow_loop(FastDiffScheduler.from_config(ref)), want)
    T = ref.config.num_train_timesteps
    model = FlowMapModel(lambda x, t, r, y: -net(x, (1 - t) * T, (1 - r) * T), [1.0 - float(s) for s in ref.sigmas])
    with torch.no_grad():
        got = fastdiff.sample(model, None, noise=_x(), path="condot", prediction="velocity", method="euler",
                              timesteps=model.grid)
    _close(got, want)


@pytest.mark.parametrize("name,config,match", [
    ("CMStochasticIterativeScheduler", {}, r"clip_denoised=True .*needs clip_denoised=False"),
    ("LCMScheduler", dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
    ("TCDScheduler", dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
    ("FlowMatchLCMScheduler", dict(scale_factors=[1.5]), "scale_factors=\\[1.5\\] .*upscaling"),
    ("LCMScheduler", dict(clip_sample=True), "clip_sample=True"),
])
def test_refusals_name_the_option(name, config, match):
    with pytest.raises(ValueError, match=match):
        FastDiffScheduler.from_config(getattr(diffusers, name)(**config))


def test_lcm_and_tcd_configs_without_a_class_name_are_ambiguous():
    with pytest.raises(ValueError, match="LCMScheduler, TCDScheduler share its keys"):
        FastDiffScheduler.from_config(diffusers.LCMScheduler().config)
