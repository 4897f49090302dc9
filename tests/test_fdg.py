"""FDG (fastdiff.sampling.features.fdg): its Laplacian pyramid (torch ops) against the float64 matrix reference and
kornia's published examples; the rule against diffusers' FrequencyDecoupledGuidance itself (kornia is not installed
here: the guider runs on a port of kornia's pyramid functions written in this test, injected into its module) and
against the module's reference on odd sizes; in the loop against hand-written Euler and DDIM loops that call the
guider, on every backend here; the checks."""

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.sampling.features import fdg as fdg_module
from fastdiff.sampling.features.fdg import (FDG, fdg_reference, image_from_pyramid, laplacian_pyramid,
                                            laplacian_pyramid_reference)
from fastdiff.sampling.features.guidance import RULES, get_rule
from fastdiff.sampling.features.tensor_rules import At

from conftest import BACKENDS
from tensor_rule_testing import NULL, SHAPE, Y, Y2, close, hand, model, preds, sample, tol


# ---- kornia's pyramid functions, ported for the guider (kornia/geometry/transform/pyramid.py, filters/filter.py) --

def _k_filter2d(x):
    k = torch.tensor([[1.0, 4.0, 6.0, 4.0, 1.0], [4.0, 16.0, 24.0, 16.0, 4.0], [6.0, 24.0, 36.0, 24.0, 6.0],
                      [4.0, 16.0, 24.0, 16.0, 4.0], [1.0, 4.0, 6.0, 4.0, 1.0]]) / 256.0
    b, c, h, w = x.shape
    k = k[None, None].to(x).expand(-1, c, -1, -1).reshape(-1, 1, 5, 5)
    out = F.conv2d(F.pad(x, [2, 2, 2, 2], mode="reflect").view(-1, k.size(0), h + 4, w + 4), k, groups=k.size(0))
    return out.view(b, c, h, w)


def kornia_pyrdown(x):
    h, w = x.shape[-2:]
    return F.interpolate(_k_filter2d(x), size=(int(float(h) / 2.0), int(float(w) // 2.0)), mode="bilinear",
                         align_corners=False)


def kornia_pyrup(x):
    h, w = x.shape[-2:]
    return _k_filter2d(F.interpolate(x, size=(h * 2, w * 2), mode="bilinear", align_corners=False))


def kornia_build_laplacian_pyramid(x, max_level):
    h, w = x.shape[2], x.shape[3]
    pow2 = lambda n: bool(n) and not (n & (n - 1))  # noqa: E731
    if not (pow2(w) or pow2(h)):
        x = F.pad(x, (0, (1 << (w - 1).bit_length()) - w, 0, (1 << (h - 1).bit_length()) - h), "reflect")
    gauss = [x]
    for _ in range(max_level - 1):
        gauss.append(kornia_pyrdown(gauss[-1]))
    return [gauss[i] - kornia_pyrup(gauss[i + 1]) for i in range(max_level - 1)] + [gauss[-1]]


@pytest.fixture
def guider(monkeypatch):
    """diffusers' FrequencyDecoupledGuidance(**options) on the kornia port."""
    from diffusers.guiders import frequency_decoupled_guidance as module

    monkeypatch.setattr(module, "_CAN_USE_KORNIA", True)
    monkeypatch.setattr(module, "build_laplacian_pyramid_func", kornia_build_laplacian_pyramid)
    monkeypatch.setattr(module, "upsample_and_blur_func", kornia_pyrup)

    def make(**options):
        return module.FrequencyDecoupledGuidance(**options)

    return make


def run_guider(guider, c, u, step=0, steps=10):
    guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(500))
    return guider.forward(c.double(), u.double()).pred[..., :c.shape[-2], :c.shape[-1]]  # padded: cropped


# ---- the pyramid ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw,levels", [((8, 8), 2), ((5, 7), 2), ((13, 9), 3), ((16, 12), 3), ((6, 10), 2),
                                       ((8, 5), 2), ((32, 32), 4), ((4, 7), 1)])
