"""fastdiff.adapters.diffusers: the fused schedulers in diffusers' pipelines and loops against
diffusers' own DDIM and Euler schedulers, on a tiny randomly initialised UNet2DModel."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, EulerDiscreteScheduler, UNet2DModel  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.adapters.diffusers import FastDiffDDIMScheduler, FastDiffEulerScheduler  # noqa: E402


def tiny_unet():
    """A tiny randomly initialised UNet2DModel (3 x 8 x 8), the same for every test file that uses it."""
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=4)
    return model.eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _images(pipe, **kw):
    with torch.no_grad():
        return pipe(output_type="np", **kw).images


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True, "thresholding"])
def test_ddim_pipeline_same_images(unet, prediction_type, clip_sample):
    if clip_sample == "thresholding":  # dynamic thresholding (diffusers' _threshold_sample) of the x0 estimate
        sched = DDIMScheduler(prediction_type=prediction_type, thresholding=True, dynamic_thresholding_ratio=0.9,
                              sample_max_value=1.2)
    else:
        sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=clip_sample)
    pipe = DDIMPipeline(unet=unet, scheduler=sched).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    want = _images(pipe, batch_size=2, num_inference_steps=12, eta=0.0, generator=torch.Generator().manual_seed(0))
    pipe.scheduler = FastDiffDDIMScheduler.from_config(pipe.scheduler.config)
    got = _images(pipe, batch_size=2, num_inference_steps=12, eta=0.0, generator=torch.Generator().manual_seed(0))
    assert isinstance(pipe.scheduler, FastDiffDDIMScheduler)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


def test_ddpm_pipeline_with_euler_same_images(unet):
    pipe = DDPMPipeline(unet=unet, scheduler=EulerDiscreteScheduler()).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    want = _images(pipe, batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(1))
    pipe.scheduler = FastDiffEulerScheduler.from_config(pipe.scheduler.config)
    got = _images(pipe, batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


def _euler_loop(unet, sched, x):
    sched.set_timesteps(15)
    x = x * sched.init_noise_sigma
    x0s = []
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t).sample
            res = sched.step(out, t, x)
            x = res.prev_sample
            x0s.append(res.pred_original_sample)
    return x, x0s


@pytest.mark.parametrize("config", [dict(prediction_type="epsilon"), dict(prediction_type="v_prediction"),
                                    dict(prediction_type="epsilon", use_karras_sigmas=True),
                                    dict(prediction_type="epsilon", timestep_spacing="trailing")])
def test_euler_loop_matches_diffusers(unet, config):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    want, want_x0 = _euler_loop(unet, EulerDiscreteScheduler(**config), x)
    got, got_x0 = _euler_loop(unet, FastDiffEulerScheduler(**config), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_x0, want_x0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddim_eta_uses_fastdiff_noise_and_per_sample_seeds(unet):
    """eta = 1: the noise is fastdiff's stream of the per-sample seeds (diffusers' own step fed the
    same noise agrees), and image b of a batch is image b alone with the same seed."""
    seeds = [5, 6, 7]
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def loop(sched, x, seeds, fed_noise=False):
        sched.set_timesteps(8)
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                # the UNet one image at a time: its float32 sums depend on the batch size (2.7e-5 between
                # batches of 3 and 1 on an AMD EPYC), the scheduler's steps must not
                out = torch.cat([unet(x[b:b + 1], t).sample for b in range(len(x))])
                kw = dict(variance_noise=fastdiff.ops.randn(seeds, 1 + i, x.shape[1:])) if fed_noise else {}
                x = sched.step(out, t, x, eta=1.0, **kw).prev_sample
        return x

    ours = FastDiffDDIMScheduler(clip_sample=False)
    ours.set_seeds(seeds)
    got = loop(ours, x, seeds)
    want = loop(DDIMScheduler(clip_sample=False), x, seeds, fed_noise=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    alone = FastDiffDDIMScheduler(clip_sample=False)
    alone.set_seeds([6])
    assert torch.equal(loop(alone, x[1:2], [6]), got[1:2])
    # an int seed s gives sample b the seed s + b
    ints = FastDiffDDIMScheduler(clip_sample=False)
    ints.set_seeds(5)
    torch.testing.assert_close(loop(ints, x, 5), got, rtol=0, atol=0)


def test_ddim_pipeline_with_per_sample_generators_and_seeds(unet):
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    # DDIMPipeline's constructor converts any scheduler to DDIMScheduler: swap after construction
    pipe.scheduler = FastDiffDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_seeds([10, 11])
    batch = _images(pipe, batch_size=2, num_inference_steps=6, eta=0.5,
                    generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    pipe.scheduler.set_seeds([11])
    one = _images(pipe, batch_size=1, num_inference_steps=6, eta=0.5, generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(torch.from_numpy(one[0]), torch.from_numpy(batch[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,call,exc,match", [
    (lambda: FastDiffDDIMScheduler(prediction_type="flow"), lambda s, o, t, x: s.step(o, t, x), ValueError,
     "prediction_type='flow'"),
    (lambda: FastDiffDDIMScheduler(), lambda s, o, t, x: s.step(o, t, x, variance_noise=x), NotImplementedError,
     "variance_noise"),
    (lambda: FastDiffDDIMScheduler(), lambda s, o, t, x: s.step(o[:1], t, x), ValueError, "model_output has shape"),
    (lambda: FastDiffDDIMScheduler(), lambda s, o, t, x: (s.set_seeds([1, 2, 3]), s.step(o, t, x, eta=1.0)),
     ValueError, "per-sample seeds"),
    (lambda: FastDiffEulerScheduler(), lambda s, o, t, x: (s.set_seeds([1, 2, 3]), s.step(o, t, x, s_churn=1.0)),
     ValueError, "per-sample seeds"),
    (lambda: FastDiffEulerScheduler(prediction_type="flow"), lambda s, o, t, x: s.step(o, t, x), ValueError,
     "prediction_type='flow'"),
])
def test_errors_name_the_problem(make, call, exc, match):
    sched = make()
    sched.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(exc, match=match):
        call(sched, torch.randn(2, 3, 4, 4), sched.timesteps[0], x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_model_in_fastdiff_sample_matches_ddim_pipeline(unet, prediction_type):
    """DiffusersModel + fastdiff.sample(method="ddim") on the DDIM grid = DDIMPipeline with diffusers'
    own DDIMScheduler (eta 0, no clipping), same initial noise."""
    from fastdiff.adapters.diffusers import DiffusersModel

    sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(batch_size=2, num_inference_steps=10, eta=0.0, output_type="np",
                    generator=torch.Generator().manual_seed(4)).images
    model = DiffusersModel(unet, pipe.scheduler.config)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = fastdiff.sample(model, None, noise=noise, path=model.path, prediction=model.prediction, method="ddim",
                            timesteps=model.ddim_timesteps(10))
    got = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


def test_diffusers_model_conditioning_and_flow():
    from fastdiff.adapters.diffusers import DiffusersModel

    seen = {}

    class Transformer(torch.nn.Module):  # the calling convention of SD3-style transformers
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict=True):
            seen.update(t=timestep, c=encoder_hidden_states)
            return (hidden_states * 0.5 + encoder_hidden_states.mean(),)

    model = DiffusersModel(Transformer(), {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                           "num_train_timesteps": 1000})
    assert model.prediction == "velocity" and model.path.name == "condot"
    x = torch.ones(2, 3)
    cond = torch.full((2, 4, 5), 2.0)
    u = model(x, torch.tensor([0.25, 0.5]), cond)
    torch.testing.assert_close(seen["t"], torch.tensor([750.0, 500.0], dtype=torch.float64))
    torch.testing.assert_close(u, -(x * 0.5 + 2.0))  # u = z - eps = -(eps - z)
    with pytest.raises(ValueError, match="prediction_type='flowish'"):
        DiffusersModel(Transformer(), {"prediction_type": "flowish"})
    with pytest.raises(ValueError, match="cond_arg='labels'"):
        DiffusersModel(Transformer(), {}, cond_arg="labels")


def _flow_loop(unet, sched, x, steps=12):
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def test_flow_match_euler_matches_diffusers_and_fastdiff_sample(unet):
    """SD3-style flow matching (shift 3): the fused scheduler equals diffusers' own, and
    DiffusersModel + fastdiff.sample(euler) on the same sigmas equals both."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastdiff.adapters.diffusers import DiffusersModel, FastDiffFlowMatchEulerScheduler

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    want = _flow_loop(unet, FlowMatchEulerDiscreteScheduler(shift=3.0), x)
    got = _flow_loop(unet, FastDiffFlowMatchEulerScheduler(shift=3.0), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(12)
    model = DiffusersModel(unet, sched.config)
    with torch.no_grad():
        ours = fastdiff.sample(model, None, noise=x, path=model.path, prediction=model.prediction,
                               timesteps=[1.0 - float(s) for s in sched.sigmas.double()])
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_flow_match_stochastic_uses_per_sample_seeds(unet):
    from fastdiff.adapters.diffusers import FastDiffFlowMatchEulerScheduler

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    sched = FastDiffFlowMatchEulerScheduler(stochastic_sampling=True)
    sched.set_seeds([3, 4])
    batch = _flow_loop(unet, sched, x, steps=6)
    # by hand: x' = (1 - s') (x - s v) + s' xi with xi = fastdiff's stream of the seeds
    ref = FastDiffFlowMatchEulerScheduler(stochastic_sampling=True)
    ref.set_timesteps(6)
    y = x
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            s, s1 = float(ref.sigmas[i]), float(ref.sigmas[i + 1])
            y = (1 - s1) * (y - s * unet(y, t).sample) + s1 * fastdiff.ops.randn([3, 4], 1 + i, x.shape[1:])
    torch.testing.assert_close(batch, y, rtol=1e-4, atol=1e-4)
    alone = FastDiffFlowMatchEulerScheduler(stochastic_sampling=True)
    alone.set_seeds([4])
    torch.testing.assert_close(_flow_loop(unet, alone, x[1:], steps=6), batch[1:], rtol=1e-5, atol=1e-5)


def test_conditional_unet_with_guidance_matches_a_diffusers_loop():
    """UNet2DConditionModel with encoder_hidden_states and classifier-free guidance (one 2B batch),
    as Stable Diffusion pipelines run it: fastdiff.sample through DiffusersModel = diffusers' DDIM loop."""
    from diffusers import UNet2DConditionModel

    from fastdiff.adapters.diffusers import DiffusersModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2).eval()
    cond = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(7))
    null = torch.zeros(5, 8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(8)
    y = x
    with torch.no_grad():
        for t in sched.timesteps:
            both = unet(torch.cat([y, y]), t, encoder_hidden_states=torch.cat([cond, null.expand(2, 5, 8)])).sample
            c, u = both.chunk(2)
            y = sched.step(u + 5.0 * (c - u), t, y).prev_sample
        model = DiffusersModel(unet, sched.config)
        assert model.cond_arg == "encoder_hidden_states"
        ours = fastdiff.sample(model, None, 5.0, y=cond, null_y=null, noise=x, path=model.path,
                               prediction=model.prediction, method="ddim", timesteps=model.ddim_timesteps(8))
    torch.testing.assert_close(ours, y, rtol=1e-4, atol=1e-4)


def _ancestral_loop(unet, sched, x, steps=12):
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("config", [dict(prediction_type="epsilon"), dict(prediction_type="v_prediction"),
                                    dict(prediction_type="epsilon", timestep_spacing="trailing"),
                                    dict(prediction_type="v_prediction", beta_schedule="scaled_linear")])
def test_euler_ancestral_matches_diffusers_on_the_same_noise(unet, monkeypatch, config):
    """FastDiffEulerAncestralScheduler, loaded with from_config of diffusers' scheduler, gives diffusers'
    samples when diffusers' noise is fastdiff's (its randn_tensor answered with step i's stream 1 + i)."""
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as module
    from fastdiff.adapters.diffusers import FastDiffEulerAncestralScheduler

    seeds = [3, 4]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    theirs_sched = EulerAncestralDiscreteScheduler(**config)
    step = iter(range(100))
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: fastdiff.ops.randn(seeds, 1 + next(step), shape[1:]).to(kw.get("dtype")))
    theirs = _ancestral_loop(unet, theirs_sched, x)
    ours_sched = FastDiffEulerAncestralScheduler.from_config(theirs_sched.config)
    ours_sched.set_seeds(seeds)
    ours = _ancestral_loop(unet, ours_sched, x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())


