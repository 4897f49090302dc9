"""Guidance by a perturbed forward (fastdiff.sampling.features.perturbed): PAG, SLG, SEG and AutoGuidance.

The fused blend of each stage (sampler_step with the rule's weights) against a float64 formula written here and
against diffusers' guider (PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance, AutoGuidance) on
the same predictions, step by step through its window; the loop with a second model (two Gaussian mixtures of
fastdiff.mixtures) against a hand-written Euler loop on every backend here, cfg_batch both ways; which stages call
the perturbed model; the plan caches (Sampler, sample's plan cache, a captured loop); and the refusals."""

from types import SimpleNamespace

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, class_conditional_mixture
from fastdiff.ops.randn import randn
from fastdiff.ops.sampler_step import sampler_step
from fastdiff.sampling.features.guidance import RULES, get_rule
from fastdiff.sampling.features.perturbed import PAG, SEG, SLG, AutoGuidance, perturbed_reference
from fastdiff.sampling.planner import arguments
from fastdiff.sampling.sampler import DEFAULTS

BACKENDS = [b for b in ("reference", "cpu", "triton") if fastdiff.backends()[b]]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ---- an independent float64 formula (diffusers' forward, written out) -------------------------------------------

def _window(start, stop, scale, i, n):
    """diffusers' _is_slg_enabled: strict at both ends, off at scale 0."""
    return int(start * n) < i < int(stop * n) and scale != 0


def _formula(u, c, p, w, s, original, cfg_on):
    """g of diffusers' forward: cfg and perturbed on, one of them, or neither (float64)."""
    u, c, p = (None if v is None else v.double() for v in (u, c, p))
    if cfg_on and s is not None:
        return (c if original else u) + w * (c - u) + s * (c - p)
    if cfg_on:
        return (c if original else u) + w * (c - u)
    if s is not None:
        return (c if original else p) + s * (c - p)
    return c


def _rescaled(g, c, phi):
    dims = list(range(1, g.dim()))
    r = g * (c.double().std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
    return phi * r + (1 - phi) * g


def _options(rule):
    """(scale, start, stop) of a windowed rule."""
    return tuple(getattr(rule, n) for n in rule._options)


def _guider(rule, w, phi, cfg_on):
    """diffusers' guider of ``rule``; its CFG part off where fastdiff's is (guidance_scale 1, or 0 when original)."""
    import diffusers.guiders as dg

    orig = rule.use_original_formulation
    scale = w if cfg_on else (0.0 if orig else 1.0)
    common = dict(guidance_scale=scale, guidance_rescale=phi, use_original_formulation=orig)
    if isinstance(rule, PAG):
        return dg.PerturbedAttentionGuidance(perturbed_guidance_scale=rule.perturbed_guidance_scale,
                                             perturbed_guidance_start=rule.perturbed_guidance_start,
                                             perturbed_guidance_stop=rule.perturbed_guidance_stop,
                                             perturbed_guidance_layers=[0], **common)
    if isinstance(rule, SLG):
        return dg.SkipLayerGuidance(skip_layer_guidance_scale=rule.skip_layer_guidance_scale,
                                    skip_layer_guidance_start=rule.skip_layer_guidance_start,
                                    skip_layer_guidance_stop=rule.skip_layer_guidance_stop,
                                    skip_layer_guidance_layers=[0], **common)
    if isinstance(rule, SEG):
        return dg.SmoothedEnergyGuidance(seg_guidance_scale=rule.seg_guidance_scale,
                                         seg_guidance_start=rule.seg_guidance_start,
                                         seg_guidance_stop=rule.seg_guidance_stop, seg_guidance_layers=[0], **common)
    return dg.AutoGuidance(auto_guidance_layers=[0], dropout=1.0, **{**common, "guidance_scale": w if cfg_on else
                                                                       (0.0 if orig else 1.0)})


WINDOWED = [PAG(), PAG(perturbed_guidance_scale=1.5, perturbed_guidance_start=0.0, perturbed_guidance_stop=0.7,
                    use_original_formulation=True),
            SLG(skip_layer_guidance_scale=3.0, skip_layer_guidance_stop=0.6),
            SEG(seg_guidance_scale=-0.7), SEG(use_original_formulation=True), PAG(perturbed_guidance_scale=0.0)]
WINDOWED_IDS = ["pag", "pag-original", "slg", "seg-negative", "seg-original", "pag-zero"]


def _weights(rule, w, phi=0.0, steps=10, interval=None, B=4):
    """The stage weights of ``rule`` for a call of ``steps`` one-stage steps at t = i / steps."""
    kw = {**DEFAULTS, "y": torch.arange(B) % 3, "null_y": 3, "shape": (2,), "guidance": rule, "guidance_rescale": phi,
          "perturbed_model": lambda x, t, y: x, "options": {}}
    a = arguments(lambda x, t, y: x, steps, w, kw)
    a.guidance.interval = interval
    stages = [SimpleNamespace(step=i, t=i / steps) for i in range(steps)]
    return a.guidance.stage_weights(stages, B, torch.device("cpu"))


def _preds(shape, dtype, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, *shape, generator=g) * 0.8 + 0.1
    c = u + torch.randn(B, *shape, generator=g) * torch.linspace(0.2, 1.5, B).view(-1, *([1] * len(shape)))
    p = c + 0.6 * torch.randn(B, *shape, generator=g)
    return u.to(dtype), c.to(dtype), p.to(dtype)


def _fused(weights, k, u, c, p, backend):
    """Stage k's blend through the fused step (out = g), with its predictions in the stage's order."""
    preds = {"one": [c], "cfg": [u, c], "p": [p, c], "cfg+p": [u, c, p]}[weights.layouts[k]]
    if weights.per_sample:
        weights.update(k, preds, backend)
    row = weights.row(k, weights.branched(k))
    x = torch.zeros(c.shape, dtype=torch.float32)
    return sampler_step(x, preds, weights=row, coeffs=[0.0, 1.0, 0.0, 0.0], backend=backend).double()


def _tol(ref):
    return dict(rtol=0, atol=1e-6 * ref.abs().max().item())


# ---- the blend on given predictions --------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype", [((3, 5, 7), torch.float32), ((3, 5, 7), torch.bfloat16),
                                         ((1, 2 ** 12 + 5), torch.float32)])
