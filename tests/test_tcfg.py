"""TCFG (fastdiff.sampling.features.tcfg): the rule's per-sample weights from the Gram matrix against the SVD
reference and diffusers' TangentialClassifierFreeGuidance on the same predictions (degenerate samples included),
and the rule in the loop against a hand-written Euler loop on every backend here, with rescale, two conditions,
cfg = 1 and a captured loop."""

import pytest
import torch

import fastdiff
from fastdiff.ops.sample_gram import sample_gram_reference
from fastdiff.sampling.features.guidance import RULES, branch_weights, get_rule, rescale_reference
from fastdiff.sampling.features.tcfg import TCFG, tcfg_reference

from gram_rule_testing import (BACKENDS, NULL, STEPS, Y, assert_captured_once, assert_cfg_one_is_no_rule,
                               assert_cli_accepts, assert_identical_conditions_are_one,
                               assert_two_conditions_act_on_their_weighted_mean, branches, close, hand_euler, kw,
                               model)

RULE_CASES = [TCFG(), TCFG(use_original_formulation=True)]
RULE_IDS = ["tcfg", "original"]


def _weights_blend(rule, p_null, p_y, w, phi=0.0):
    """w_0 p_null + w_1 (p_y - p_null) with the float32 per-sample weights branch_weights makes, in float64."""
    out = branch_weights(sample_gram_reference([p_null, p_y]), rule, w, phi, torch.empty(len(p_y), 2)).double()
    per = (-1, *([1] * (p_y.dim() - 1)))
    return out[:, 0].view(per) * p_null.double() + out[:, 1].view(per) * (p_y.double() - p_null.double())


