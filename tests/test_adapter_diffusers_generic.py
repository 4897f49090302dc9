"""fastdiff.adapters.diffusers.FastDiffScheduler: one scheduler over fastdiff's method registry, from each supported
diffusers scheduler's config, against that scheduler on the same tiny random UNet2DModel, grid and initial latents
(the stochastic ones with diffusers fed fastdiff's noise). Tolerance: max |ours - theirs| <= 1e-5 max |theirs| in
float32 (measured 2e-7 to 7e-7 on an AMD EPYC)."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDPMPipeline  # noqa: E402
from diffusers.schedulers import (scheduling_ddpm, scheduling_dpmsolver_sde,  # noqa: E402
                                  scheduling_euler_ancestral_discrete, scheduling_k_dpm_2_ancestral_discrete)

import fastdiff  # noqa: E402
from fastdiff.adapters.diffusers import FastDiffScheduler  # noqa: E402
from fastdiff.sampling.core.stage import draw_stream  # noqa: E402
from test_adapter_diffusers import tiny_unet  # noqa: E402

RTOL = 1e-5
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # Stable Diffusion's training betas


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _ours(ref):
    """FastDiffScheduler from ``ref``'s config as a pretrained pipeline's carries it (with _class_name)."""
    return FastDiffScheduler.from_config({**ref.config, "_class_name": type(ref).__name__})


def _loop(unet, sched, x, steps, start=0, init=None, before_step=None):
    """A pipeline's loop; ``start`` > 0: img2img from step ``start`` (set_begin_index, add_noise of ``init``)."""
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if start:
        sched.set_begin_index(start * sched.order)
        timesteps = timesteps[start * sched.order:]
        x = sched.add_noise(init, x, timesteps[:1])
    else:
        x = x * getattr(sched, "init_noise_sigma", 1.0)
    x0s = []
    with torch.no_grad():
        for t in timesteps:
            # (flow matching's schedulers have no scale_model_input)
            out = unet(sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x, t).sample
            if before_step is not None:
                before_step(sched)
            res = sched.step(out, t, x)
            x = res.prev_sample
            x0s.append(getattr(res, "pred_original_sample", None))
    return x, x0s


def _close(got, want):
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= RTOL, f"max relative error {err:.3g}"


def _x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))


DETERMINISTIC = [
    ("HeunDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True, **SD15)),
    ("HeunDiscreteScheduler", dict(prediction_type="v_prediction")),
    ("LMSDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="trailing", **SD15)),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", dict(prediction_type="v_prediction", use_exponential_sigmas=True)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, **SD15)),
    ("EDMEulerScheduler", {}),
    ("EDMEulerScheduler", dict(prediction_type="v_prediction", sigma_schedule="exponential")),
    ("EDMDPMSolverMultistepScheduler", {}),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, **SD15)),  # SD 1.5's
    ("PNDMScheduler", dict(skip_prk_steps=True)),  # steps_offset=0: a last step of zero length, taken
    ("DDIMScheduler", dict(clip_sample=False)),
    ("DDIMScheduler", dict(clip_sample=False, prediction_type="v_prediction", set_alpha_to_one=False)),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, **SD15)),
    ("DEISMultistepScheduler", dict(solver_order=1)),
    ("DPMSolverSinglestepScheduler", dict(solver_order=1)),
]


@pytest.mark.parametrize("name,config", DETERMINISTIC, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DETERMINISTIC)])
def test_deterministic_schedulers_match_diffusers(unet, name, config):
    ref = getattr(diffusers, name)(**config)
    want, want_x0 = _loop(unet, ref, _x(), 9)
    ours = _ours(ref)
    got, got_x0 = _loop(unet, ours, _x(), 9)
    _close(got, want)
    assert len(ours.timesteps) == len(ref.timesteps) and torch.equal(ours.timesteps, ref.timesteps)
    for mine, theirs in zip(got_x0, want_x0):  # the x0 estimate, where the stage's side output is free for it
        if mine is not None and theirs is not None:
            _close(mine, theirs)
    # x0 is the side output but where the stage's side buffer holds another term (LMS, DEIS: eps)
    assert any(m is not None for m in got_x0) == (name not in ("LMSDiscreteScheduler", "DEISMultistepScheduler"))