@pytest.mark.parametrize("w,phi", [(4.0, 0.0), (7.5, 0.6), (1.0, 0.0), (1.0, 0.4), (-1.5, 0.0)])
@pytest.mark.parametrize("rule", WINDOWED, ids=WINDOWED_IDS)
def test_windowed_blend_is_the_formula_and_diffusers(backend, shape, dtype, w, phi, rule):
    """Every step of a 10-step call, inside and outside the window, with CFG on (cfg != 1) and off (cfg = 1)."""
    if backend == "triton" and (shape, dtype, w) != ((3, 5, 7), torch.float32, 7.5):
        pytest.skip("the triton interpreter pays per launch: one case of each rule (the kernel is the cpu one's)")
    u, c, p = _preds(shape, dtype)
    steps = 10
    weights = _weights(rule, w, phi, steps)
    scale, start, stop = _options(rule)
    cfg_on = w != 1.0
    for i in range(steps):
        s = scale if _window(start, stop, scale, i, steps) else None
        assert weights.perturbed_at[i] == (s is not None)
        spec = _formula(u, c, p, w, s, rule.use_original_formulation, cfg_on)
        if phi:
            spec = _rescaled(spec, c, phi)
        ours = _fused(weights, i, u, c, p, backend)
        torch.testing.assert_close(ours, spec, **_tol(spec))
        guider = _guider(rule, w, phi, cfg_on)
        guider.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(500))
        theirs = guider.forward(c.double(), u.double(), p.double()).pred
        torch.testing.assert_close(ours, theirs, **_tol(theirs))
        ref = perturbed_reference(u, c, p, w, s, rule.use_original_formulation, cfg_on)
        torch.testing.assert_close(_rescaled(ref, c, phi) if phi else ref, spec, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w,phi", [(3.0, 0.0), (2.0, 0.7), (1.0, 0.0), (-0.5, 0.0)])
@pytest.mark.parametrize("original", [False, True])
def test_autoguidance_blend_is_the_formula_and_diffusers(backend, dtype, w, phi, original):
    """The weak model's prediction in place of the unconditional branch: p_weak + w (p_y - p_weak)."""
    if backend == "triton" and (dtype, w) != (torch.float32, 2.0):
        pytest.skip("the triton interpreter pays per launch: one case of each formulation")
    rule = AutoGuidance(use_original_formulation=original)
    _, c, weak = _preds((3, 5, 7), dtype)
    weights = _weights(rule, w, phi, steps=4)
    for i in range(4):
        assert weights.perturbed_at[i] == (w != 1.0) and weights.layouts[i] in ("p", "one")
        spec = _formula(None, c, weak, None, w if w != 1.0 else None, original, False)
        if phi:
            spec = _rescaled(spec, c, phi)
        ours = _fused(weights, i, None, c, weak, backend)
        torch.testing.assert_close(ours, spec, **_tol(spec))
        guider = _guider(rule, w, phi, w != 1.0)
        guider.set_state(step=i, num_inference_steps=4, timestep=torch.tensor(500))
        theirs = guider.forward(c.double(), weak.double()).pred
        torch.testing.assert_close(ours, theirs, **_tol(theirs))


def test_guidance_interval_turns_cfg_off_not_the_window():
    """Outside guidance_interval the unconditional branch is off; the perturbed window stays diffusers'."""
    rule = PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
    weights = _weights(rule, 3.0, steps=10, interval=(0.45, 1.0))
    assert weights.layouts == ["one"] + ["p"] * 4 + ["cfg+p"] * 5
    assert weights.rows[2] == (1.0, 2.8) and weights.rows[6] == (1.0, 3.0 + 2.8, -2.8)
    ag = _weights(AutoGuidance(), 3.0, steps=10, interval=(0.45, 1.0))
    assert ag.layouts == ["one"] * 5 + ["p"] * 5


# ---- in the loop ----------------------------------------------------------------------------------------------

MAIN = MixtureModel(class_conditional_mixture(3, 2, std=0.3), null_label=3)
WEAK = MixtureModel(class_conditional_mixture(3, 2, std=0.6), null_label=3)  # a broader, "weaker" model
B, SHAPE, STEPS = 5, (2,), 8
Y, NULL = torch.tensor([0, 1, 2, 0, 1]), 3


def _hand_euler(rule, w, phi=0.0, interval=None, steps=STEPS, seed=3, weak=WEAK, conditions=None):
    """Euler on CondOT from the sampler's own initial noise, each step's blend by :func:`_formula`. With
    ``conditions`` (label batches, w their weights): the formula on their weighted mean p_c = Σ a_k p_k with scale
    W = Σ w_k, the perturbed prediction likewise p̃_c = Σ a_k p̃_k (ComfyUI's combined conditioning)."""
    x = randn(torch.arange(seed, seed + B), 0, SHAPE).double()
    grid = [i / steps for i in range(steps + 1)]
    ag = isinstance(rule, AutoGuidance)
    ys, ws = (conditions, w) if conditions is not None else ([Y], [w])
    shares = [wk / sum(ws) for wk in ws]
    w = sum(ws)

    def mean(model, xf, tt):
        return sum(a * model(xf, tt, y).double() for a, y in zip(shares, ys))

    for i, (t, t1) in enumerate(zip(grid, grid[1:])):
        xf, tt = x.float(), torch.full((B,), t)
        guided = (w != 1.0 or conditions is not None) and (interval is None or interval[0] <= t <= interval[1])
        c = mean(MAIN, xf, tt)
        if ag:
            s, cfg_on = (w if guided else None), False
        else:
            scale, start, stop = _options(rule)
            s, cfg_on = (scale if _window(start, stop, scale, i, steps) else None), guided
        u = MAIN(xf, tt, torch.full((B,), NULL)) if cfg_on else None
        p = mean(weak, xf, tt) if s is not None else None
        g = _formula(u, c, p, w, s, rule.use_original_formulation, cfg_on)
        if phi and (cfg_on or s is not None):
            g = _rescaled(g, c, phi)
        x = x + (t1 - t) * g
    return x.float()


def _sample(rule, w, backend, **more):
    return fastdiff.sample(MAIN, STEPS, w, y=Y, null_y=NULL, shape=SHAPE, seed=3, guidance=rule,
                           perturbed_model=WEAK, backend=backend, **more)


LOOP_RULES = [PAG(perturbed_guidance_start=0.1, perturbed_guidance_stop=0.8), SLG(skip_layer_guidance_stop=0.5),
              SEG(seg_guidance_scale=1.5, use_original_formulation=True), AutoGuidance(),
              AutoGuidance(use_original_formulation=True)]
LOOP_IDS = ["pag", "slg", "seg-original", "autoguidance", "autoguidance-original"]


@pytest.mark.parametrize("cfg_batch", [True, False])
@pytest.mark.parametrize("w", [3.0, 1.0])
@pytest.mark.parametrize("rule", LOOP_RULES, ids=LOOP_IDS)
def test_sample_is_the_hand_loop(backend, rule, w, cfg_batch):
    rule = get_rule(rule)
    got = _sample(rule, w, backend, cfg_batch=cfg_batch)
    torch.testing.assert_close(got, _hand_euler(rule, w), rtol=1e-5, atol=1e-5)
    if w != 1.0:  # the perturbed branch matters here (the check can tell)
        plain = fastdiff.sample(MAIN, STEPS, w, y=Y, null_y=NULL, shape=SHAPE, seed=3, backend=backend)
        assert (got - plain).abs().max() > 1e-2


@pytest.mark.parametrize("rule", [PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=0.9), AutoGuidance()],
                         ids=["pag", "autoguidance"])
