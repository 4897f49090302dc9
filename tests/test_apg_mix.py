"""APG mix (fastdiff.sampling.features.apg_mix): CFG up to adaptive_projected_guidance_start_step, then APG, the
momentum running through both phases. The per-step weights against the float64 reference and, over whole sequences
of steps (the momentum's state), against diffusers' AdaptiveProjectedMixGuidance on the same predictions; the rule in
the loop against hand-written Euler and Heun loops on every backend here, with rescale, two conditions, cfg = 1 and a
captured loop; bad options."""

import pytest
import torch

import fastdiff
from fastdiff.ops.randn import randn
from fastdiff.ops.sample_gram import sample_gram_reference
from fastdiff.sampling.features.apg_mix import APGMix, apg_mix_reference
from fastdiff.sampling.features.guidance import RULES, branch_weights, get_rule, rescale_reference

from gram_rule_testing import B, BACKENDS, SHAPE, STEPS, assert_captured_once, assert_cli_accepts, close, kw, model


def _weights_blend(rule, step, p_null, p_y, running, w, phi=0.0):
    """The blend of the float32 per-sample weights of sampler step ``step`` over (p_null, p_y[, r]), in float64. The
    float64 running average goes in as float32, and bfloat16 predictions with it (exactly): rounded to bfloat16 it
    would no longer be the reference's."""
    preds = [p_null, p_y] + ([running] if running is not None else [])
    if running is not None:
        preds = [p.float() for p in preds]
    out = branch_weights(sample_gram_reference(preds), rule.stage_rule(step), w, phi,
                         torch.empty(len(p_y), len(preds))).double()
    per = (-1, *([1] * (p_y.dim() - 1)))
    g = out[:, 0].view(per) * p_null.double()
    for j, p in enumerate(preds[1:], 1):
        g = g + out[:, j].view(per) * (p.double() - p_null.double())
    return g


def _preds(shape, dtype=torch.float32, B=4, seed=0):
    """Updates of norm ~2..30 per sample on these shapes: both sides of the norm thresholds used here."""
    g = torch.Generator().manual_seed(seed)
    p_null = torch.randn(B, *shape, generator=g) * 0.8 + 0.1
    scale = torch.linspace(0.2, 1.5, B).view(-1, *([1] * len(shape)))
    p_y = p_null + torch.randn(B, *shape, generator=g) * scale
    return p_null.to(dtype), (p_y * 1.5).to(dtype)


def _tol(spec, rel):
    return dict(rtol=0, atol=rel * spec.abs().max().item())


CASES = [  # (rule, cfg)
    (APGMix(), 3.5),  # diffusers' defaults
    (APGMix(adaptive_projected_guidance_scale=6.0, adaptive_projected_guidance_momentum=0.4,
            adaptive_projected_guidance_rescale=3.0, eta=0.3, adaptive_projected_guidance_start_step=2), 5.0),
    (APGMix(adaptive_projected_guidance_momentum=None, adaptive_projected_guidance_rescale=0.0,
            adaptive_projected_guidance_start_step=1), 4.0),
    (APGMix(use_original_formulation=True, adaptive_projected_guidance_start_step=0, eta=0.5), 2.0),
    (APGMix(adaptive_projected_guidance_scale=1.0, adaptive_projected_guidance_start_step=1), 4.0),  # APG off
]
CASE_IDS = ["defaults", "momentum0.4", "no-momentum", "original", "apg-off"]