# diffusers' DEIS (logrho, orders 1-3) and singlestep DPM-Solver (orders 1-3: its steps split into 3/2/1-stage groups
# by the step count, the inner points on its grid) over step counts of each remainder
MULTISTAGE = [
    ("DEISMultistepScheduler", dict(solver_order=1), 7),
    ("DEISMultistepScheduler", {}, 9),
    ("DEISMultistepScheduler", dict(solver_order=3), 10),
    ("DEISMultistepScheduler", dict(solver_order=3), 16),  # past its lower_order_final's 15 steps
    ("DEISMultistepScheduler", dict(solver_order=3, prediction_type="v_prediction", lower_order_final=False), 8),
    ("DEISMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True, **SD15), 11),  # a zero-length last step
    ("DPMSolverSinglestepScheduler", dict(solver_order=1), 5),
    ("DPMSolverSinglestepScheduler", {}, 8),
    ("DPMSolverSinglestepScheduler", {}, 9),
    ("DPMSolverSinglestepScheduler", dict(solver_type="heun", prediction_type="v_prediction"), 7),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3), 9),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3), 10),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, solver_type="heun"), 11),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, prediction_type="v_prediction"), 13),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, use_karras_sigmas=True, **SD15), 12),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min",
                                          use_karras_sigmas=True), 12),  # full-order groups to a zero-length end
    ("DPMSolverSinglestepScheduler", dict(solver_order=2, algorithm_type="dpmsolver", solver_type="heun",
                                          final_sigmas_type="sigma_min", lower_order_final=False), 8),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                          prediction_type="v_prediction"), 11),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, algorithm_type="dpmsolver", solver_type="heun",
                                          final_sigmas_type="sigma_min"), 9),
]


@pytest.mark.parametrize("name,config,steps", MULTISTAGE,
                         ids=[f"{n}-{i}-{s}" for i, (n, _, s) in enumerate(MULTISTAGE)])
def test_deis_and_singlestep_dpm_solver_match_diffusers(unet, name, config, steps):
    ours = _ours(getattr(diffusers, name)(**config))  # before diffusers' set_timesteps rewrites lower_order_final
    want, _ = _loop(unet, getattr(diffusers, name)(**config), _x(), steps)
    got, _ = _loop(unet, ours, _x(), steps)
    _close(got, want)
    assert len(ours.timesteps) == steps
    order = config.get("solver_order", 2)
    assert ours.config.method == ("deis" if name == "DEISMultistepScheduler" else "dpm_singlestep")
    assert ours.config.method_options["order"] == order


@pytest.mark.parametrize("name,config,start", [("HeunDiscreteScheduler", {}, 3), ("KDPM2DiscreteScheduler", {}, 2),
                                               ("DPMSolverMultistepScheduler", {}, 4),
                                               ("DEISMultistepScheduler", dict(solver_order=3), 2),
                                               ("DPMSolverSinglestepScheduler", dict(solver_order=3), 3)])
def test_img2img_start_matches_diffusers(unet, name, config, start):
    """set_begin_index(t_start * order) and add_noise, as StableDiffusionImg2ImgPipeline calls them; the method
    starts at that step (DPM-Solver's and DEIS's warm-up restarts there, as diffusers' does; the singlestep
    DPM-Solver's begin index starts one of its groups: [3, 3, 1, 1] over 8 steps)."""
    init = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    ref = getattr(diffusers, name)(**config)
    want, _ = _loop(unet, ref, _x(), 8, start=start, init=init)
    got, _ = _loop(unet, _ours(ref), _x(), 8, start=start, init=init)
    _close(got, want)


@pytest.mark.parametrize("steps,start", [(16, 4), (16, 12), (10, 3)])
def test_deis_img2img_counts_lower_order_final_over_the_whole_schedule(unet, steps, start):
    """diffusers' DEIS lowers its last orders only when the whole schedule has fewer than 15 steps, whatever the
    begin index: 16 steps started at 4 or 12 (12 or 4 left) keep the full order to the end."""
    init = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    ref = diffusers.DEISMultistepScheduler(solver_order=3)
    want, _ = _loop(unet, ref, _x(), steps, start=start, init=init)
    got, _ = _loop(unet, _ours(ref), _x(), steps, start=start, init=init)
    _close(got, want)


def test_lms_from_a_begin_index_is_refused(unet):
    ref = diffusers.LMSDiscreteScheduler()
    with pytest.raises(ValueError, match=r"begin index 3: diffusers' LMSDiscreteScheduler started mid-schedule"):
        _loop(unet, _ours(ref), _x(), 8, start=3, init=torch.zeros(2, 3, 8, 8))


def test_singlestep_begin_index_inside_a_group_is_refused(unet):
    """Inside a group diffusers lowers the order and keeps the whole schedule's groups; FastDiffScheduler restarts
    the method at a group's start, so it refuses a begin index elsewhere, naming the steps it takes."""
    ref = diffusers.DPMSolverSinglestepScheduler(solver_order=3)
    with pytest.raises(ValueError, match=r"begin index 2 falls inside a group .*steps \[0, 3, 6, 7\]"):
        _loop(unet, _ours(ref), _x(), 8, start=2, init=torch.zeros(2, 3, 8, 8))