def test_rescale_and_interval_in_the_loop(backend, rule):
    for phi, interval in ((0.6, None), (0.0, (0.3, 0.8)), (0.5, (0.3, 0.8))):
        got = _sample(rule, 2.5, backend, guidance_rescale=phi, guidance_interval=interval)
        torch.testing.assert_close(got, _hand_euler(rule, 2.5, phi, interval), rtol=1e-5, atol=1e-5)


Y2 = torch.tensor([2, 2, 0, 1, 0])


@pytest.mark.parametrize("ws,cfg_batch", [((2.0, 1.5), True), ((3.0, -1.0), False)],
                         ids=["positive-batched", "negative-per-condition"])
@pytest.mark.parametrize("rule", LOOP_RULES, ids=LOOP_IDS)
def test_conditions_act_on_their_weighted_mean(backend, rule, ws, cfg_batch):
    """conditions=[y_1, y_2] with weights w_k: the rule on p_c = Σ (w_k / W) p_k with scale W, its perturbed branch
    on the same mean of each condition's perturbed prediction (one call of 2B, or one per condition)."""
    got = fastdiff.sample(MAIN, STEPS, list(ws), conditions=[Y, Y2], null_y=NULL, shape=SHAPE, seed=3, guidance=rule,
                          perturbed_model=WEAK, backend=backend, cfg_batch=cfg_batch)
    torch.testing.assert_close(got, _hand_euler(rule, ws, conditions=[Y, Y2]), rtol=1e-5, atol=1e-5)
    first = fastdiff.sample(MAIN, STEPS, sum(ws), y=Y, null_y=NULL, shape=SHAPE, seed=3, guidance=rule,
                            perturbed_model=WEAK, backend=backend)
    assert (got - first).abs().max() > 1e-2  # the second condition matters (the check can tell)


