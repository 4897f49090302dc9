"""FastDiffDDPMScheduler against diffusers' DDPMScheduler fed the same noise (fastdiff's stream of the per-sample
seeds, through diffusers' randn_tensor): every prediction type, each fixed variance type, clip_sample on and off,
lerobot's DiffusionPolicy schedule (squaredcos_cap_v2, 100 train steps, epsilon, clip_sample) and DDPMPipeline."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.adapters.diffusers import FastDiffDDPMScheduler  # noqa: E402
from test_adapter_diffusers import tiny_unet  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _fastdiff_noise(monkeypatch, sched, seeds):
    """diffusers' DDPM step draws fastdiff's noise of the step: stream 1 + the timestep's index."""
    def randn_tensor(shape, generator=None, device=None, dtype=None, **kw):
        t = randn_tensor.timestep
        stream = 1 + [int(v) for v in sched.timesteps].index(int(t))
        return fastdiff.ops.randn(seeds, stream, tuple(shape[1:])).to(dtype)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)
    return randn_tensor


def _loop(model, sched, x, steps, hook=None):
    sched.set_timesteps(steps)
    x0s = []
    with torch.no_grad():
        for t in sched.timesteps:
            if hook is not None:
                hook.timestep = t
            res = sched.step(model(x, t), t, x)
            x = res.prev_sample
            x0s.append(res.pred_original_sample)
    return x, x0s


def _policy_model(x, t):
    """A stand-in denoiser of a diffusion policy's action chunk [B, horizon, action_dim]."""
    return torch.tanh(0.7 * x + 0.001 * t.float()) * 0.9


@pytest.mark.parametrize("steps", [100, 10])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_loop_matches_diffusers_on_the_same_noise(monkeypatch, prediction_type, variance_type, clip_sample,
                                                       steps):
    config = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                  variance_type=variance_type, clip_sample=clip_sample, clip_sample_range=1.0)
    seeds = [3, 4]
    x = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(1))
    ours = FastDiffDDPMScheduler(**config)
    ours.set_seeds(seeds)
    got, got_x0 = _loop(_policy_model, ours, x, steps)
    theirs = DDPMScheduler(**config)
    want, want_x0 = _loop(_policy_model, theirs, x, steps, hook=_fastdiff_noise(monkeypatch, theirs, seeds))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_x0, want_x0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _pipeline_images(monkeypatch, unet, sched, steps):
    """(fused, diffusers') images of DDPMPipeline from the same generator, diffusers' scheduler fed fastdiff's noise
    of the per-sample seeds 0, 1."""
    pipe = DDPMPipeline(unet=unet, scheduler=sched).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    hook = _fastdiff_noise(monkeypatch, pipe.scheduler, [0, 1])
    original_step = DDPMScheduler.step

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        hook.timestep = timestep
        return original_step(self, model_output, timestep, sample, generator=generator, return_dict=return_dict)

    def images():
        with torch.no_grad():
            return pipe(batch_size=2, num_inference_steps=steps, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    monkeypatch.setattr(DDPMScheduler, "step", step)
    want = images()
    monkeypatch.undo()
    pipe.scheduler = FastDiffDDPMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, FastDiffDDPMScheduler)
    return images(), want


def test_ddpm_pipeline_same_images(monkeypatch, unet):
    """DDPMPipeline (linear betas, 1000 train steps, 20 inference steps) with the fused scheduler equals the
    pipeline with diffusers' scheduler fed the same noise; sample b alone with seed b equals sample b of the
    batch."""
    sched = DDPMScheduler(num_train_timesteps=1000)
    got, want = _pipeline_images(monkeypatch, unet, sched, 20)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variance_type,clip_sample", [("fixed_large", True), ("fixed_small_log", False),
                                                      ("learned_range", True), ("learned", False)])