def _feed(monkeypatch, module, stream_of, seeds):
    """diffusers' randn_tensor in ``module`` answered with fastdiff's noise of stream stream_of(scheduler)."""
    state = {}

    def randn_tensor(shape, **kw):
        return fastdiff.ops.randn(seeds, stream_of(state["sched"]), shape[1:]).to(kw.get("dtype") or torch.float32)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return lambda sched: state.__setitem__("sched", sched)


@pytest.mark.parametrize("name,config,module,stream_of", [
    ("KDPM2AncestralDiscreteScheduler", {}, scheduling_k_dpm_2_ancestral_discrete,
     lambda s: draw_stream((s.step_index - 1) // 2)),  # its draw: step i's second stage, index 2i + 1
    ("KDPM2AncestralDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction"),
     scheduling_k_dpm_2_ancestral_discrete, lambda s: draw_stream((s.step_index - 1) // 2)),
    ("EulerAncestralDiscreteScheduler", {}, scheduling_euler_ancestral_discrete, lambda s: draw_stream(s.step_index)),
    ("DDPMScheduler", dict(clip_sample=False), scheduling_ddpm,
     lambda s: draw_stream(s.timesteps.tolist().index(s.fd_timestep))),
])
def test_ancestral_schedulers_match_diffusers_on_fastdiff_noise(unet, monkeypatch, name, config, module, stream_of):
    seeds = [3, 4]
    ref = getattr(diffusers, name)(**config)
    ours = _ours(ref)
    ours.set_seeds(seeds)
    got, _ = _loop(unet, ours, _x(), 7)
    hook = _feed(monkeypatch, module, stream_of, seeds)
    original = type(ref).step

    def step(self, out, t, x, **kw):  # (DDPM's stream is its timestep's index)
        self.fd_timestep = int(t)
        return original(self, out, t, x, **kw)

    monkeypatch.setattr(type(ref), "step", step)
    want, _ = _loop(unet, ref, _x(), 7, before_step=hook)
    _close(got, want)


def test_dpmpp_sde_matches_diffusers_on_fastdiff_brownian_noise(unet, monkeypatch):
    """DPMSolverSDEScheduler's Brownian tree replaced by fastdiff's two draws per step: the first stage's xi_0 over
    [sigma_m, sigma], the second's rho xi_0 + sqrt(1 - rho^2) xi_1 over [sigma', sigma], the increments of one
    Brownian path (rho^2 = (sigma - sigma_m) / (sigma - sigma'))."""
    seeds = [5, 6]
    ref = diffusers.DPMSolverSDEScheduler(use_karras_sigmas=True)
    ours = _ours(ref)
    ours.set_seeds(seeds)
    got, _ = _loop(unet, ours, _x(), 6)
    calls = []

    class Tree:
        def __init__(self, *args, **kw):
            pass

        def __call__(self, sigma, sigma_next):
            i = ref.step_index // 2
            first = fastdiff.ops.randn(seeds, draw_stream(i, 0), (3, 8, 8))
            if ref.state_in_first_order:
                calls.append(i)
                self.sigma_m = float(sigma_next)
                return first
            rho = math.sqrt((float(sigma) - self.sigma_m) / (float(sigma) - float(sigma_next)))
            return rho * first + math.sqrt(1 - rho * rho) * fastdiff.ops.randn(seeds, draw_stream(i, 1), (3, 8, 8))

    monkeypatch.setattr(scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", Tree)
    want, _ = _loop(unet, ref, _x(), 6)
    assert calls == list(range(5))  # every step but the last (to sigma = 0) draws
    _close(got, want)


def test_sample_b_alone_is_sample_b_of_the_batch(unet):
    x = _x()
    batch = _ours(diffusers.KDPM2AncestralDiscreteScheduler())
    batch.set_seeds([8, 9])
    one = _ours(diffusers.KDPM2AncestralDiscreteScheduler())
    one.set_seeds([9])

    def run(sched, x):  # the UNet one image at a time: its float32 sums depend on the batch size
        sched.set_timesteps(5)
        x = x * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                xs = sched.scale_model_input(x, t)
                out = torch.cat([unet(xs[b:b + 1], t).sample for b in range(len(x))])
                x = sched.step(out, t, x).prev_sample
        return x

    assert torch.equal(run(one, x[1:]), run(batch, x)[1:])


def test_pipelines_run_with_it(unet):
    """DDIMPipeline (eta passed to step) gives diffusers' images; DDPMPipeline with a PNDM config (SD 1.5's default
    scheduler; diffusers' own PNDMScheduler.step takes no generator, which DDPMPipeline passes) gives PNDM's loop."""
    pipe = DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
        pipe.scheduler = FastDiffScheduler.from_config(pipe.scheduler.config)  # no _class_name: found by its keys
        got = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
    assert pipe.scheduler.config.method == "ddim"
    _close(torch.from_numpy(got), torch.from_numpy(want))
    pndm = diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1, **SD15)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # DDPMPipeline's initial noise
    want = (_loop(unet, pndm, x, 7)[0] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    pipe = DDPMPipeline(unet=unet, scheduler=FastDiffScheduler.from_config(pndm))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        got = pipe(batch_size=2, num_inference_steps=7, generator=torch.Generator().manual_seed(1),
                   output_type="np").images
    assert pipe.scheduler.config.method == "pndm"
    _close(torch.from_numpy(got), want)


def test_own_config_round_trips_and_a_method_can_be_chosen(unet):
    ours = _ours(diffusers.HeunDiscreteScheduler(use_karras_sigmas=True))
    again = FastDiffScheduler.from_config(ours.config)
    assert again.config.method == "heun" and again.order == 2
    _close(_loop(unet, again, _x(), 6)[0], _loop(unet, ours, _x(), 6)[0])
    # any registered method over a grid scheduler's grid: DPM-Solver++(2M) over EDMEuler's grid and preconditioning
    # is diffusers' EDMDPMSolverMultistepScheduler
    mine = FastDiffScheduler(method="dpmpp_2m", grid_scheduler="EDMEulerScheduler")
    _close(_loop(unet, mine, _x(), 8)[0], _loop(unet, diffusers.EDMDPMSolverMultistepScheduler(), _x(), 8)[0])


@pytest.mark.parametrize("name,config,match", [
    ("SASolverScheduler", dict(algorithm_type="noise_prediction"), r"algorithm_type=.noise_prediction. .*needs "
                                                                   r"algorithm_type=.data_prediction."),
    ("UniPCMultistepScheduler", {}, "FastDiffUniPCMultistepScheduler"),
    ("DDIMScheduler", {}, r"clip_sample=True .*needs clip_sample=False"),
    ("DDPMScheduler", dict(clip_sample=False, variance_type="fixed_large"), "variance_type='fixed_large'"),
    ("PNDMScheduler", {}, "skip_prk_steps=False"),
    ("PNDMScheduler", dict(skip_prk_steps=True, prediction_type="v_prediction"), "prediction_type='v_prediction'"),
    ("DEISMultistepScheduler", dict(solver_order=4), r"solver_order=4 .*\(it takes 1, 2, 3\)"),
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++"),
     "algorithm_type='sde-dpmsolver\\+\\+' .*sde-dpmsolver\\+\\+'s noise"),
    ("DPMSolverSinglestepScheduler", dict(variance_type="learned"), "variance_type='learned'"),
    ("DPMSolverSinglestepScheduler", dict(thresholding=True), "thresholding=True"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
    ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3), "solver_order=3"),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True), "stochastic_sampling=True"),
])
def test_refusals_name_the_scheduler_or_option(name, config, match):
    with pytest.raises(ValueError, match=match):
        FastDiffScheduler.from_config(getattr(diffusers, name)(**config))


