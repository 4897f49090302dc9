"""MAMBO-G (fastdiff.sampling.features.mambo_g): the rule's per-sample weights from the Gram matrix against the float64
reference and diffusers' MagnitudeAwareGuidance on the same predictions (a zero unconditional prediction included),
and the rule in the loop against a hand-written Euler loop on every backend here, with rescale, two conditions,
cfg = 1 and a captured loop."""

import pytest
import torch

import fastdiff
from fastdiff.ops.sample_gram import sample_gram_reference
from fastdiff.sampling.features.guidance import RULES, branch_weights, get_rule, rescale_reference
from fastdiff.sampling.features.mambo_g import MamboG, mambo_g_reference

from gram_rule_testing import (BACKENDS, NULL, STEPS, Y, assert_captured_once, assert_cfg_one_is_no_rule,
                               assert_cli_accepts, assert_identical_conditions_are_one,
                               assert_two_conditions_act_on_their_weighted_mean, branches, close, hand_euler, kw,
                               model)

RULE_CASES = [MamboG(), MamboG(alpha=2.0, use_original_formulation=True), MamboG(alpha=0.5)]
RULE_IDS = ["mambo_g", "original", "alpha0.5"]


def _weights_blend(rule, p_null, p_y, w, phi=0.0):
    """w_0 p_null + w_1 (p_y - p_null) with the float32 per-sample weights branch_weights makes, in float64."""
    out = branch_weights(sample_gram_reference([p_null, p_y]), rule, w, phi, torch.empty(len(p_y), 2)).double()
    per = (-1, *([1] * (p_y.dim() - 1)))
    return out[:, 0].view(per) * p_null.double() + out[:, 1].view(per) * (p_y.double() - p_null.double())


def _preds(shape, dtype=torch.float32, B=4, seed=0):
    """Updates from 1/20 to about 2 times p_null's size: damping factors from ~0.7 down to ~1e-7 at alpha = 8."""
    g = torch.Generator().manual_seed(seed)
    p_null = torch.randn(B, *shape, generator=g) * 0.8 + 0.1
    scale = torch.linspace(0.05, 2.0, B).view(-1, *([1] * len(shape)))
    p_y = p_null + torch.randn(B, *shape, generator=g) * scale
    return p_null.to(dtype), p_y.to(dtype)


def _tol(spec, rel):
    return dict(rtol=0, atol=rel * spec.abs().max().item())


# ---- the rule on given predictions ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,B", [((3, 5, 7), 4), ((2,), 5), ((1, 2 ** 12 + 5), 2)])
@pytest.mark.parametrize("rule", RULE_CASES, ids=RULE_IDS)
def test_weights_are_the_reference(dtype, shape, B, rule):
    p_null, p_y = _preds(shape, dtype, B, seed=B)
    for w in (4.0, 10.0, 1.0, 0.5, -1.0):
        spec = mambo_g_reference(p_null, p_y, w, rule)
        torch.testing.assert_close(_weights_blend(rule, p_null, p_y, w), spec, **_tol(spec, 1e-6))


def test_strided_predictions():
    """A non-contiguous view (every other column) gives the weights of its contiguous copy."""
    p_null, p_y = _preds((6, 10), seed=3)
    p_null, p_y = p_null[:, :, ::2], p_y[:, :, ::2]
    assert not p_y.is_contiguous()
    spec = mambo_g_reference(p_null, p_y, 6.0, MamboG())
    torch.testing.assert_close(_weights_blend(MamboG(), p_null, p_y, 6.0), spec, **_tol(spec, 1e-6))


def test_the_damping_is_the_papers():
    """A sample whose update is as large as p_null (ratio 1): w' = 1 + (w - 1) e^-alpha, checked by hand."""
    p_null = torch.tensor([[3.0, 4.0]])
    p_y = torch.tensor([[3.0, 9.0]])  # |d| = 5 = |p_null|
    w, alpha = 5.0, 0.7
    scale = 1.0 + (w - 1.0) * torch.exp(torch.tensor(-alpha, dtype=torch.float64))
    want = p_null.double() + scale * (p_y - p_null).double()
    torch.testing.assert_close(_weights_blend(MamboG(alpha=alpha), p_null, p_y, w), want, rtol=0, atol=1e-6)