def test_ddpm_pipeline_each_variance_type(monkeypatch, variance_type, clip_sample):
    """DDPMPipeline with each variance type diffusers' DDPMScheduler has (fixed_large_log aside: diffusers' own
    gives NaN), clip_sample on and off; the learned ones with a UNet of 2 x 3 output channels (eps, variance)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    learned = variance_type.startswith("learned")
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=6 if learned else 3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    if variance_type == "learned":  # the raw channels are the variance: keep them positive
        head = unet.conv_out
        unet.conv_out = torch.nn.Sequential(head, _PositiveVariance())
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, clip_sample=clip_sample)
    got, want = _pipeline_images(monkeypatch, unet, sched, 12)
    assert not torch.from_numpy(want).isnan().any()
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)


class _PositiveVariance(torch.nn.Module):
    def forward(self, h):
        return torch.cat([h[:, :3], 0.01 + 0.05 * h[:, 3:].abs()], dim=1)


def test_a_reused_scheduler_gives_each_sample_its_own_seed():
    config = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(2))
    batch = FastDiffDDPMScheduler(**config)
    batch.set_seeds([7, 8, 9])
    got, _ = _loop(_policy_model, batch, x, 100)
    alone = FastDiffDDPMScheduler(**config)
    alone.set_seeds([8])
    assert torch.equal(_loop(_policy_model, alone, x[1:2], 100)[0], got[1:2])
    again, _ = _loop(_policy_model, batch, x, 100)  # the kept rows of the schedule: the same numbers
    assert torch.equal(again, got)


def _variance_model(x, t):
    """A stand-in improved-DDPM model: eps and, in as many more channels, the variance output (in [-1, 1] for
    learned_range's interpolation; positive for learned, the variance itself)."""
    eps = torch.tanh(0.7 * x + 0.001 * t.float()) * 0.9
    return torch.cat([eps, torch.sin(3.0 * x)], dim=1)


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_learned_variances_match_diffusers_on_the_same_noise(monkeypatch, variance_type, clip_sample):
    model = _variance_model if variance_type == "learned_range" else \
        (lambda x, t: torch.cat([_variance_model(x, t)[:, :2], 0.01 + 0.05 * x.abs()], dim=1))
    config = dict(num_train_timesteps=1000, variance_type=variance_type, clip_sample=clip_sample)
    seeds = [3, 4]
    x = torch.randn(2, 2, 6, 5, generator=torch.Generator().manual_seed(8))
    ours = FastDiffDDPMScheduler(**config)
    ours.set_seeds(seeds)
    got, got_x0 = _loop(model, ours, x, 25)
    theirs = DDPMScheduler(**config)
    want, want_x0 = _loop(model, theirs, x, 25, hook=_fastdiff_noise(monkeypatch, theirs, seeds))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for a, b in zip(got_x0, want_x0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    fixed = FastDiffDDPMScheduler(**{**config, "variance_type": "fixed_small"})
    fixed.set_seeds(seeds)
    assert (_loop(lambda v, t: model(v, t)[:, :2], fixed, x, 25)[0] - got).abs().max() > 1e-3  # the variance acts
    with pytest.raises(ValueError, match=rf"variance_type={variance_type!r} needs the model's variance channels"):
        ours.set_timesteps(25)
        ours.step(x, ours.timesteps[0], x)


@pytest.mark.parametrize("variance_type", ["fixed_large_log", "learned_log"])
def test_unsupported_variance_types_are_refused_naming_them(variance_type):
    sched = FastDiffDDPMScheduler(num_train_timesteps=10, variance_type=variance_type)
    sched.set_timesteps(10)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=f"variance_type={variance_type!r} is not supported"):
        sched.step(x, sched.timesteps[0], x)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sample_method_ddpm_matches_diffusers_ddpm_on_the_same_noise(monkeypatch, unet, prediction_type,
                                                                     variance_type):
    """fastdiff.sample(method="ddpm") through DiffusersModel on diffusers' grid = diffusers' DDPMScheduler loop fed
    the same noise (fastdiff's stream: seed + b, step i stream 1 + i)."""
    from fastdiff.adapters.diffusers import DiffusersModel

    config = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                  variance_type=variance_type, clip_sample=False)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    theirs = DDPMScheduler(**config)
    hook = _fastdiff_noise(monkeypatch, theirs, [0, 1])
    want, _ = _loop(lambda v, t: unet(v, t).sample, theirs, x, 25, hook=hook)
    model = DiffusersModel(unet, theirs.config)
    with torch.no_grad():
        got = fastdiff.sample(model, None, noise=x, path=model.path, prediction=model.prediction, method="ddpm",
                              variance_type=variance_type, timesteps=model.ddim_timesteps(25))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_method_ddpm_fixed_small_is_ddim_at_eta_one():
    """The analytic identity: DDPM's posterior with fixed_small variance is DDIM at eta = 1, on any path."""
    def model(x, t, y=None):
        return torch.tanh(0.7 * x) * 0.9

    for path, prediction in (("vp", "x0"), ("vp-cosine", "eps"), ("condot", "velocity")):
        kw = dict(shape=(16, 2), batch_size=3, seed=3, path=path, prediction=prediction)
        a = fastdiff.sample(model, 20, method="ddpm", **kw)
        b = fastdiff.sample(model, 20, method="ddim", eta=1.0, **kw)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="variance_type must be one of 'fixed_small', 'fixed_large'"):
        fastdiff.sample(model, 5, method="ddpm", variance_type="learned", shape=(2,), batch_size=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_sample_method_ddpm_with_clip_sample_matches_diffusers(monkeypatch, unet, prediction_type):
    """lerobot's setting: DDPMScheduler(clip_sample=True) = fastdiff.sample(method="ddpm", clip_sample=1.0) (x0 clamped,
    then the posterior mean of it and x: DDPM's update reads nothing else)."""
    from fastdiff.adapters.diffusers import DiffusersModel

    config = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                  clip_sample=True, clip_sample_range=0.5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 2
    theirs = DDPMScheduler(**config)
    hook = _fastdiff_noise(monkeypatch, theirs, [0, 1])
    want, _ = _loop(lambda v, t: unet(v, t).sample * 3, theirs, x, 20, hook=hook)
    model = DiffusersModel(lambda sample, timestep, return_dict=False: (unet(sample, timestep).sample * 3,),
                           theirs.config)
    with torch.no_grad():
        got = fastdiff.sample(model, None, noise=x, path=model.path, prediction=model.prediction, method="ddpm",
                              clip_sample=0.5, timesteps=model.ddim_timesteps(20))
        unclipped = fastdiff.sample(model, None, noise=x, path=model.path, prediction=model.prediction,
                                    method="ddpm", timesteps=model.ddim_timesteps(20))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - unclipped).abs().max() > 0.1  # the clamp acts


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sample_method_ddim_with_clip_sample_matches_diffusers(unet, prediction_type, use_clipped_model_output):
    """DDIMScheduler(clip_sample=True): the clamped x0 with the unclipped eps by default, eps recomputed from the
    clamped x0 with use_clipped_model_output=True; fastdiff.sample(method="ddim", clip_sample=c) and
    StaticClipping(c, use_clipped_model_output=True) take the same steps. The clamp at low SNR makes the loop
    ill-conditioned (an input moved by 1e-7 of itself moves diffusers' own result by up to 2e-4 here), so the
    agreement is asked within 1e-5 of max |x| or 10x that sensitivity, and the two settings must differ by far
    more."""
    from fastdiff.adapters.diffusers import DiffusersModel
    from fastdiff.sampling.features.thresholding import StaticClipping

    config = dict(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=True, clip_sample_range=0.5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 2

    def diffusers_loop(start, clipped):
        theirs = diffusers.DDIMScheduler(**config)
        theirs.set_timesteps(15)
        with torch.no_grad():
            for t in theirs.timesteps:
                start = theirs.step(unet(start, t).sample * 3, t, start, use_clipped_model_output=clipped).prev_sample
        return start

    want = diffusers_loop(x, use_clipped_model_output)
    sensitivity = float((diffusers_loop(x * (1 + 1e-7), use_clipped_model_output) - want).abs().max())
    model = DiffusersModel(lambda sample, timestep, return_dict=False: (unet(sample, timestep).sample * 3,),
                           diffusers.DDIMScheduler(**config).config)
    clip = StaticClipping(0.5, use_clipped_model_output=True) if use_clipped_model_output else 0.5
    with torch.no_grad():
        got = fastdiff.sample(model, None, noise=x, path=model.path, prediction=model.prediction, method="ddim",
                              clip_sample=clip, timesteps=model.ddim_timesteps(15))
    err = float((got - want).abs().max())
    assert err <= max(1e-5 * float(want.abs().max()), 10 * sensitivity), (err, sensitivity)
    other = diffusers_loop(x, not use_clipped_model_output)
    assert float((other - want).abs().max()) > 100 * max(err, 1e-6)


def test_clip_sample_arguments_are_checked():
    def model(x, t, y=None):
        return x

    with pytest.raises(ValueError, match=r"clip_sample must be a finite number in \(0, 3.4e38\]"):
        fastdiff.sample(model, 3, clip_sample=-1.0, shape=(2,), batch_size=1)


def test_clip_sample_composes_with_dynamic_thresholding():
    """Both: each evaluation's x0 thresholded per sample, then clamped; a clamp at the thresholding's bound (its
    output lies in [-1, 1]) changes nothing, a tighter one bounds the result."""
    from fastdiff.sampling.features.thresholding import DynamicThresholding, get_thresholding

    def model(x, t, y=None):
        return 3.0 * x

    kw = dict(shape=(16,), batch_size=2, seed=2, method="ddpm", path="vp", prediction="x0")
    alone = fastdiff.sample(model, 8, dynamic_thresholding=True, **kw)
    assert torch.equal(fastdiff.sample(model, 8, dynamic_thresholding=True, clip_sample=1.0, **kw), alone)
    tight = fastdiff.sample(model, 8, dynamic_thresholding=True, clip_sample=0.25, **kw)
    assert not torch.equal(tight, alone)
    x0 = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    both = get_thresholding(True, 0.25).apply(x0)
    assert torch.equal(both, DynamicThresholding().apply(x0).clamp(-0.25, 0.25))