@pytest.mark.parametrize("rule", [PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=0.9), AutoGuidance()],
                         ids=["pag", "autoguidance"])
def test_conditions_with_rescale_and_interval(backend, rule):
    """guidance_rescale toward p_c's standard deviation; outside the interval the conditions alone (K branches)."""
    for phi, interval in ((0.6, None), (0.0, (0.3, 0.8)), (0.5, (0.3, 0.8))):
        got = fastdiff.sample(MAIN, STEPS, [2.0, 0.5], conditions=[Y, Y2], null_y=NULL, shape=SHAPE, seed=3,
                              guidance=rule, perturbed_model=WEAK, backend=backend, guidance_rescale=phi,
                              guidance_interval=interval)
        want = _hand_euler(rule, (2.0, 0.5), phi, interval, conditions=[Y, Y2])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_condition_is_y_and_the_limits():
    """conditions=[y] is y=y bit for bit; at most 3 conditions (2K + 1 predictions), 4 for AutoGuidance (2K); the
    weights' sum must not be 0 (p_c is their weighted mean)."""
    rule = PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
    kw = dict(null_y=NULL, shape=SHAPE, seed=3, perturbed_model=WEAK)
    for g in (rule, "autoguidance"):
        torch.testing.assert_close(fastdiff.sample(MAIN, STEPS, 2.5, conditions=[Y], guidance=g, **kw),
                                   fastdiff.sample(MAIN, STEPS, 2.5, y=Y, guidance=g, **kw), rtol=0, atol=0)
    four = [Y, Y2, Y.flip(0), Y2.flip(0)]
    with pytest.raises(ValueError, match="guidance='pag' with 4 conditions: at most 3"):
        fastdiff.sample(MAIN, 3, 2.0, conditions=four, guidance=rule, **kw)
    fastdiff.sample(MAIN, 3, 2.0, conditions=four, guidance="autoguidance", **kw)  # 8 predictions: the limit
    with pytest.raises(ValueError, match="guidance='autoguidance' with 5 conditions: at most 4"):
        fastdiff.sample(MAIN, 3, 2.0, conditions=four + [Y], guidance="autoguidance", **kw)
    with pytest.raises(ValueError, match="sum to 0.0"):
        fastdiff.sample(MAIN, 3, [1.0, -1.0], conditions=[Y, Y2], guidance=rule, **kw)