# ---- the rule on given predictions ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,B", [((3, 5, 7), 4), ((2,), 5), ((1, 2 ** 12 + 5), 2)])
@pytest.mark.parametrize("rule,w", CASES, ids=CASE_IDS)
def test_steps_are_the_reference(dtype, shape, B, rule, w):
    """Eight steps in a row: the weights blend to the reference's g, the running average carried through both."""
    running = None
    for step in range(8):
        p_null, p_y = _preds(shape, dtype, B, seed=10 * B + step)
        spec, running = apg_mix_reference(p_null, p_y, w, rule, step, running)
        torch.testing.assert_close(_weights_blend(rule, step, p_null, p_y, running, w), spec, **_tol(spec, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("phi", [0.0, 0.7])
@pytest.mark.parametrize("rule,w", CASES, ids=CASE_IDS)
def test_steps_are_diffusers_guider(dtype, phi, rule, w):
    """A whole sequence of steps against diffusers' guider, state and all: set_state per step, prepare_inputs (which
    makes the MomentumBuffer at step 0), forward; the running average is updated here as the loop does it."""
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    guider = AdaptiveProjectedMixGuidance(
        guidance_scale=w, guidance_rescale=phi,
        adaptive_projected_guidance_scale=rule.adaptive_projected_guidance_scale,
        adaptive_projected_guidance_momentum=rule.adaptive_projected_guidance_momentum,
        adaptive_projected_guidance_rescale=rule.adaptive_projected_guidance_rescale, eta=rule.eta,
        use_original_formulation=rule.use_original_formulation,
        adaptive_projected_guidance_start_step=rule.adaptive_projected_guidance_start_step)
    running, phases = None, set()
    steps = 9
    for step in range(steps):
        p_null, p_y = _preds((3, 5, 7), dtype, seed=100 + step)
        if rule.momentum is not None:
            running = (p_y.double() - p_null.double()) + rule.momentum * (0.0 if running is None else running)
        ours = _weights_blend(rule, step, p_null, p_y, running, w, phi)
        guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(999 - 100 * step))
        guider.prepare_inputs({"x": (torch.zeros(1), torch.zeros(1))})
        theirs = guider.forward(p_y.double(), p_null.double()).pred
        torch.testing.assert_close(ours, theirs, **_tol(theirs, 1e-6))
        phases.add(guider._is_apg_enabled())
        assert rule.apg_at(step) == guider._is_apg_enabled()
    apg_off = rule.adaptive_projected_guidance_scale == 1.0 and not rule.use_original_formulation
    assert phases == ({False} if apg_off else {False, True})  # the sequence crossed the switch


def test_apg_phase_is_not_cfg_and_reads_the_cfg_steps_history():
    """The switch changes the blend, and APG's first step reads the running average of the CFG steps before it: with
    another history (no momentum updates before it) its g differs."""
    rule, w = APGMix(adaptive_projected_guidance_start_step=1, adaptive_projected_guidance_rescale=0.0), 3.0
    p_null, p_y = _preds((8,), seed=1)
    running = None
    for step in range(2):
        running = apg_mix_reference(*_preds((8,), seed=20 + step), w, rule, step, running)[1]
    after = _weights_blend(rule, 2, p_null, p_y, (p_y - p_null) + rule.momentum * running, w)
    fresh = _weights_blend(rule, 2, p_null, p_y, p_y - p_null, w)
    cfg = _weights_blend(rule, 1, p_null, p_y, (p_y - p_null) + rule.momentum * running, w)
    assert (after - fresh).abs().max() > 1e-2 and (after - cfg).abs().max() > 1e-2


def test_the_rule_is_registered_and_checked():
    assert RULES["apg_mix"] is APGMix and get_rule("apg_mix") == APGMix()
    r = APGMix()  # diffusers' defaults
    assert (r.adaptive_projected_guidance_scale, r.adaptive_projected_guidance_momentum,
            r.adaptive_projected_guidance_rescale, r.eta, r.use_original_formulation,
            r.adaptive_projected_guidance_start_step) == (10.0, -0.5, 10.0, 0.0, False, 5)
    bad = [("adaptive_projected_guidance_scale", float("nan")), ("adaptive_projected_guidance_momentum", "0.5"),
           ("adaptive_projected_guidance_momentum", float("inf")), ("adaptive_projected_guidance_rescale", -1.0),
           ("eta", float("inf")), ("adaptive_projected_guidance_start_step", 2.5),
           ("adaptive_projected_guidance_start_step", -2), ("adaptive_projected_guidance_start_step", True)]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            APGMix(**{name: value})
    with pytest.raises(TypeError, match="use_original_formulation"):
        APGMix(use_original_formulation=1)
    assert_cli_accepts("apg_mix")


# ---- in the loop ----------------------------------------------------------------------------------------------

# not label 1: its class mean is 0, and APG's projection onto a p_y near 0 turns a 1e-7 change of the initial state
# into 2e-4 of the result (measured), beyond float32 loop-vs-float64-reference comparisons
Y, Y2, NULL = torch.tensor([0, 2, 0]), torch.tensor([2, 0, 2]), 3
LOOP_RULE = APGMix(adaptive_projected_guidance_scale=6.0, adaptive_projected_guidance_rescale=2.0, eta=0.2,
                   adaptive_projected_guidance_start_step=2)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _hand_loop(rule, w, phi=0.0, method="euler", a=(1.0,), steps=STEPS, seed=3):
    """Euler or Heun on CondOT from the sampler's own initial noise, every evaluation of step i guided by the rule
    at step i (the running average updated at each), in float64 (the model in float32)."""
    x = randn(torch.arange(seed, seed + B), 0, SHAPE).double()
    grid = [i / steps for i in range(steps + 1)]
    state = {"r": None}

    def guided(x, t, i):
        tt = torch.full((B,), t)
        p_null = model(x.float(), tt, torch.full((B,), NULL)).double()
        p_c = sum(ak * model(x.float(), tt, yk).double() for ak, yk in zip(a, (Y, Y2)))
        g, state["r"] = apg_mix_reference(p_null, p_c, w, rule, i, state["r"])
        return rescale_reference(p_null, p_c, w, phi, g) if phi else g

    for i, (t, t1) in enumerate(zip(grid, grid[1:])):
        d = guided(x, t, i)
        if method == "heun":
            d = 0.5 * (d + guided(x + (t1 - t) * d, t1, i))
        x = x + (t1 - t) * d
    return x.float()


ORIGINAL_RULE = APGMix(use_original_formulation=True, adaptive_projected_guidance_scale=2.0,
                       adaptive_projected_guidance_momentum=None, adaptive_projected_guidance_start_step=3)


@pytest.mark.parametrize("rule", [LOOP_RULE, ORIGINAL_RULE], ids=["momentum", "original"])
@pytest.mark.parametrize("phi", [0.0, 0.6])
def test_sample_is_the_hand_loop(backend, rule, phi):
    got = fastdiff.sample(model, STEPS, 3.5, y=Y, null_y=NULL, guidance=rule, guidance_rescale=phi, **kw(backend))
    close(got, _hand_loop(rule, 3.5, phi), 1e-4)
    cfg = fastdiff.sample(model, STEPS, 3.5, y=Y, null_y=NULL, guidance_rescale=phi, **kw(backend))
    assert (got - cfg).abs().max() > 1e-3  # the APG phase is not CFG here (the check can tell them apart)


def test_heun_switches_by_sampler_step(backend):
    """Two evaluations per step: both of step i take step i's phase, and each updates the running average."""
    got = fastdiff.sample(model, STEPS, 3.5, y=Y, null_y=NULL, method="heun", guidance=LOOP_RULE, **kw(backend))
    close(got, _hand_loop(LOOP_RULE, 3.5, method="heun"), 1e-4)


def test_two_conditions_act_on_their_weighted_mean(backend):
    w = (2.0, 1.5)
    a = [wk / sum(w) for wk in w]
    got = fastdiff.sample(model, STEPS, w, conditions=[Y, Y2], null_y=NULL, guidance=LOOP_RULE, **kw(backend))
    close(got, _hand_loop(LOOP_RULE, sum(w), a=a), 1e-4)


def test_defaults_by_name_and_cfg_one(backend):
    """guidance="apg_mix" is the defaults' rule; cfg = 1 is unguided sampling (diffusers' guider turns APG off too)."""
    got = fastdiff.sample(model, 8, 3.0, y=Y, null_y=NULL, guidance="apg_mix", **kw(backend))
    close(got, _hand_loop(APGMix(), 3.0, steps=8), 1e-4)
    plain = fastdiff.sample(model, STEPS, 1.0, y=Y, null_y=NULL, **kw(backend))
    assert torch.equal(fastdiff.sample(model, STEPS, 1.0, y=Y, null_y=NULL, guidance=LOOP_RULE, **kw(backend)), plain)


def test_runs_in_a_captured_loop(recorder):
    assert_captured_once(recorder, y=Y, guidance=LOOP_RULE, guidance_rescale=0.5)
