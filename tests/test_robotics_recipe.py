"""The robotics recipe (docs/adapters/diffusers.md, "A diffusion policy's sampling loop"): a reused
fastdiff.Sampler in place of lerobot's DiffusionPolicy.conditional_sample loop, lerobot's DDPM config
(squaredcos_cap_v2, 100 training timesteps, epsilon, clip_sample), an observation embedding as global
conditioning, equal to the loop with diffusers' DDPMScheduler fed the same noise; 10-step DDIM too."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.adapters.diffusers import DiffusersModel  # noqa: E402

LEROBOT = dict(num_train_timesteps=100, beta_start=0.0001, beta_end=0.02, beta_schedule="squaredcos_cap_v2",
               variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon")
HORIZON, ACTION_DIM, COND = 16, 2, 6


class PolicyNet(torch.nn.Module):
    """A stand-in for lerobot's DiffusionConditionalUnet1d: forward(x, timestep, global_cond)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(ACTION_DIM + COND + 1, 32)
        self.out = torch.nn.Linear(32, ACTION_DIM)

    def forward(self, x, timestep, global_cond=None):
        B = x.shape[0]
        t = timestep.float().view(B, 1, 1).expand(B, x.shape[1], 1) / 100.0
        c = global_cond.view(B, 1, COND).expand(B, x.shape[1], COND)
        return 3.0 * self.out(torch.tanh(self.inp(torch.cat([x, c, t], dim=-1))))  # large: the clip acts


def lerobot_loop(net, scheduler, x, cond, steps):
    """lerobot's conditional_sample: a [B] long timestep per call, no scale_model_input."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = net(x, torch.full(x.shape[:1], t, dtype=torch.long), global_cond=cond)
            x = scheduler.step(out, t, x).prev_sample
    return x


def _fastdiff_noise(monkeypatch, scheduler, seeds, module=scheduling_ddpm):
    """The scheduler's step draws fastdiff's noise of that step (stream 1 + its index) for sample b's seed."""
    calls = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kw):
        calls.append(shape)
        stream = len(calls)  # one draw per step with noise: the first call is step 0's
        return fastdiff.ops.randn(seeds, stream, tuple(shape[1:])).to(dtype)
    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return calls


def _sampler(net, method, steps, scheduler, **kw):
    model = DiffusersModel(net, scheduler.config, cond_arg="global_cond")
    return fastdiff.Sampler(model, None, shape=(HORIZON, ACTION_DIM), batch_size=2, path=model.path,
                            prediction=model.prediction, method=method, timesteps=model.ddim_timesteps(steps),
                            y=torch.zeros(2, COND), **kw)


def test_a_reused_sampler_is_lerobots_ddpm_loop(monkeypatch):
    net = PolicyNet().eval()
    sampler = _sampler(net, "ddpm", 100, diffusers.DDPMScheduler(**LEROBOT), clip_sample=1.0)
    g = torch.Generator().manual_seed(2)
    for episode in range(2):  # the same Sampler, a new observation and new seeds each call
        cond, seeds = torch.randn(2, COND, generator=g), [10 * episode, 10 * episode + 1]
        start = fastdiff.ops.randn(seeds, 0, (HORIZON, ACTION_DIM))  # fastdiff's initial noise: stream 0
        theirs = diffusers.DDPMScheduler(**LEROBOT)
        _fastdiff_noise(monkeypatch, theirs, seeds)
        want = lerobot_loop(net, theirs, start.clone(), cond, 100)
        with torch.no_grad():  # (fastdiff starts at beta_99 xi: alpha_bar_99 < 1e-10 on this schedule, so xi itself)
            got = sampler(seed=seeds, y=cond)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_a_reused_sampler_is_a_ten_step_ddim_loop(use_clipped_model_output):
    """lerobot's DDIM setting, 10 steps: diffusers' DDIM with clip_sample steps with the clamped x0 and the unclipped
    eps (use_clipped_model_output=False, its default and lerobot's), as fastdiff's ddim with clip_sample does;
    StaticClipping(use_clipped_model_output=True) is the other setting."""
    from fastdiff.sampling.features.thresholding import StaticClipping

    net = PolicyNet().eval()
    config = {k: v for k, v in LEROBOT.items() if k != "variance_type"}
    clip = StaticClipping(1.0, use_clipped_model_output=True) if use_clipped_model_output else 1.0
    sampler = _sampler(net, "ddim", 10, diffusers.DDIMScheduler(**config), clip_sample=clip)
    cond = torch.randn(2, COND, generator=torch.Generator().manual_seed(3))
    start = fastdiff.ops.randn([5, 6], 0, (HORIZON, ACTION_DIM))
    theirs = diffusers.DDIMScheduler(**config)
    theirs.set_timesteps(10)
    x = start.clone()
    with torch.no_grad():
        for t in theirs.timesteps:
            out = net(x, torch.full(x.shape[:1], t, dtype=torch.long), global_cond=cond)
            x = theirs.step(out, t, x, use_clipped_model_output=use_clipped_model_output).prev_sample
        got = sampler(noise=start, y=cond)  # lerobot starts DDIM's first step (t = 90) from a standard normal
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    unclipped = lerobot_loop(net, diffusers.DDIMScheduler(**{**config, "clip_sample": False}), start.clone(), cond, 10)
    assert float((unclipped - x).abs().max()) > 1e-2  # the clip acts


@pytest.mark.parametrize("method,cfg", [("ddpm", 1.0), ("ddim", 3.0), ("euler", 1.0), ("dpmpp_2m", 2.0)])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_the_clamp_rides_in_the_step_kernel(monkeypatch, method, cfg, use_clipped_model_output):
    """clip_sample in sample(): where a stage has no side output of its own (ddpm, ddim, euler) the clamp is
    sampler_step's fused clip (no torch pass before the kernel); elsewhere (dpmpp_2m keeps x0 in its side output)
    the prediction hook. Both give the hook's numbers (within float32 rounding)."""
    from fastdiff.sampling.features import thresholding
    from fastdiff.sampling.features.thresholding import StaticClipping

    def model(x, t, y):
        return 3.0 * torch.tanh(2.0 * x + y.float().view(-1, 1, 1))

    clip = StaticClipping(0.7, use_clipped_model_output=use_clipped_model_output)
    kw = dict(shape=(HORIZON, ACTION_DIM), batch_size=3, seed=4, path="vp", prediction="eps", method=method,
              y=torch.ones(3), clip_sample=clip, **({"null_y": torch.zeros(3), "cfg": cfg} if cfg != 1.0 else {}))
    applied = []
    original = StaticClipping.apply
    monkeypatch.setattr(StaticClipping, "apply", lambda self, x0: applied.append(1) or original(self, x0))
    fused = fastdiff.sample(model, 12, **kw)
    assert bool(applied) == (method == "dpmpp_2m")  # the hook's torch pass ran only where the kernel can't clamp
    monkeypatch.setattr(thresholding.Thresholds, "fuse_clamps", lambda self, classifier: None)
    hooked = fastdiff.sample(model, 12, **kw)
    torch.testing.assert_close(fused, hooked, rtol=1e-5, atol=1e-5 * float(hooked.abs().max()))
    plain = fastdiff.sample(model, 12, **{**kw, "clip_sample": None})
    assert float((plain - hooked).abs().max()) > 1e-2  # the clamp acts