def test_pyramid_is_the_float64_reference(dtype, hw, levels):
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours, spec = laplacian_pyramid(x.float(), levels), laplacian_pyramid_reference(x, levels)
    assert [p.shape for p in ours] == [p.shape for p in spec]
    for p, q in zip(ours, spec):
        torch.testing.assert_close(p.double(), q, **tol(q))
    back = image_from_pyramid(ours)[..., :hw[0], :hw[1]].double()  # the pyramid inverts exactly
    torch.testing.assert_close(back, x.double(), **tol(x.double()))
    if hw != (8, 5):  # kornia's port, where kornia works (8 x 5: no padding, 5 -> 2 -> 4: its shape error)
        for p, q in zip(ours, kornia_build_laplacian_pyramid(x.double(), levels)):
            torch.testing.assert_close(p.double(), q, **tol(q))


def test_blur_is_kornias_published_examples():
    """kornia's docstring examples of pyrdown and pyrup (their align_corners=True resize, our blur)."""
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    down = F.interpolate(fdg_module._blur(x), size=(2, 2), mode="bilinear", align_corners=True)
    torch.testing.assert_close(down, torch.tensor([[[[3.75, 5.25], [9.75, 11.25]]]]))
    x = torch.arange(4, dtype=torch.float32).reshape(1, 1, 2, 2)
    up = fdg_module._blur(F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=True))
    torch.testing.assert_close(up, torch.tensor([[[[0.75, 0.875, 1.125, 1.25], [1.0, 1.125, 1.375, 1.5],
                                                  [1.5, 1.625, 1.875, 2.0], [1.75, 1.875, 2.125, 2.25]]]]))


# ---- the rule -----------------------------------------------------------------------------------------------------

CASES = [dict(), dict(guidance_scales=[7.0, 3.0, 1.5]), dict(parallel_weights=0.3),
         dict(guidance_scales=[6.0, 2.0], parallel_weights=[0.5, 0.0], use_original_formulation=True),
         dict(guidance_rescale=0.7), dict(guidance_rescale=[0.5, 0.8], guidance_rescale_space="freq"),
         dict(guidance_scales=[4.0], parallel_weights=0.2), dict(parallel_weights=0.4, upcast_to_double=False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(16, 16), (8, 12), (5, 7)])
@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_rule_is_diffusers_guider(guider, dtype, hw, options):
    """diffusers' guider on the same predictions (float64; on 5 x 7 it returns kornia's padded 8 x 8: cropped)."""
    if hw == (8, 12) and len(options.get("guidance_scales", ())) == 3:
        hw = (8, 16)  # 12 -> 6 -> 3 has no third level that pyrup brings back to 6: kornia's shape error
    u, c = preds((3, *hw), dtype)
    rule = FDG(**options)
    ours = rule.guide(u, c, 1.0, At(0, 10, 0.0))
    assert ours.dtype == torch.float32 and ours.shape == u.shape
    spec = fdg_reference(u, c, rule)
    torch.testing.assert_close(ours.double(), spec, **tol(spec))
    if hw == (5, 7) and options.get("guidance_rescale"):
        return  # padded, diffusers rescales with the deviation of its padded result ("freq": a shape error there)
    theirs = run_guider(guider(**options), c, u)
    torch.testing.assert_close(ours.double(), theirs, **tol(theirs))
    cfg = u.double() + 10.0 * (c.double() - u.double())
    assert (ours.double() - cfg).abs().max() > 0.1


def test_steps_and_disabled_levels(guider):
    """start / stop per level (diffusers' int(start N) <= step < int(stop N)), a level with scale 1 takes the
    conditional level (diffusers fails on a disabled level beside guided ones), none guided: c."""
    u, c = preds((2, 8, 8), seed=2)
    rule = FDG(guidance_scales=[8.0, 3.0], start=0.2, stop=0.7)
    for step in range(10):
        ours = rule.guide(u, c, 1.0, At(step, 10, 0.0)).double()
        theirs = run_guider(guider(guidance_scales=[8.0, 3.0], start=0.2, stop=0.7), c, u, step, 10)
        torch.testing.assert_close(ours, theirs, **tol(theirs))
        assert torch.equal(ours, c.double()) == (not 2 <= step < 7)
    rule = FDG(guidance_scales=[8.0, 1.0])
    spec = fdg_reference(u, c, rule)
    pc, pu = laplacian_pyramid_reference(c, 2), laplacian_pyramid_reference(u, 2)
    by_hand = image_from_pyramid([pu[0] + 8.0 * (pc[0] - pu[0]), pc[1]])
    torch.testing.assert_close(spec, by_hand, rtol=0, atol=1e-12)
    torch.testing.assert_close(rule.guide(u, c, 1.0, At(0, 1, 0.0)).double(), spec, **tol(spec))
    rule = FDG(guidance_scales=[8.0, 3.0], start=[0.0, 0.5])
    for step, levels_on in ((0, [True, False]), (5, [True, True])):
        assert [rule.level_on(i, At(step, 10, 0.0)) for i in range(2)] == levels_on
        spec = fdg_reference(u, c, rule, step, 10)
        torch.testing.assert_close(rule.guide(u, c, 1.0, At(step, 10, 0.0)).double(), spec, **tol(spec))