def test_euler_ancestral_sample_b_alone_is_sample_b_in_the_batch(unet):
    from fastdiff.adapters.diffusers import FastDiffEulerAncestralScheduler

    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    sched = FastDiffEulerAncestralScheduler()
    sched.set_seeds([7, 8, 9])
    batch = _ancestral_loop(unet, sched, x, steps=6)
    sched = FastDiffEulerAncestralScheduler()
    sched.set_seeds([8])
    alone = _ancestral_loop(unet, sched, x[1:2], steps=6)
    torch.testing.assert_close(alone, batch[1:2], rtol=1e-4, atol=1e-4)  # the UNet's batch-size rounding
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
        bad = FastDiffEulerAncestralScheduler(prediction_type="sample")
        bad.set_timesteps(2)
        bad.step(x, bad.timesteps[0], x)


def _dpm_loop(unet, sched, x, steps, noises=None):
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            kw = {"variance_noise": noises[i]} if noises is not None else {}
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x, **kw).prev_sample
    return x


DPM_CONFIGS = [
    dict(algorithm_type="dpmsolver++", solver_order=2),
    dict(algorithm_type="dpmsolver++", solver_order=3, steps=20),
    dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="heun", prediction_type="v_prediction"),
    dict(algorithm_type="dpmsolver++", solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    dict(algorithm_type="dpmsolver++", solver_order=1, prediction_type="sample"),
    dict(algorithm_type="dpmsolver++", solver_order=2, use_exponential_sigmas=True, lower_order_final=False),
    dict(algorithm_type="sde-dpmsolver++", solver_order=2),
    dict(algorithm_type="sde-dpmsolver++", solver_order=3, steps=20),
    dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun", use_karras_sigmas=True),
    dict(algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min"),
    dict(algorithm_type="dpmsolver", solver_order=3, prediction_type="v_prediction", final_sigmas_type="sigma_min",
         steps=20),
    dict(algorithm_type="sde-dpmsolver", solver_order=2, solver_type="heun", final_sigmas_type="sigma_min"),
]


@pytest.mark.parametrize("config", DPM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dpm_solver_multistep_matches_diffusers(unet, config):
    """FastDiffDPMSolverMultistepScheduler.from_config(diffusers' config) in a pipeline loop gives
    diffusers' samples: every algorithm type, orders 1-3, solver types, sigma options, final steps; the
    SDE variants on the same noise (variance_noise, which both take)."""
    from diffusers import DPMSolverMultistepScheduler
    from fastdiff.adapters.diffusers import FastDiffDPMSolverMultistepScheduler

    config = dict(config)
    steps = config.pop("steps", 12)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    noises = None
    if config["algorithm_type"].startswith("sde"):
        noises = torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(4))
    theirs_sched = DPMSolverMultistepScheduler(**config)
    theirs = _dpm_loop(unet, theirs_sched, x, steps, noises)
    ours_sched = FastDiffDPMSolverMultistepScheduler.from_config(theirs_sched.config)
    ours = _dpm_loop(unet, ours_sched, x, steps, noises)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_dpm_solver_multistep_in_kernel_noise_is_diffusers_on_that_noise(unet, monkeypatch):
    """Without variance_noise the SDE step draws fastdiff's per-sample stream 1 + step index: diffusers fed
    that noise through its randn_tensor gives the same samples, and sample b alone is sample b."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers import scheduling_dpmsolver_multistep as module
    from fastdiff.adapters.diffusers import FastDiffDPMSolverMultistepScheduler

    seeds = [5, 6]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=2)
    ours_sched = FastDiffDPMSolverMultistepScheduler(**config)
    ours_sched.set_seeds(seeds)
    ours = _dpm_loop(unet, ours_sched, x, 10)
    step = iter(range(100))
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: fastdiff.ops.randn(seeds, 1 + next(step), shape[1:]).to(kw.get("dtype")))
    theirs = _dpm_loop(unet, DPMSolverMultistepScheduler(**config), x, 10)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


UNIPC_CONFIGS = [
    dict(solver_order=2), dict(solver_order=3, steps=20), dict(solver_order=1, prediction_type="v_prediction"),
    dict(solver_order=2, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    dict(solver_order=2, disable_corrector=[0, 3], timestep_spacing="trailing"),
    dict(solver_order=2, prediction_type="sample", lower_order_final=False, final_sigmas_type="sigma_min"),
]


@pytest.mark.parametrize("config", UNIPC_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_unipc_multistep_matches_diffusers(unet, config):
    """FastDiffUniPCMultistepScheduler.from_config(diffusers' config) in a pipeline loop gives diffusers'
    samples (one fused pass per step, the corrected state recovered rather than kept)."""
    from diffusers import UniPCMultistepScheduler
    from fastdiff.adapters.diffusers import FastDiffUniPCMultistepScheduler

    config = dict(config)
    steps = config.pop("steps", 12)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs_sched = UniPCMultistepScheduler(**config)
    theirs = _dpm_loop(unet, theirs_sched, x, steps)
    ours_sched = FastDiffUniPCMultistepScheduler.from_config(theirs_sched.config)
    ours = _dpm_loop(unet, ours_sched, x, steps)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    again = _dpm_loop(unet, ours_sched, x, steps)  # set_timesteps starts a new run
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


@pytest.mark.parametrize("name,config", [
    ("FastDiffEulerAncestralScheduler", dict(prediction_type="epsilon")),
    ("FastDiffDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    ("FastDiffDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", solver_order=1,
                                                 final_sigmas_type="sigma_min")),
    ("FastDiffDDIMScheduler", dict(prediction_type="epsilon", clip_sample=False))])
def test_stochastic_schedulers_sample_the_mixture(name, config):
    """The stochastic fused schedulers, with fastdiff's per-sample noise, sample the analytic mixture:
    its eps predictions on the DiscreteVP path of the scheduler's schedule, called at each timestep's flow
    time; the samples' mode weights, means and covariances within statistical error (at 200 steps: at 60,
    first-order Euler ancestral is off by 12.7 standard errors in a covariance, diffusers' own as much)."""
    import fastdiff.adapters.diffusers as fd
    from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
    from fastdiff.paths import DiscreteVP
    from test_sample import N, _zmax

    sched = getattr(fd, name)(**config)
    sched.set_seeds(11)
    path = DiscreteVP(sched.alphas_cumprod)
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, "eps")
    sched.set_timesteps(200)
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    kw = {"eta": 1.0} if name == "FastDiffDDIMScheduler" else {}
    for t in sched.timesteps:
        tt = torch.full((N,), path.time(float(t)))
        scaled = sched.scale_model_input(x, t)  # the sigma-scaled schedulers feed x / sqrt(sigma^2 + 1)
        x = sched.step(model(scaled, tt, None), t, x, **kw).prev_sample
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


@pytest.mark.parametrize("config,churn", [
    (dict(prediction_type="epsilon"), dict(s_churn=2.0)),
    (dict(prediction_type="v_prediction", use_karras_sigmas=True),
     dict(s_churn=3.0, s_tmin=0.1, s_tmax=8.0, s_noise=1.003)),
    (dict(prediction_type="epsilon"), dict(s_churn=40.0, s_tmax=2.0))])
def test_euler_churn_matches_diffusers_on_the_same_noise(unet, monkeypatch, config, churn):
    """FastDiffEulerScheduler.step with diffusers' churn arguments: the raise to sigma_hat (s_noise x
    fresh noise) and the Euler step in one pass; diffusers' randn_tensor answered with step i's stream."""
    from diffusers.schedulers import scheduling_euler_discrete as module

    seeds = [3, 4]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def loop(sched):
        sched.set_timesteps(10)
        y = x * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                y = sched.step(unet(sched.scale_model_input(y, t), t).sample, t, y, **churn).prev_sample
        return y

    ours_sched = FastDiffEulerScheduler(**config)
    ours_sched.set_seeds(seeds)
    ours = loop(ours_sched)
    index = {}

    def randn_tensor(shape, **kw):  # the step index of the scheduler being stepped
        return fastdiff.ops.randn(seeds, 1 + index["sched"].step_index, shape[1:]).to(kw.get("dtype"))

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    index["sched"] = EulerDiscreteScheduler(**config)
    theirs = loop(index["sched"])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("name,config,step_kw", [
    ("FastDiffEulerScheduler", {}, {}),
    ("FastDiffEulerScheduler", dict(prediction_type="v_prediction"), dict(s_churn=2.0)),
    ("FastDiffDDIMScheduler", {}, dict(eta=0.5)), ("FastDiffDDIMScheduler", dict(clip_sample=False), {}),
    ("FastDiffDPMSolverMultistepScheduler", dict(solver_order=3), {}),
    ("FastDiffDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}),
    ("FastDiffUniPCMultistepScheduler", {}, {}), ("FastDiffEulerAncestralScheduler", {}, {}),
    ("FastDiffFlowMatchEulerScheduler", dict(stochastic_sampling=True), {})])
def test_steps_are_the_general_path_bit_for_bit(monkeypatch, name, config, step_kw):
    """A step calls the kernel directly with the rows kept for its schedule (fastdiff.adapters.diffusers._fused):
    the samples are those of the general, fully checked sampler_step call bit for bit, on a run's first pass and
    on a second run that reuses the kept rows; a batch of another size takes its own seeds."""
    import fastdiff.adapters.diffusers as fd
    from fastdiff.adapters.diffusers._fused import _FusedStep

    def loop(sched, batch):
        sched.set_timesteps(8)
        x = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(batch))
        for t in sched.timesteps:
            scaled = sched.scale_model_input(x, t) if hasattr(type(sched), "scale_model_input") else x
            x = sched.step((scaled * 0.7).sin(), t, x, **step_kw).prev_sample
        return x

    sched = getattr(fd, name)(**config)
    sched.set_seeds(5)
    fast = [loop(sched, 2), loop(sched, 2), loop(sched, 3)]
    resolve = _FusedStep._resolve
    monkeypatch.setattr(_FusedStep, "_resolve", lambda self, x: (*resolve(self, x)[:2], None,
                                                                 *resolve(self, x)[3:]))  # no kernel: general path
    general = getattr(fd, name)(**config)
    general.set_seeds(5)
    for got, want in zip(fast, [loop(general, 2), loop(general, 2), loop(general, 3)]):
        assert torch.equal(got, want)
    assert torch.equal(fast[0], fast[1])


def test_a_fused_step_refuses_inputs_that_require_grad():
    """The kernels write in place: with grad enabled, inputs that require grad take the general path, whose error
    says so."""
    sched = FastDiffEulerScheduler()
    sched.set_timesteps(4)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="requires grad"):
        sched.step(torch.randn(1, 3, 4, 4, requires_grad=True), sched.timesteps[0], x)