def test_degenerate_samples():
    """p_null = 0: the ratio is unbounded, w' its limit (1; original 0): g = p_y (diffusers: inf ratio, the same
    limit where p_y != 0, NaN for p_y = p_null = 0). alpha = 0: plain CFG."""
    p_null = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    p_y = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    for rule in (MamboG(), MamboG(use_original_formulation=True)):
        ours = _weights_blend(rule, p_null, p_y, 7.0)
        torch.testing.assert_close(ours, p_y.double(), rtol=0, atol=1e-6)  # (row 2: p_y = p_null, g = p_y)
        theirs = mambo_g_reference(p_null, p_y, 7.0, rule)
        torch.testing.assert_close(ours[[0, 2]], theirs[[0, 2]], rtol=0, atol=1e-6)
        assert torch.isnan(theirs[1]).all()
    p_null, p_y = _preds((5,), seed=2)
    cfg = p_null.double() + 7.0 * (p_y.double() - p_null.double())
    torch.testing.assert_close(_weights_blend(MamboG(alpha=0.0), p_null, p_y, 7.0), cfg, **_tol(cfg, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w,phi,alpha", [(10.0, 0.0, 8.0), (4.0, 0.7, 8.0), (0.5, 0.3, 2.0), (-2.0, 0.0, 1.0)])
@pytest.mark.parametrize("original", [False, True])
def test_weights_are_diffusers_guider(dtype, w, phi, alpha, original):
    """The weights (rescale included) blend to diffusers' MagnitudeAwareGuidance on the same predictions (at most
    3-D: its torch.norm over dims 1.. fails on 4-D tensors under torch 2.x)."""
    from diffusers.guiders import MagnitudeAwareGuidance

    rule = MamboG(alpha=alpha, use_original_formulation=original)
    for shape in ((3, 35), (16, 16), (37,)):
        p_null, p_y = _preds(shape, dtype, seed=7)
        ours = _weights_blend(rule, p_null, p_y, w, phi)
        spec = mambo_g_reference(p_null, p_y, w, rule)
        if phi:
            spec = rescale_reference(p_null, p_y, w, phi, spec)
        torch.testing.assert_close(ours, spec, **_tol(spec, 1e-6))
        guider = MagnitudeAwareGuidance(guidance_scale=w, alpha=alpha, guidance_rescale=phi,
                                        use_original_formulation=original)
        guider.set_state(step=2, num_inference_steps=10, timestep=torch.tensor(500))
        theirs = guider.forward(p_y.double(), p_null.double()).pred
        torch.testing.assert_close(ours, theirs, **_tol(theirs, 1e-6))


def test_the_rule_is_registered_and_checked():
    assert RULES["mambo_g"] is MamboG and get_rule("mambo_g") == MamboG()
    assert MamboG().alpha == 8.0 and MamboG().use_original_formulation is False  # diffusers' defaults
    for bad in (-1.0, float("inf"), float("nan"), "8"):
        with pytest.raises(ValueError, match="alpha"):
            MamboG(alpha=bad)
    with pytest.raises(TypeError, match="use_original_formulation"):
        MamboG(use_original_formulation="no")
    assert_cli_accepts("mambo_g")


# ---- in the loop ----------------------------------------------------------------------------------------------

@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param




@pytest.mark.parametrize("guidance", ["mambo_g", MamboG(alpha=2.0, use_original_formulation=True)],
                         ids=RULE_IDS[:2])
@pytest.mark.parametrize("phi", [0.0, 0.6])
def test_sample_is_the_hand_loop(backend, guidance, phi):
    rule, w = get_rule(guidance), 3.5

    def blend(x, t):
        p_null, p_y = branches(x, t)
        g = mambo_g_reference(p_null, p_y, w, rule)
        return rescale_reference(p_null, p_y, w, phi, g) if phi else g

    got = fastdiff.sample(model, STEPS, w, y=Y, null_y=NULL, guidance=guidance, guidance_rescale=phi, **kw(backend))
    close(got, hand_euler(blend), 1e-4)
    cfg = fastdiff.sample(model, STEPS, w, y=Y, null_y=NULL, guidance_rescale=phi, **kw(backend))
    assert (got - cfg).abs().max() > 1e-3  # the rule is not CFG here (the check can tell them apart)


@pytest.mark.parametrize("method", ["euler", "euler_ancestral"])
def test_identical_conditions_are_one_condition_with_the_summed_weight(backend, method):
    assert_identical_conditions_are_one(backend, "mambo_g", method)


def test_two_conditions_act_on_their_weighted_mean(backend):
    assert_two_conditions_act_on_their_weighted_mean(backend, "mambo_g",
                                                     lambda p_null, p_c, w: mambo_g_reference(p_null, p_c, w, MamboG()))


def test_cfg_one_is_no_rule(backend):
    assert_cfg_one_is_no_rule(backend, RULE_CASES)


def test_runs_in_a_captured_loop(recorder):
    assert_captured_once(recorder, y=Y, guidance="mambo_g", guidance_rescale=0.5)
