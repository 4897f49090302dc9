"""CFGNorm (fastdiff.sampling.features.cfg_norm): the rule against ComfyUI's CFGNorm node's formula (written here in
float64) and the module's reference on the same clean estimates, and in the loop against hand-written Euler and
DDIM loops on every backend here, with two conditions, the guidance interval, a singular first stage, thresholding,
a captured loop; and the refused combinations."""

import pytest
import torch

import fastdiff
from fastdiff.sampling.features.cfg_norm import CFGNorm, cfg_norm_reference
from fastdiff.sampling.features.guidance import RULES, get_rule

from conftest import BACKENDS
from tensor_rule_testing import B, NULL, SHAPE, Y, Y2, branches, close, hand, initial, model, preds, sample, tol


def comfy_cfg_norm(cond, uncond, scale, strength=1.0):
    """ComfyUI's CFGNorm (nodes_cfg.py) on its post-CFG arguments, float64: denoised = the CFG blend."""
    cond, uncond = cond.double(), uncond.double()
    denoised = uncond + (cond - uncond) * scale
    factor = (torch.norm(cond, dim=1, keepdim=True) / (torch.norm(denoised, dim=1, keepdim=True) + 1e-8))
    return denoised * factor.clamp(min=0.0, max=1.0) * strength


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 9), (5,), (2, 3, 1, 5)])
@pytest.mark.parametrize("strength", [1.0, 0.7, 2.5])
def test_rule_is_comfyui(dtype, shape, strength):
    u, c = preds(shape, dtype)
    rule = CFGNorm(strength=strength)
    for w in (4.0, 7.5, 1.5, 0.5, -1.0):
        ours = rule.guide(u, c, w, None)
        assert ours.dtype == torch.float32 and ours.shape == u.shape
        spec = comfy_cfg_norm(c, u, w, strength)
        torch.testing.assert_close(ours.double(), spec, **tol(spec))
        torch.testing.assert_close(cfg_norm_reference(u, c, w, strength), spec, **tol(spec, 1e-12))
    big = rule.guide(u, c, 30.0, None).double()  # strong guidance: the norm is clamped, by up to ~1/30 here
    assert (big - comfy_cfg_norm(c, u, 30.0, 1.0) * strength).abs().max() <= 1e-6 * big.abs().max()
    assert (big - (u.double() + 30 * (c.double() - u.double())) * strength).abs().max() > 1.0


def test_strided_input_and_zero_positions():
    u, c = preds((6, 4, 5), seed=1)
    u, c = u.transpose(2, 3), c[:, ::2].repeat_interleave(2, 1).transpose(2, 3)  # strided
    c[:, :, 1] = 0.0  # positions with a zero conditional norm: scaled to 0
    ours = CFGNorm().guide(u, c, 3.0, None)
    spec = comfy_cfg_norm(c, u, 3.0)
    torch.testing.assert_close(ours.double(), spec, **tol(spec))
    assert ours[:, :, 1].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "ddim"])
def test_sample_is_the_hand_loop(backend, method):
    w, rule = 3.5, CFGNorm(strength=0.9)
    ours = sample(backend, rule, w, method)
    spec = hand(method, lambda u, c, t, i: comfy_cfg_norm(c, u, w, 0.9))
    close(ours, spec)
    plain = sample(backend, None, w, method)
    assert (plain - ours).abs().max() > 1e-2  # the test tells the rule from CFG


def test_rescale_is_the_rescaled_rule():
    """guidance_rescale on a tensor rule: its guided prediction rescaled toward the conditional one's deviation
    (diffusers' rescale_noise_cfg of the rule's result), per sample."""
    from fastdiff.sampling.features.guidance import rescale_reference

    w, phi = 3.5, 0.6
    ours = sample(("cpu", "cpu"), CFGNorm(), w, "euler", guidance_rescale=phi)
    spec = hand("euler", lambda u, c, t, i: comfy_cfg_norm(c, u, w))
    plain = sample(("cpu", "cpu"), CFGNorm(), w, "euler")
    close(plain, spec)
    # the hand loop: the rule in x0 space, then the rescale in the velocity space the step reads
    steps = 4
    grid = [i / steps for i in range(steps + 1)]
    x = initial(3, grid, "condot")
    for t, t1 in zip(grid, grid[1:]):
        u, c = branches(x, t)
        v = (comfy_cfg_norm(x + (1 - t) * c, x + (1 - t) * u, w) - x) / (1 - t)
        x = x + (t1 - t) * rescale_reference(u, c, w, phi, v)
    close(ours, x)
    assert (ours - plain).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", ["cfg_norm", "mahiro", "mimic"])