@pytest.mark.parametrize("rule", [PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=0.9), AutoGuidance()],
                         ids=["pag", "autoguidance"])
@pytest.mark.parametrize("phi,two", [(0.0, False), (0.5, True)], ids=["y", "conditions-rescale"])
def test_cfg_schedule_with_churn_per_sample(rule, phi, two):
    """Churn per sample with a cfg schedule: each sample's weights at its own times, as when it is sampled alone."""
    churn = [0.0, 0.5, 0.0, 0.2, 0.9]
    labels = dict(conditions=[Y, Y2], cfg=[lambda t: 2.0 + t, lambda t: 1.0 - 0.5 * t]) if two else \
        dict(y=Y, cfg=lambda t: 2.0 + t)
    kw = dict(null_y=NULL, shape=SHAPE, method="heun", guidance=rule, perturbed_model=WEAK, guidance_rescale=phi,
              backend="cpu")
    got = fastdiff.sample(MAIN, 6, seed=3, s_churn=churn, **labels, **kw)
    for b in range(B):
        one = {k: ([c[b:b + 1] for c in v] if k == "conditions" else v[b:b + 1] if k == "y" else v)
               for k, v in labels.items()}
        alone = fastdiff.sample(MAIN, 6, seed=3 + b, s_churn=churn[b], **one, **kw)
        torch.testing.assert_close(got[b:b + 1], alone, rtol=1e-6, atol=1e-6)
    fixed = fastdiff.sample(MAIN, 6, seed=3, s_churn=churn, **{**labels, "cfg": 2.5 if not two else [2.5, 0.75]},
                            **kw)
    assert (got - fixed).abs().max() > 1e-3  # the schedule matters (the check can tell)


def test_perturbed_calls_only_inside_the_window():
    """One perturbed call of B per stage inside the window (heun: two stages a step but its last), none outside."""
    calls = []

    def counted(x, t, y):
        calls.append((x.shape[0], round(float(t[0]), 6)))
        return WEAK(x, t, y)

    steps = 10
    rule = PAG(perturbed_guidance_start=0.2, perturbed_guidance_stop=0.65)  # steps 3..5
    fastdiff.sample(MAIN, steps, 3.0, y=Y, null_y=NULL, shape=SHAPE, guidance=rule, perturbed_model=counted,
                    method="euler")
    assert calls == [(B, round(i / steps, 6)) for i in (3, 4, 5)]
    calls.clear()
    fastdiff.sample(MAIN, steps, 3.0, y=Y, null_y=NULL, shape=SHAPE, guidance=rule, perturbed_model=counted,
                    method="heun")
    assert len(calls) == 6 and all(n == B for n, _ in calls)
    calls.clear()
    fastdiff.sample(MAIN, steps, 1.0, y=Y, shape=SHAPE, guidance=AutoGuidance(), perturbed_model=counted)
    assert calls == []  # cfg = 1: AutoGuidance is off, as diffusers' is
    for cfg_batch, want in ((True, [2 * B] * 3), (False, [B] * 6)):  # two conditions: one call of 2B, or two of B
        calls.clear()
        fastdiff.sample(MAIN, steps, [3.0, 1.0], conditions=[Y, Y2], null_y=NULL, shape=SHAPE, guidance=rule,
                        perturbed_model=counted, method="euler", cfg_batch=cfg_batch)
        assert [n for n, _ in calls] == want