# ---- in the loop ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "ddim"])
def test_sample_is_the_hand_loop(guider, backend, method):
    options = dict(guidance_scales=[5.0, 2.0], parallel_weights=0.5, start=0.25)
    ours = sample(backend, FDG(**options), 1.0, method)
    spec = hand(method, lambda u, c, t, i: run_guider(guider(**options), c, u, i, 4), space="prediction")
    close(ours, spec)
    assert (sample(backend, None, 3.0, method) - ours).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_defaults_and_two_conditions(guider, backend):
    ours = sample(backend, "fdg", 1.0)
    close(ours, hand("euler", lambda u, c, t, i: run_guider(guider(), c, u, i, 4), space="prediction"))
    w = (2.0, 1.0)  # with conditions, cfg's weights mix them
    ours = sample(backend, "fdg", w, conditions=[Y, Y2])
    close(ours, hand("euler", lambda u, c, t, i: run_guider(guider(), c, u, i, 4), space="prediction",
                     conditions=[Y, Y2], weights=list(w)))


def test_registered_and_checked():
    assert RULES["fdg"] is FDG and get_rule("fdg") == FDG()
    assert FDG(guidance_scales=[3, 2]).guidance_scales == (3.0, 2.0) and hash(FDG(start=[0.0, 0.1]))
    for kw, name in ((dict(guidance_scales=[]), "guidance_scales"), (dict(guidance_scales=3.0), "guidance_scales"),
                     (dict(guidance_scales=[1.0, float("nan")]), "guidance_scales"),
                     (dict(guidance_rescale=[0.1]), "guidance_rescale"),
                     (dict(guidance_rescale=1.5), "guidance_rescale"),
                     (dict(parallel_weights=[0.1, 0.2, 0.3]), "parallel_weights"), (dict(start="0"), "start"),
                     (dict(stop=[1.0, float("inf")]), "stop"),
                     (dict(guidance_rescale_space="pixel"), "guidance_rescale_space")):
        with pytest.raises(ValueError, match=name):
            FDG(**kw)
    for flag in ("use_original_formulation", "upcast_to_double"):
        with pytest.raises(TypeError, match=flag):
            FDG(**{flag: 1})
    kw = dict(y=Y, null_y=NULL, guidance="fdg", seed=0)
    with pytest.raises(ValueError, match=r"guidance='fdg' takes its scales from the rule .*leave cfg at 1, got 7.5"):
        fastdiff.sample(model, 2, 7.5, shape=SHAPE, **kw)
    with pytest.raises(ValueError, match=r"leave cfg at 1"):
        fastdiff.sample(model, 2, lambda t: 1.0, shape=SHAPE, **kw)
    with pytest.raises(ValueError, match=r"guidance_rescale: guidance='fdg' takes .*FDG\(guidance_rescale"):
        fastdiff.sample(model, 2, 1.0, shape=SHAPE, guidance_rescale=0.3, **kw)
    with pytest.raises(ValueError, match="null_y"):
        fastdiff.sample(model, 2, 1.0, shape=SHAPE, y=Y, guidance="fdg")
    with pytest.raises(ValueError, match=r"guidance='fdg' splits \[B, C, H, W\] predictions.*\[2, 3, 5\]"):
        fastdiff.sample(lambda x, t, y: x, 2, 1.0, shape=(3, 5), **kw)
    with pytest.raises(ValueError, match=r"FDG with 3 levels \(len\(guidance_scales\)\) needs H and W >= 6"):
        fastdiff.sample(lambda x, t, y: x, 2, 1.0, shape=(1, 4, 16), y=Y, null_y=NULL,
                        guidance=FDG(guidance_scales=[3.0, 2.0, 1.5]))