def test_per_sample_churn_is_each_samples_own(guidance):
    """Churn per sample (each sample's own times, so its own x0 conversion): sample b is the run with sample b's
    churn for all."""
    kw = dict(shape=SHAPE, y=Y, null_y=NULL, seed=0, guidance=guidance, method="heun")
    mixed = fastdiff.sample(model, 4, 3.0, s_churn=[0.0, 2.0], **kw)
    for b, churn in enumerate((0.0, 2.0)):
        alone = fastdiff.sample(model, 4, 3.0, s_churn=churn, **kw)
        torch.testing.assert_close(mixed[b], alone[b], rtol=0, atol=2e-5 * alone.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_two_conditions_act_on_their_weighted_mean(backend):
    w = (2.0, 1.5)
    ours = sample(backend, "cfg_norm", w, conditions=[Y, Y2])
    spec = hand("euler", lambda u, c, t, i: comfy_cfg_norm(c, u, sum(w)), conditions=[Y, Y2], weights=list(w))
    close(ours, spec)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_guidance_interval(backend):
    """Outside the interval the condition alone (one model branch)."""
    w = 4.0
    ours = sample(backend, "cfg_norm", w, guidance_interval=(0.3, 0.8))
    spec = hand("euler", lambda u, c, t, i: comfy_cfg_norm(c, u, w) if 0.3 <= t <= 0.8 else c.clone())
    close(ours, spec)


def test_x0_conversions():
    """The guided prediction is the one whose x0 = a x + b p is the rule's; no conversion (singular): CFG."""
    from fastdiff.sampling.features.tensor_rules import prediction_from_x0

    u, c = preds(SHAPE, seed=5)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(6))
    a, b, w = 1.7, -0.6, 3.0
    ours = prediction_from_x0(CFGNorm(), u, c, w, None, x, (a, b)).double()
    spec = (comfy_cfg_norm(a * x.double() + b * c.double(), a * x.double() + b * u.double(), w) - a * x.double()) / b
    torch.testing.assert_close(ours, spec, **tol(spec))
    cfg = u.double() + w * (c.double() - u.double())
    torch.testing.assert_close(prediction_from_x0(CFGNorm(), u, c, w, None, x, None).double(), cfg, **tol(cfg))


def test_thresholding_reads_the_guided_prediction():
    from fastdiff.sampling.features.thresholding import DynamicThresholding

    w, th = 3.0, DynamicThresholding(0.9, 1.2)
    ours = sample(("cpu", "cpu"), "cfg_norm", w, "ddim", dynamic_thresholding=th)
    spec = hand("ddim", lambda u, c, t, i: th.apply(comfy_cfg_norm(c, u, w)))
    close(ours, spec)


def test_callback_sees_the_guided_x0():
    from tensor_rule_testing import branches, initial

    w, seen = 3.0, []
    sample(("cpu", "cpu"), "cfg_norm", w, callback=lambda i, t, x, x0: seen.append(x0.double().clone()))
    x, grid, want = initial(3, [i / 4 for i in range(5)], "condot"), [i / 4 for i in range(5)], []
    for t, t1 in zip(grid, grid[1:]):
        u, c = branches(x, t)
        x0 = comfy_cfg_norm(x + (1 - t) * c, x + (1 - t) * u, w)
        want.append(x0)
        x = x + (t1 - t) * (x0 - x) / (1 - t)
    for ours, spec in zip(seen, want, strict=True):
        close(ours, spec)


@pytest.mark.parametrize("guidance", ["cfg_norm", "mahiro", "mimic", "fdg"])
def test_runs_in_a_captured_loop(monkeypatch, guidance):
    """Every tensor rule: no host read or host data in the loop (tests/graph_recorder.py), the replay the eager run."""
    from fastdiff.sampling.core import graphs
    from graph_recorder import RecordingCapture

    rec = RecordingCapture()
    monkeypatch.setattr(graphs, "CAPTURE", rec)
    monkeypatch.setattr(graphs, "CACHE", graphs.GraphCache())
    w = 1.0 if guidance == "fdg" else 3.0
    for seed in (1, 2):
        args = dict(y=Y, null_y=NULL, guidance=guidance, shape=SHAPE, seed=seed, backend="cpu")
        torch.testing.assert_close(fastdiff.sample(model, 4, w, cuda_graph=True, **args),
                                   fastdiff.sample(model, 4, w, **args), rtol=0, atol=0)
    assert rec.captures == 1 and rec.replays == 2


def test_registered_and_checked():
    assert RULES["cfg_norm"] is CFGNorm and get_rule("cfg_norm") == CFGNorm()
    for bad in (-0.1, float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match="CFGNorm strength"):
            CFGNorm(strength=bad)
    kw = dict(y=Y, null_y=NULL, guidance="cfg_norm", seed=0)
    with pytest.raises(ValueError, match=r"guidance='cfg_norm' takes norms over the channel dim 1.*\[2\]"):
        fastdiff.sample(lambda x, t, y: x, 2, 3.0, shape=(), **kw)
    assert B == 2