def test_perturbed_output_dtype_is_the_models():
    """A bfloat16 perturbed model with a float32 model (and the reverse): the step reads one dtype."""
    def half(m):
        return lambda x, t, y: m(x, t, y).to(torch.bfloat16)

    rule = PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
    a = fastdiff.sample(MAIN, 4, 2.0, y=Y, null_y=NULL, shape=SHAPE, guidance=rule, perturbed_model=half(WEAK))
    b = fastdiff.sample(MAIN, 4, 2.0, y=Y, null_y=NULL, shape=SHAPE, guidance=rule,
                        perturbed_model=lambda x, t, y: WEAK(x, t, y).to(torch.bfloat16).float())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = fastdiff.sample(half(MAIN), 4, 2.0, y=Y, null_y=NULL, shape=SHAPE, guidance=rule, perturbed_model=WEAK)
    assert torch.isfinite(c).all()


def test_composes_with_callback_and_thresholding(backend):
    """A callback's x0 is the step's blend; dynamic thresholding thresholds the blend (three branches)."""
    rule = PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
    seen = []
    fastdiff.sample(MAIN, 4, 2.0, y=Y, null_y=NULL, shape=SHAPE, seed=3, guidance=rule, perturbed_model=WEAK,
                    backend=backend, callback=lambda i, t, x, x0: seen.append(x0.clone()))
    x = randn(torch.arange(3, 3 + B), 0, SHAPE)
    t = torch.zeros(B)
    g = _formula(MAIN(x, t, torch.full((B,), NULL)), MAIN(x, t, Y), WEAK(x, t, Y), 2.0, None, False, True)
    torch.testing.assert_close(seen[0].double(), x.double() + g, rtol=1e-5, atol=1e-5)  # condot: x0 = x + (1 - t) v
    out = fastdiff.sample(MAIN, 4, 2.0, y=Y, null_y=NULL, shape=SHAPE, guidance=rule, perturbed_model=WEAK,
                          backend=backend, dynamic_thresholding=True)
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0 + 1e-5


# ---- plans kept between calls -----------------------------------------------------------------------------------

def test_sampler_object_and_plan_cache_keep_the_perturbed_model_apart():
    rule = PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)

    def other(x, t, y):
        return WEAK(0.5 * x, t, y)

    kw = dict(y=Y, null_y=NULL, shape=SHAPE, guidance=rule, backend="cpu")
    fresh = {}
    for name, pm in (("weak", WEAK), ("other", other)):
        fastdiff.clear_scratch()
        fresh[name] = fastdiff.sample(MAIN, STEPS, 2.0, perturbed_model=pm, seed=5, **kw)
    assert (fresh["weak"] - fresh["other"]).abs().max() > 1e-3
    fastdiff.clear_scratch()
    for _ in range(2):  # the plan cache: a call with the other perturbed model plans anew
        for name, pm in (("weak", WEAK), ("other", other)):
            torch.testing.assert_close(fastdiff.sample(MAIN, STEPS, 2.0, perturbed_model=pm, seed=5, **kw),
                                       fresh[name], rtol=0, atol=0)
    sampler = fastdiff.Sampler(MAIN, STEPS, 2.0, perturbed_model=other, **kw)
    torch.testing.assert_close(sampler(seed=5), fresh["other"], rtol=0, atol=0)
    torch.testing.assert_close(sampler(seed=5, y=Y.flip(0)),
                               fastdiff.sample(MAIN, STEPS, 2.0, perturbed_model=other, seed=5,
                                               **{**kw, "y": Y.flip(0)}), rtol=0, atol=0)