def test_argument_errors():
    with pytest.raises(ValueError, match="LMSDiscreteScheduler, KDPM2DiscreteScheduler, "
                                         "KDPM2AncestralDiscreteScheduler share its keys"):
        FastDiffScheduler.from_config(diffusers.LMSDiscreteScheduler().config)  # no _class_name: ambiguous
    with pytest.raises(ValueError, match="timestep_spacing='trailing' steps from each timestep"):
        _ours(diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")).set_timesteps(7)
    with pytest.raises(ValueError, match=r"method_options \['eta'\] are not options of method='heun'"):
        FastDiffScheduler(method="heun", method_options={"eta": 1.0})
    with pytest.raises(RuntimeError, match="makes 3 model evaluations .* timesteps hold 2"):
        FastDiffScheduler(method="heun", grid_scheduler="EulerDiscreteScheduler").set_timesteps(2)
    sched = _ours(diffusers.HeunDiscreteScheduler())
    sched.set_timesteps(4)
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="s_churn=0.5.* is not supported"):
        sched.step(x, sched.timesteps[0], x, s_churn=0.5)
    with pytest.raises(ValueError, match="eta=1.0 applies to method='ddim'"):
        sched.step(x, sched.timesteps[0], x, eta=1.0)
    sched.set_begin_index(1)
    with pytest.raises(ValueError, match="begin index 1 is not the first stage of a step"):
        sched.step(x, sched.timesteps[1], x)