def _preds(shape, dtype=torch.float32, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_null = torch.randn(B, *shape, generator=g) * 0.8 + 0.1
    p_y = p_null + torch.randn(B, *shape, generator=g) * torch.linspace(0.2, 1.5, B).view(-1, *([1] * len(shape)))
    return p_null.to(dtype), p_y.to(dtype)


def _tol(spec, rel):
    return dict(rtol=0, atol=rel * spec.abs().max().item())


# ---- the rule on given predictions ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,B", [((3, 5, 7), 4), ((2,), 5), ((1, 2 ** 12 + 5), 2)])
@pytest.mark.parametrize("rule", RULE_CASES, ids=RULE_IDS)
def test_weights_are_the_svd_reference(dtype, shape, B, rule):
    p_null, p_y = _preds(shape, dtype, B, seed=B)
    for w in (4.0, 7.5, 1.0, 0.5, -1.0):
        spec = tcfg_reference(p_null, p_y, w, rule)
        torch.testing.assert_close(_weights_blend(rule, p_null, p_y, w), spec, **_tol(spec, 1e-6))


def test_degenerate_samples():
    """Zero predictions, one zero branch, parallel branches (s2 = 0: the CFG blend) and the tie s1 = s2 (the CFG
    blend by choice; LAPACK's pick depends on the layout)."""
    c = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [1.0, -2.0, 0.5], [1.0, -2.0, 0.5],
                      [3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    u = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -4.0, 1.0], [-0.5, 1.0, -0.25],
                      [0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [1.0, -1.0, 0.0]])
    w = 3.0
    for rule in RULE_CASES:
        base = c.double() if rule.use_original_formulation else u.double()
        want = base + w * (c.double() - u.double())  # u' = u: the CFG blend
        want[2] = base[2] + w * c[2].double()  # u = 0: u' = 0
        ours = _weights_blend(rule, u, c, w)
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours[:5], tcfg_reference(u, c, w, rule)[:5], rtol=0, atol=1e-6)  # the SVD's too
    from diffusers.guiders.tangential_classifier_free_guidance import normalized_guidance

    theirs = normalized_guidance(c.double(), u.double(), w)
    torch.testing.assert_close(theirs[:5], _weights_blend(TCFG(), u, c, w)[:5], rtol=0, atol=1e-5)
    for b in (5, 6, 7):  # the tie: diffusers keeps u (CFG, as fastdiff) or drops it (v1 = c), by layout
        cfg = u[b].double() + w * (c[b].double() - u[b].double())
        assert any(torch.allclose(theirs[b], pick, atol=1e-5) for pick in (cfg, w * c[b].double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w,phi", [(7.5, 0.0), (4.0, 0.7), (0.5, 0.3), (1.0, 0.0), (-2.0, 0.0)])
@pytest.mark.parametrize("original", [False, True])
def test_weights_are_diffusers_guider(dtype, w, phi, original):
    """The weights (rescale included) blend to diffusers' TangentialClassifierFreeGuidance on the same predictions,
    within its float32 SVD's error (measured <= 4e-6 of max |g| here; the float64 reference is within 1e-7)."""
    from diffusers.guiders import TangentialClassifierFreeGuidance

    rule = TCFG(use_original_formulation=original)
    for shape in ((3, 5, 7), (2, 16, 16)):
        p_null, p_y = _preds(shape, dtype, seed=7)
        ours = _weights_blend(rule, p_null, p_y, w, phi)
        spec = tcfg_reference(p_null, p_y, w, rule)
        if phi:
            spec = rescale_reference(p_null, p_y, w, phi, spec)
        torch.testing.assert_close(ours, spec, **_tol(spec, 1e-6))
        guider = TangentialClassifierFreeGuidance(guidance_scale=w, guidance_rescale=phi,
                                                  use_original_formulation=original)
        guider.set_state(step=2, num_inference_steps=10, timestep=torch.tensor(500))
        theirs = guider.forward(p_y.double(), p_null.double()).pred
        torch.testing.assert_close(ours, theirs, **_tol(theirs, 2e-5))


def test_the_rule_is_registered_and_checked():
    assert RULES["tcfg"] is TCFG and get_rule("tcfg") == TCFG()
    with pytest.raises(TypeError, match="use_original_formulation"):
        TCFG(use_original_formulation="no")
    assert_cli_accepts("tcfg")


# ---- in the loop ----------------------------------------------------------------------------------------------

@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param




@pytest.mark.parametrize("guidance", ["tcfg", TCFG(use_original_formulation=True)], ids=RULE_IDS)
@pytest.mark.parametrize("phi", [0.0, 0.6])
def test_sample_is_the_hand_loop(backend, guidance, phi):
    rule, w = get_rule(guidance), 3.5

    def blend(x, t):
        p_null, p_y = branches(x, t)
        g = tcfg_reference(p_null, p_y, w, rule)
        return rescale_reference(p_null, p_y, w, phi, g) if phi else g

    got = fastdiff.sample(model, STEPS, w, y=Y, null_y=NULL, guidance=guidance, guidance_rescale=phi, **kw(backend))
    close(got, hand_euler(blend), 1e-4)
    cfg = fastdiff.sample(model, STEPS, w, y=Y, null_y=NULL, guidance_rescale=phi, **kw(backend))
    assert (got - cfg).abs().max() > 1e-3  # the rule is not CFG here (the check can tell them apart)


@pytest.mark.parametrize("guidance", ["tcfg", TCFG(use_original_formulation=True)], ids=RULE_IDS)
@pytest.mark.parametrize("method", ["euler", "euler_ancestral"])
def test_identical_conditions_are_one_condition_with_the_summed_weight(backend, guidance, method):
    assert_identical_conditions_are_one(backend, guidance, method)


def test_two_conditions_act_on_their_weighted_mean(backend):
    assert_two_conditions_act_on_their_weighted_mean(backend, "tcfg",
                                                     lambda p_null, p_c, w: tcfg_reference(p_null, p_c, w, TCFG()))


def test_cfg_one_is_no_rule(backend):
    assert_cfg_one_is_no_rule(backend, RULE_CASES)


def test_runs_in_a_captured_loop(recorder):
    assert_captured_once(recorder, y=Y, guidance="tcfg", guidance_rescale=0.5)