def test_captured_loop_is_keyed_by_the_perturbed_model(monkeypatch):
    """cuda_graph=True: no host read in the perturbed branch, and another perturbed model captures anew
    (tests/graph_recorder.py)."""
    from fastdiff.sampling.core import graphs
    from graph_recorder import RecordingCapture

    rec = RecordingCapture()
    monkeypatch.setattr(graphs, "CAPTURE", rec)
    monkeypatch.setattr(graphs, "CACHE", graphs.GraphCache())
    lin = 0.2 * torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))

    def m(x, t, y):  # device ops only
        return (x @ lin) * (1.0 + t[:, None]) + emb[y]

    def p1(x, t, y):
        return (x @ lin.T) * (1.0 + t[:, None]) + emb[y]

    def p2(x, t, y):
        return 0.5 * x + emb[y]

    args = dict(y=Y, null_y=NULL, shape=SHAPE, guidance=PAG(perturbed_guidance_stop=1.0), guidance_rescale=0.5,
                backend=BACKENDS[0])
    for pm in (p1, p2, p1):
        for seed in (1, 2):
            torch.testing.assert_close(fastdiff.sample(m, STEPS, 3.0, cuda_graph=True, seed=seed, perturbed_model=pm,
                                                       **args),
                                       fastdiff.sample(m, STEPS, 3.0, seed=seed, perturbed_model=pm, **args),
                                       rtol=0, atol=0)
    assert rec.captures == 2 and rec.replays == 6


# ---- the refusals -------------------------------------------------------------------------------------------------

def test_rules_are_registered_and_checked():
    for name, cls in (("pag", PAG), ("slg", SLG), ("seg", SEG), ("autoguidance", AutoGuidance)):
        assert RULES[name] is cls and get_rule(name) == cls()
    with pytest.raises(ValueError, match="perturbed_guidance_scale"):
        PAG(perturbed_guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="skip_layer_guidance_start"):
        SLG(skip_layer_guidance_start=1.0)
    with pytest.raises(ValueError, match="seg_guidance_stop"):
        SEG(seg_guidance_start=0.5, seg_guidance_stop=0.4)
    with pytest.raises(TypeError, match="use_original_formulation"):
        AutoGuidance(use_original_formulation="yes")


def test_bad_input_names_the_argument():
    kw = dict(y=Y, null_y=NULL, shape=SHAPE, steps=3)
    with pytest.raises(ValueError, match="needs perturbed_model"):
        fastdiff.sample(MAIN, cfg=2.0, guidance="pag", **kw)
    with pytest.raises(TypeError, match="perturbed_model must be callable"):
        fastdiff.sample(MAIN, cfg=2.0, guidance="pag", perturbed_model=3, **kw)
    with pytest.raises(ValueError, match="perturbed_model is read by"):
        fastdiff.sample(MAIN, cfg=2.0, guidance="cfg_zero_star", perturbed_model=WEAK, **kw)
    with pytest.raises(ValueError, match="perturbed_model is read by"):
        fastdiff.sample(MAIN, cfg=2.0, perturbed_model=WEAK, **kw)
    with pytest.raises(ValueError, match="guidance_rescale"):
        fastdiff.sample(MAIN, cfg=1.0, guidance="autoguidance", perturbed_model=WEAK, guidance_rescale=0.5, **kw)
    with pytest.raises(ValueError, match="perturbed_model: model output .* shape"):
        fastdiff.sample(MAIN, cfg=2.0, guidance=PAG(perturbed_guidance_stop=1.0), **kw,
                        perturbed_model=lambda x, t, y: x[:, :1])
    with pytest.raises(TypeError, match="perturbed_model: model returned"):
        fastdiff.sample(MAIN, cfg=2.0, guidance="autoguidance", **kw, perturbed_model=lambda x, t, y: None)
    with pytest.raises(ValueError, match="perturbed_model does not apply"):
        fastdiff.sample(MAIN, 4, 2.0, y=Y, null_y=NULL, shape=SHAPE, method="dpm_adaptive", perturbed_model=WEAK)
