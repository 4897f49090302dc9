"""Real diffusers pipelines (small random components, no weights) against fastdiff.sample through
``fastdiff.adapters.diffusers.denoiser``: StableDiffusionPipeline, StableDiffusionXLPipeline,
StableDiffusion3Pipeline and FluxPipeline run with CFG from given latents (prompt embeddings passed in, so no
text encoder or tokenizer is needed) and return their final latents; fastdiff.sample with the same network,
embeddings, guidance scale and starting latents, on the grid of the pipeline's scheduler, must give the same
latents to 1e-5 of max |x|."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the pipelines' modules import it (no model of it is loaded)

import fastdiff  # noqa: E402
from fastdiff.adapters.diffusers import denoiser  # noqa: E402

TOL = 1e-5  # of max |x|
STEPS = 8


def _close(got, want, tol=TOL):
    err = float((got.double() - want.double()).abs().max()) / float(want.abs().max())
    print(f"max |fastdiff - diffusers| / max |x| = {err:.3g}")
    assert err <= tol, f"max |fastdiff - diffusers| = {err:.3g} of max |x| (tolerance {tol})"
    return err


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                   layers_per_block=1).eval()


def tiny_cond_unet(sdxl: bool = False):
    torch.manual_seed(0)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4) if sdxl else {}
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=sdxl, cross_attention_dim=16, norm_num_groups=4,
        **extra).eval()


def _inputs(n=2, seq=7, width=16, seed=1, latent_shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    prompt, neg = torch.randn(n, seq, width, generator=g), torch.randn(n, seq, width, generator=g)
    latents = torch.randn(n, *latent_shape, generator=g)
    return g, prompt, neg, latents


SD_SCHEDULERS = {  # name -> (diffusers scheduler class, its config overrides, fastdiff method)
    "euler": ("EulerDiscreteScheduler", {}, "euler"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m"),
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}, "ddim"),
}
SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)


def _scheduler(name, **more):
    cls, over, method = SD_SCHEDULERS[name]
    return getattr(diffusers, cls).from_config({**SD_CONFIG, **over, **more}), method


def _sd_pipe(scheduler):
    return diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_cond_unet(),
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


@pytest.mark.parametrize("name", list(SD_SCHEDULERS))
def test_stable_diffusion(name):
    sched, method = _scheduler(name)
    pipe = _sd_pipe(sched)
    _, prompt, neg, latents = _inputs()
    with torch.no_grad():
        want = pipe(prompt_embeds=prompt, negative_prompt_embeds=neg, guidance_scale=6.0, num_inference_steps=STEPS,
                    latents=latents, output_type="latent", height=16, width=16).images
        den = denoiser(pipe)
        grid = den.grid(pipe.scheduler)  # the run's own set_timesteps
        got = fastdiff.sample(den, None, path=den.path, prediction=den.prediction, timesteps=grid, method=method,
                              y={"encoder_hidden_states": prompt}, null_y={"encoder_hidden_states": neg}, cfg=6.0,
                              noise=den.initial_state(latents, grid))
    _close(den.final_latents(got, grid), want)


def test_stable_diffusion_grid_helpers_equal_the_schedulers():
    """den.timesteps(steps, sigmas=...) is the grid of the scheduler diffusers makes with use_*_sigmas."""
    sched, _ = _scheduler("dpmpp_2m")
    den = denoiser(tiny_cond_unet(), sched)
    for kind in ("karras", "exponential", "beta"):
        ref = diffusers.DPMSolverMultistepScheduler.from_config(sched.config, **{f"use_{kind}_sigmas": True})
        ref.set_timesteps(12)
        grid = den.timesteps(12, sigmas=kind)
        sig = [den.path.sigma(t) for t in grid]
        torch.testing.assert_close(torch.tensor(sig, dtype=torch.float64), ref.sigmas.double(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="sigmas must be one of karras, exponential, beta"):
        den.timesteps(12, sigmas="polyexponential")


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_stable_diffusion_2_v_prediction_with_guidance_rescale(name):
    """The SD 2.x recipe: v_prediction, guidance_rescale 0.7: rescale acts on v in both (on this path's v, the
    network's times sqrt(sigma^2 + 1): a per-step constant, which the rescale's std ratio does not see)."""
    sched, method = _scheduler(name, prediction_type="v_prediction")
    pipe = _sd_pipe(sched)
    _, prompt, neg, latents = _inputs(seed=3)
    with torch.no_grad():
        want = pipe(prompt_embeds=prompt, negative_prompt_embeds=neg, guidance_scale=7.0, guidance_rescale=0.7,
                    num_inference_steps=STEPS, latents=latents, output_type="latent", height=16, width=16).images
        den = denoiser(pipe)
        assert den.prediction == "v"
        grid = den.grid(pipe.scheduler)
        got = fastdiff.sample(den, None, path=den.path, prediction=den.prediction, timesteps=grid, method=method,
                              y={"encoder_hidden_states": prompt}, null_y={"encoder_hidden_states": neg}, cfg=7.0,
                              guidance_rescale=0.7, noise=den.initial_state(latents, grid))
    _close(den.final_latents(got, grid), want)


@pytest.mark.parametrize("name", list(SD_SCHEDULERS))
def test_stable_diffusion_xl(name):
    sched, method = _scheduler(name)
    pipe = diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=tiny_cond_unet(sdxl=True), scheduler=sched,
                                               force_zeros_for_empty_prompt=False)
    g, prompt, neg, latents = _inputs(seed=4)
    pooled, neg_pooled = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        want = pipe(prompt_embeds=prompt, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=neg_pooled, guidance_scale=5.0, num_inference_steps=STEPS,
                    latents=latents, output_type="latent", height=16, width=16).images
        # SDXL's micro-conditioning: original size, crop top-left, target size (the pipeline's defaults)
        ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
        den = denoiser(pipe)
        grid = den.grid(pipe.scheduler)
        got = fastdiff.sample(
            den, None, path=den.path, prediction=den.prediction, timesteps=grid, method=method, cfg=5.0,
            y={"encoder_hidden_states": prompt, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}},
            null_y={"encoder_hidden_states": neg, "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": ids}},
            noise=den.initial_state(latents, grid))
    _close(den.final_latents(got, grid), want)


FLOW_SCHEDULERS = {  # name -> (diffusers scheduler, fastdiff method); ddim on a flow path is euler (tested equal)
    "euler": (lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), "euler"),
    "ddim": (lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), "ddim"),
    "dpmpp_2m": (lambda: diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                               flow_shift=3.0), "dpmpp_2m"),
}


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=8, out_channels=4).eval()


@pytest.mark.parametrize("name", list(FLOW_SCHEDULERS))
def test_stable_diffusion_3(name):
    make, method = FLOW_SCHEDULERS[name]
    pipe = diffusers.StableDiffusion3Pipeline(transformer=tiny_sd3(), scheduler=make(), vae=tiny_vae(),
                                              text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                              text_encoder_3=None, tokenizer_3=None)
    g, prompt, neg, latents = _inputs(seed=5)
    pooled, neg_pooled = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        want = pipe(prompt_embeds=prompt, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=neg_pooled, guidance_scale=4.5, num_inference_steps=STEPS,
                    latents=latents, output_type="latent", height=16, width=16).images
        den = denoiser(pipe)
        assert den.prediction == "velocity"
        grid = den.grid(pipe.scheduler)
        got = fastdiff.sample(den, None, path=den.path, prediction=den.prediction, timesteps=grid, method=method,
                              cfg=4.5, y={"encoder_hidden_states": prompt, "pooled_projections": pooled},
                              null_y={"encoder_hidden_states": neg, "pooled_projections": neg_pooled},
                              noise=den.initial_state(latents, grid))
    _close(den.final_latents(got, grid), want)


# dynamic shifting: the pipeline passes sigmas and mu to set_timesteps (diffusers' DPMSolverMultistep takes no sigmas,
# so FluxPipeline cannot run it; SD3 runs dpmpp_2m above)
FLUX_SCHEDULERS = {
    "euler": (lambda: diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15),
        "euler"),
    "ddim": (lambda: FLUX_SCHEDULERS["euler"][0](), "ddim"),
}


@pytest.mark.parametrize("name", list(FLUX_SCHEDULERS))
def test_flux_with_dynamic_shifting_and_true_cfg(name):
    """FluxPipeline: packed latents, dynamic shifting (mu from the sequence length), true CFG with a negative
    prompt; the position ids are the same for every sample: ``fixed``, not batched."""
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                   pooled_projection_dim=8, guidance_embeds=False,
                                                   axes_dims_rope=(2, 2, 4)).eval()
    make, method = FLUX_SCHEDULERS[name]
    pipe = diffusers.FluxPipeline(scheduler=make(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    g, prompt, neg, _ = _inputs(seed=6)
    pooled, neg_pooled = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    latents = torch.randn(2, 16, 16, generator=g)  # packed: (8 / 2) * (8 / 2) patches of 4 channels x 2 x 2
    with torch.no_grad():
        want = pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                    negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=4.0, num_inference_steps=STEPS,
                    latents=latents, output_type="latent", height=16, width=16).images
        ids = {"img_ids": pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
               "txt_ids": torch.zeros(prompt.shape[1], 3)}
        den = denoiser(pipe, fixed=ids)
        grid = den.grid(pipe.scheduler)  # the run's shifted sigmas
        got = fastdiff.sample(den, None, path=den.path, prediction=den.prediction, timesteps=grid, method=method,
                              cfg=4.0, y={"encoder_hidden_states": prompt, "pooled_projections": pooled},
                              null_y={"encoder_hidden_states": neg, "pooled_projections": neg_pooled},
                              noise=den.initial_state(latents, grid))
    _close(den.final_latents(got, grid), want)


def test_errors_name_the_argument():
    unet = tiny_cond_unet()
    with pytest.raises(ValueError, match="scheduler: pass the pipeline"):
        denoiser(unet)
    with pytest.raises(ValueError, match=r"fixed's keys \['ids'\]"):
        denoiser(unet, _scheduler("euler")[0], fixed={"ids": torch.zeros(1)})
    den = denoiser(unet, _scheduler("euler")[0])
    with pytest.raises(ValueError, match="after set_timesteps"):
        den.grid()
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True"):
        denoiser(unet, _scheduler("ddim", rescale_betas_zero_snr=True)[0])


@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"])
def test_img2img_pipeline_with_the_fused_schedulers(name):
    """StableDiffusionImg2ImgPipeline (strength 0.6: set_begin_index and add_noise mid-schedule) with the fused
    drop-in of ``name`` (Heun through FastDiffScheduler) gives diffusers' own scheduler's latents."""
    from fastdiff.adapters import diffusers as fd

    ours_of = {"UniPCMultistepScheduler": fd.FastDiffUniPCMultistepScheduler,
               "DPMSolverMultistepScheduler": fd.FastDiffDPMSolverMultistepScheduler,
               "HeunDiscreteScheduler": fd.FastDiffScheduler}
    theirs = getattr(diffusers, name).from_config(SD_CONFIG)
    pipe = diffusers.StableDiffusionImg2ImgPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None,
                                                    unet=tiny_cond_unet(), scheduler=theirs, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    g, prompt, neg, _ = _inputs(seed=7)
    image = torch.rand(2, 3, 16, 16, generator=g)

    def run():
        with torch.no_grad():
            return pipe(prompt_embeds=prompt, negative_prompt_embeds=neg, image=image, strength=0.6,
                        guidance_scale=5.0, num_inference_steps=STEPS, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    want = run()
    pipe.scheduler = ours_of[name].from_config(pipe.scheduler.config)
    got = run()
    _close(got, want)


@pytest.mark.parametrize("name,config", [("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}),
                                         ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
                                         ("LMSDiscreteScheduler", {})])
def test_stable_diffusion_with_the_generic_scheduler(name, config):
    """SD 1.5's default PNDM (PLMS), KDPM2 with Karras sigmas and LMS swapped into StableDiffusionPipeline as
    FastDiffScheduler.from_config(pipe.scheduler): diffusers' own scheduler's latents."""
    from fastdiff.adapters.diffusers import FastDiffScheduler

    pipe = _sd_pipe(getattr(diffusers, name).from_config({**SD_CONFIG, **config}))
    _, prompt, neg, latents = _inputs(seed=8)

    def run():
        with torch.no_grad():
            return pipe(prompt_embeds=prompt, negative_prompt_embeds=neg, guidance_scale=6.0,
                        num_inference_steps=STEPS, latents=latents, output_type="latent", height=16, width=16).images

    want = run()
    pipe.scheduler = FastDiffScheduler.from_config(pipe.scheduler)
    _close(run(), want)
